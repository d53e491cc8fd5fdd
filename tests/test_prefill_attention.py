"""Prefill chunks after a cached prefix: two mask-free flash passes merged by log-sum-exp
compute what the masked attention computes, on random tensors and on the real models
(Gemma 3's sliding-window layers read only the keys their window reaches)."""

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
