"""Prefill chunks after a cached prefix: two mask-free flash passes merged by log-sum-exp
compute what the masked attention computes, on random tensors and on the real models
(Gemma 3's sliding-window layers read only the keys their window reaches)."""

import contextlib

import pytest
import torch

from quickdraft.verifiers.attention import causal_chunk_attention


def masked_reference(query, key, value, n_rep, scale):
    q_len, kv_len = query.shape[2], key.shape[2]
    past = kv_len - q_len
    mask = torch.ones(q_len, kv_len, dtype=torch.bool)
    mask[:, past:] = torch.tril(torch.ones(q_len, q_len, dtype=torch.bool))
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


@pytest.mark.parametrize(("past", "q_len", "n_rep"), [(0, 17, 3), (50, 20, 3), (300, 64, 1), (1, 5, 2)])
def test_chunk_attention_equals_masked_attention(past, q_len, n_rep):
    torch.manual_seed(past + q_len)
    kv_heads, dim = 2, 32
    query = torch.randn(1, kv_heads * n_rep, q_len, dim)
    key = torch.randn(1, kv_heads, past + q_len, dim)
    value = torch.randn(1, kv_heads, past + q_len, dim)
    got = causal_chunk_attention(query, key, value, n_rep, 0.2)
    want = masked_reference(query, key, value, n_rep, 0.2)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_chunk_attention_keeps_a_bf16_model_in_bf16():
    torch.manual_seed(1)
    query = torch.randn(1, 6, 12, 64)
    key, value = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    got = causal_chunk_attention(query.bfloat16(), key.bfloat16(), value.bfloat16(), 3, None)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), masked_reference(query, key, value, 3, None), atol=3e-2)


@pytest.mark.model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_chunked_prefill_on_the_real_model_matches_the_masked_path(name):
    from quickdraft.bench.prefill_cost import prefill
    from quickdraft.verifiers.model_loader import load_model

    # fp32 verification kernels: the last position's head call (one row) would otherwise round the
    # hidden state to bf16, which turns the paths' last-bit differences into visible ones.
    model = load_model(name, decode_dtype="float32").model
    # 1,300 tokens in chunks of 256: later chunks start past Gemma 3's 512-token window.
    ids = torch.randint(100, 40000, (1, 1300), generator=torch.Generator().manual_seed(7))
    last = {fast: prefill(model, ids, 256, two_pass=fast)[1] for fast in (False, True)}
    assert torch.allclose(last[True], last[False], atol=1e-3, rtol=1e-4)
    assert last[True].argmax() == last[False].argmax()


# -- the bf16 prefix kernel (CPUs with AVX-512 BF16) ----------------------------------------------
from quickdraft.verifiers import attention as attention_module  # noqa: E402
from quickdraft.verifiers import small_linear  # noqa: E402
from quickdraft.verifiers.small_linear import _kernels  # noqa: E402

BF16_PREFIX = _kernels is not None and _kernels.prefill_attention_bf16_supported()
TILES_PREFIX = BF16_PREFIX and _kernels.prefill_attention_tiles_supported()


def _flash_prefix(query, key, value, n_rep, scale, dtype=torch.float32):
    batch, heads, q_len, dim = query.shape
    folded = query.reshape(batch, heads // n_rep, n_rep * q_len, dim).to(dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        folded, key.to(dtype), value.to(dtype), 0.0, False, scale=scale)
    return out.float().reshape(batch, heads, q_len, dim), lse.reshape(batch, heads, q_len)


@pytest.mark.parametrize("tiles", [False, True], ids=["vdpbf16ps", "amx"])
@pytest.mark.parametrize(("q_len", "k_len", "n_rep", "dim"),
                         [(1, 1, 3, 64), (5, 15, 3, 64), (37, 129, 1, 64), (300, 1000, 3, 64), (33, 257, 4, 256)])
def test_the_bf16_prefix_kernel_is_attention_at_bf16_precision(q_len, k_len, n_rep, dim, tiles):
    torch.manual_seed(q_len + k_len)
    kv_heads = 2
    query = torch.randn(1, kv_heads * n_rep, q_len, dim)
    # Views into a larger cache, as the model hands them over.
    cache_k, cache_v = torch.randn(1, kv_heads, k_len + 50, dim), torch.randn(1, kv_heads, k_len + 50, dim)
    key, value = cache_k[:, :, :k_len], cache_v[:, :, :k_len]
    if not (TILES_PREFIX if tiles else BF16_PREFIX):  # a CPU without them: a clear refusal (the model never asks)
        assert not attention_module.bf16_prefix_applies(query, key, value, tiles)
        with pytest.raises(ValueError, match="AMX tiles" if BF16_PREFIX else "AVX-512 BF16"):
            attention_module.bf16_prefix_attention(query, key, value, None, tiles)
        return
    out, lse = attention_module.bf16_prefix_attention(query, key, value, None, tiles)
    want, want_lse = _flash_prefix(query, key, value, n_rep, dim ** -0.5)
    torch_bf16, _ = _flash_prefix(query, key, value, n_rep, dim ** -0.5, torch.bfloat16)
    # As close to fp32 attention as torch's own bf16 attention is (inputs rounded to bf16, fp32 sums).
    assert (out - want).abs().max() <= max(2 * (torch_bf16 - want).abs().max(), 1e-3)
    assert torch.allclose(lse, want_lse, atol=2e-2)
    # Threads split rows and keys' packing only: any count gives the same result.
    for threads in (1, 3):
        with _threads(threads):
            again, again_lse = attention_module.bf16_prefix_attention(query, key, value, None, tiles)
        assert torch.equal(again, out) and torch.equal(again_lse, lse)


@pytest.mark.parametrize("tiles", [False, True], ids=["vdpbf16ps", "amx"])
@pytest.mark.parametrize(("q_len", "past", "n_rep", "dim"),
                         [(1, 0, 3, 64), (5, 15, 3, 64), (40, 0, 3, 64), (37, 129, 1, 64), (300, 1000, 3, 64),
                          (33, 257, 4, 256)])
def test_the_kernels_mask_a_chunk_causally_after_its_cached_keys(q_len, past, n_rep, dim, tiles):
    torch.manual_seed(q_len + past)
    kv_heads = 2
    query = torch.randn(1, kv_heads * n_rep, q_len, dim)
    cache_k, cache_v = (torch.randn(1, kv_heads, past + q_len + 50, dim) for _ in range(2))
    key, value = cache_k[:, :, :past + q_len], cache_v[:, :, :past + q_len]
    if not (TILES_PREFIX if tiles else BF16_PREFIX):  # a CPU without them: a clear refusal
        with pytest.raises(ValueError, match="AMX tiles" if BF16_PREFIX else "AVX-512 BF16"):
            attention_module.bf16_prefix_attention(query, key, value, None, tiles, causal_from=past)
        return
    out, lse = attention_module.bf16_prefix_attention(query, key, value, None, tiles, causal_from=past)
    # Position i sees the cached keys and the chunk's up to itself.
    sees = torch.arange(past + q_len)[None, :] <= past + torch.arange(q_len)[:, None]
    expand = dict(repeats=n_rep, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(**expand), value.repeat_interleave(**expand), attn_mask=sees)
    in_bf16 = torch.nn.functional.scaled_dot_product_attention(
        query.bfloat16(), key.repeat_interleave(**expand).bfloat16(), value.repeat_interleave(**expand).bfloat16(),
        attn_mask=sees).float()
    assert (out - want).abs().max() <= max(2 * (in_bf16 - want).abs().max(), 1e-3)
    scores = (query @ key.repeat_interleave(**expand).transpose(-1, -2)) * dim ** -0.5
    assert torch.allclose(lse, scores.masked_fill(~sees, float("-inf")).logsumexp(-1), atol=2e-2)
    for threads in (1, 3):
        with _threads(threads):
            again, _ = attention_module.bf16_prefix_attention(query, key, value, None, tiles, causal_from=past)
        assert torch.equal(again, out)
    with pytest.raises(ValueError, match="cached keys before the chunk"):
        attention_module.bf16_prefix_attention(query, key, value, None, tiles, causal_from=past + 1)


@pytest.mark.parametrize("tiles", [False, True], ids=["vdpbf16ps", "amx"])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["prefix", "causal"])
def test_the_kernels_rescale_their_sums_as_later_keys_score_higher(dim, causal, tiles):
    # Scores that climb along the keys (by about 30 in all, plus noise) move each row's running maximum many
    # times after the first step, so the sums are rescaled in flight (in memory, or taken out of the tiles).
    torch.manual_seed(dim)
    q_len, past, n_rep = 48, 900, 3
    k_len = past + q_len
    query = torch.ones(1, 2 * n_rep, q_len, dim) + 0.1 * torch.randn(1, 2 * n_rep, q_len, dim)
    ramp = torch.linspace(0, 30 / dim ** 0.5, k_len)[None, None, :, None]
    key = ramp * torch.ones(1, 2, k_len, dim) + 0.3 * torch.randn(1, 2, k_len, dim)
    value = torch.randn(1, 2, k_len, dim)
    if not (TILES_PREFIX if tiles else BF16_PREFIX):  # a CPU without them: the model never asks
        assert not attention_module.bf16_prefix_applies(query, key, value, tiles)
        return
    out, lse = attention_module.bf16_prefix_attention(
        query, key if causal else key[:, :, :past], value if causal else value[:, :, :past], None, tiles,
        causal_from=past if causal else None)
    keys = k_len if causal else past
    sees = (torch.arange(keys)[None, :] <= past + torch.arange(q_len)[:, None]) if causal \
        else torch.ones(q_len, keys, dtype=torch.bool)
    k, v = key[:, :, :keys].repeat_interleave(n_rep, 1), value[:, :, :keys].repeat_interleave(n_rep, 1)
    want = torch.nn.functional.scaled_dot_product_attention(query.double(), k.double(), v.double(), attn_mask=sees)
    in_bf16 = torch.nn.functional.scaled_dot_product_attention(query.bfloat16(), k.bfloat16(), v.bfloat16(),
                                                               attn_mask=sees).double()
    assert (out - want).abs().max() <= max(2 * (in_bf16 - want).abs().max(), 1e-3)
    # The log-sum-exp of the scores of the inputs rounded to bf16, as the kernels round them.
    scores = (query.bfloat16().double() @ k.bfloat16().double().transpose(-1, -2)) * dim ** -0.5
    assert torch.allclose(lse.double(), scores.masked_fill(~sees, float("-inf")).logsumexp(-1), atol=1e-2)


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_a_bf16_prefill_chunk_takes_the_prefix_kernel_where_it_runs(monkeypatch):
    torch.manual_seed(3)
    query = torch.randn(1, 9, 40, 64)
    key, value = torch.randn(1, 3, 240, 64), torch.randn(1, 3, 240, 64)
    calls = []
    real = attention_module.bf16_prefix_attention
    monkeypatch.setattr(attention_module, "bf16_prefix_attention",
                        lambda *a, **kw: calls.append(kw.get("causal_from")) or real(*a, **kw))
    with small_linear.prefill_precision(torch.bfloat16):
        got = causal_chunk_attention(query, key, value, 3, None)
    want = masked_reference(query, key, value, 3, None)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=3e-2)
    # The prefix takes a kernel of ours wherever one runs (AMX tiles, or AVX-512 BF16 without them); an AMX
    # CPU without the tile kernel runs all of it through torch in bf16.
    taken = 1 if (TILES_PREFIX if small_linear.fast_bf16_cpu() else BF16_PREFIX) else 0
    assert len(calls) == taken
    # That one call masks the chunk's own block as well (it sees 200 cached keys): nothing left to merge.
    assert calls == [200] * taken
    with small_linear.prefill_precision(None):
        assert torch.allclose(causal_chunk_attention(query, key, value, 3, None), want, atol=1e-5)
    assert len(calls) == taken


@pytest.mark.model
def test_bf16_prefill_on_the_real_model_stays_close_to_fp32():
    from quickdraft.bench.prefill_cost import prefill
    from quickdraft.verifiers.model_loader import load_model

    model = load_model("smollm2-135m", decode_dtype="float32").model
    ids = torch.randint(100, 40000, (1, 1300), generator=torch.Generator().manual_seed(11))
    _, fp32 = prefill(model, ids, 256, two_pass=True)
    _, bf16 = prefill(model, ids, 256, two_pass=True, lowp=torch.bfloat16)
    # bf16 linear layers and attention: the same next token, logits within bf16's reach.
    assert bf16.argmax() == fp32.argmax()
    assert (bf16 - fp32).abs().max() < 0.5


def test_the_prefix_kernel_benchmark_reports_time_and_difference_per_shape():
    from quickdraft.bench.prefill_attention_kernel import measure

    if not BF16_PREFIX:
        with pytest.raises(SystemExit, match="AVX-512 BF16"):
            measure([(8, 100)], repeats=1)
        return
    point, = measure([(8, 100)], repeats=1)["points"]
    assert point["kernel_ms"] > 0 and point["flash_fp32_max_diff"] == 0
    assert point["kernel_max_diff"] < 2e-2 and point["kernel_vs_flash_fp32"] > 0
    # The tile kernel's row where AMX runs, and only there.
    assert ("kernel_tiles_ms" in point) == TILES_PREFIX
    if TILES_PREFIX:
        assert point["kernel_tiles_max_diff"] < 2e-2 and point["kernel_tiles_vs_flash_bf16"] > 0
    # The whole chunk (its own keys after the cached ones): one causal call against the merged path before it.
    assert point["chunk_causal_ms"] > 0 and point["chunk_merged_ms"] > 0 and point["chunk_causal_vs_merged"] > 0
    assert point["chunk_causal_max_diff"] < 2e-2 and point["chunk_merged_max_diff"] < 2e-2
