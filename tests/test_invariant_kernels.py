"""The batch-invariant kernels (linear layers, attention): a row's result never depends on the rows
beside it, and greedy speculation with them in the model is plain greedy decoding to the bit."""

import pytest
import torch
import torch.nn.functional as F

from quickdraft.verifiers import _kernels, small_linear

# nn.Linear shapes (out, in): the model's own, and ones with tails (in not a multiple of 16,
# out not a multiple of the 4-row weight tile).
SHAPES = [(192, 576), (576, 1536), (37, 100), (5, 17), (64, 1)]


def kernel(x, w, b=None, threads=2, isa="auto"):
    y = torch.empty(x.shape[0], w.shape[0])
    _kernels.linear(x.data_ptr(), w.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(),
                    x.shape[0], w.shape[0], x.shape[1], threads, isa)
    return y


@pytest.mark.parametrize("shape", SHAPES)
def test_a_row_is_bitwise_the_same_alone_and_in_any_batch(shape):
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(out_f * 1000 + in_f)
    w = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen)
    x = torch.randn(70, in_f, generator=gen)
    for bias in (None, b):
        full = kernel(x, w, bias)
        for m in range(70):
            assert torch.equal(kernel(x[m:m + 1].contiguous(), w, bias, threads=1)[0], full[m])
        for rows in (2, 3, 4, 5, 7, 8, 13, 16, 17, 31, 33, 64, 65, 70):
            for threads in (1, 2, 3):
                assert torch.equal(kernel(x[:rows].contiguous(), w, bias, threads), full[:rows])
        # Other neighbours, another position in the batch: the same bits for row 5.
        others = torch.randn(9, in_f, generator=gen)
        mixed = torch.cat([others[:4], x[5:6], others[4:]])
        assert torch.equal(kernel(mixed, w, bias)[4], full[5])


def _linear_problem(shape, rows, seed):
    """Weights, bias and input rows of unit normals for an (out, in) linear layer."""
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=gen), torch.randn(out_f, generator=gen), torch.randn(rows, in_f,
                                                                                                   generator=gen)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_instruction_set_gives_the_same_bits(shape):
    # One summation order, implemented by each path: a worker on another CPU computes the same.
    w, b, x = _linear_problem(shape, rows=11, seed=7)
    isas = _kernels.supported_isas()
    assert "scalar" in isas and _kernels.isa() == isas[0]
    reference = kernel(x, w, b, isa="scalar")
    for isa in isas:
        assert torch.equal(kernel(x, w, b, isa=isa), reference), isa


@pytest.mark.parametrize("shape", SHAPES)
def test_close_to_torch(shape):
    w, b, x = _linear_problem(shape, rows=20, seed=3)
    # fp32 sums of up to 1536 products of unit normals: only the summation order differs.
    torch.testing.assert_close(kernel(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_results_ignore_the_callers_denormal_mode():
    # Products of 1e-20 and 1e-21 are denormal: a thread in flush-to-zero mode would drop them.
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(24, 40, generator=gen) * 1e-21, torch.randn(6, 40, generator=gen) * 1e-20
    ieee = kernel(x, w)
    assert (ieee != 0).any()
    assert torch.set_flush_denormal(True)
    try:
        assert torch.equal(kernel(x, w), ieee) and torch.equal(kernel(x, w, threads=1), ieee)
    finally:
        torch.set_flush_denormal(False)


def test_bad_arguments_are_refused():
    w, x = torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel(x, w, isa="sse9")
    with pytest.raises(ValueError, match="negative"):
        _kernels.linear(x.data_ptr(), w.data_ptr(), 0, x.data_ptr(), -1, 4, 8, 1, "auto")


def test_installed_layers_route_small_calls_and_forced_passes_to_the_kernel():
    gen = torch.Generator().manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))
    assert small_linear.install(net) == 2
    assert type(net[0]) is small_linear.InvariantLinear
    layer = net[0]
    small_x = torch.randn(1, 3, 48, generator=gen)
    big_x = torch.randn(small_linear.MAX_ROWS + 1, 48, generator=gen)
    with torch.inference_mode():
        assert torch.equal(layer(small_x), kernel(small_x[0], layer.weight, layer.bias)[None])
        # Above MAX_ROWS torch's GEMM, unless the pass is forced onto the kernel.
        assert torch.equal(layer(big_x), F.linear(big_x, layer.weight, layer.bias))
        with small_linear.invariant():
            forced = layer(big_x)
        assert torch.equal(forced, kernel(big_x, layer.weight, layer.bias))
        assert torch.equal(forced[:1], layer(big_x[:1]))
    # Autograd still works: with gradients on, the layer is plain nn.Linear.
    out = net(small_x).sum()
    out.backward()
    assert net[0].weight.grad is not None


def _bf16_within_fp32_rounding(y, x, w, b=None):
    """Whether y is the sum of the bf16-rounded products up to fp32 accumulation: at most one rounding
    per product added and one for the bias, each within 2^-24 of the running magnitude."""
    xb, wb = x.bfloat16().double(), w.bfloat16().double()
    exact = xb @ wb.T + (0 if b is None else b.double())
    bound = (xb.abs() @ wb.abs().T + (0 if b is None else b.double().abs())) * (x.shape[1] + 1) * 2.0 ** -24
    return bool(((y.double() - exact).abs() <= bound + 1e-30).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_packing_holds_the_weights_and_the_reference_sums_them(shape):
    # Runs on any CPU: the plain C++ reference reads the packed tiles, so the layout is checked even
    # where there are no AMX tiles to run.
    w, b, x = _linear_problem(shape, rows=9, seed=13)
    packed = small_linear.pack_bf16(w)
    assert packed.numel() == (shape[0] + 15) // 16 * 16 * ((shape[1] + 31) // 32 * 32)
    for bias in (None, b):
        assert _bf16_within_fp32_rounding(small_linear.linear_bf16(x, packed, shape[0], bias, isa="reference"),
                                          x, w, bias)


def _runs_here(isa: str) -> bool:
    try:
        return _kernels.bf16_linear_isa(isa) == isa
    except ValueError:
        return False


BF16_KERNELS = {isa: _runs_here(isa) for isa in ("amx", "avx512_bf16")}


@pytest.mark.parametrize("isa", sorted(BF16_KERNELS))
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_rows_are_bitwise_the_same_alone_and_in_any_batch(shape, isa):
    out_f = shape[0]
    w, b, x = _linear_problem(shape, rows=40, seed=17)
    packed = small_linear.pack_bf16(w)
    if not BF16_KERNELS[isa]:  # a CPU without it: a clear refusal (auto never asks for it here)
        with pytest.raises(ValueError, match="AMX" if isa == "amx" else "AVX-512 BF16"):
            small_linear.linear_bf16(x, packed, out_f, isa=isa)
        return
    for bias in (None, b):
        full = small_linear.linear_bf16(x, packed, out_f, bias, isa=isa)
        assert _bf16_within_fp32_rounding(full, x, w, bias)
        for m in range(40):
            assert torch.equal(small_linear.linear_bf16(x[m:m + 1], packed, out_f, bias, threads=1, isa=isa)[0],
                               full[m])
        # Rows in one tile, exactly a tile, across tiles (16 rows each on AMX, 4 in registers with
        # AVX-512 BF16); any thread count.
        for rows in (2, 3, 4, 5, 15, 16, 17, 33):
            for threads in (1, 2, 3):
                assert torch.equal(small_linear.linear_bf16(x[:rows], packed, out_f, bias, threads, isa=isa),
                                   full[:rows])


def test_auto_takes_the_tiles_then_the_vector_kernel_and_says_so_where_there_is_neither():
    if BF16_KERNELS["amx"]:
        assert small_linear.bf16_isa() == "amx"
    elif BF16_KERNELS["avx512_bf16"]:
        assert small_linear.bf16_isa() == "avx512_bf16"
    else:
        assert small_linear.bf16_isa() is None
        with pytest.raises(ValueError, match="neither on AMX tiles nor with AVX-512 BF16"):
            small_linear.linear_bf16(torch.ones(1, 32), small_linear.pack_bf16(torch.ones(16, 32)), 16)
    with pytest.raises(ValueError, match="unknown bf16 kernel"):
        small_linear.linear_bf16(torch.ones(1, 32), small_linear.pack_bf16(torch.ones(16, 32)), 16, isa="avx3")


def test_installed_layers_take_the_bf16_kernel_when_switched_on():
    gen = torch.Generator().manual_seed(19)
    net = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.ReLU(), torch.nn.Linear(40, 8, bias=False))
    small_linear.install(net)
    x = torch.randn(5, 48, generator=gen)
    if small_linear.bf16_isa() is None:
        with pytest.raises(RuntimeError, match="AMX tiles or AVX-512 BF16"):
            small_linear.use_bf16_kernel(net)
        return
    assert small_linear.use_bf16_kernel(net) == 2
    assert small_linear.use_bf16_kernel(net) == 0  # already on
    layer = net[0]
    with torch.inference_mode():
        tiles = layer(x)
        assert torch.equal(tiles, small_linear.linear_bf16(x, small_linear.pack_bf16(layer.weight), 40, layer.bias))
        assert not torch.equal(tiles, kernel(x, layer.weight, layer.bias))  # inputs rounded to bf16
        torch.testing.assert_close(tiles, kernel(x, layer.weight, layer.bias), rtol=0.02, atol=0.02)
        assert small_linear.use_bf16_kernel(net, on=False) == 2
        assert torch.equal(layer(x), kernel(x, layer.weight, layer.bias))
    # A weight changed since it was packed is packed again when the tiles are switched back on.
    with torch.no_grad():
        layer.weight.mul_(2)
    small_linear.use_bf16_kernel(net)
    with torch.inference_mode():
        assert torch.equal(layer(x), small_linear.linear_bf16(x, small_linear.pack_bf16(layer.weight), 40, layer.bias))
    assert layer.state_dict().keys() == {"weight", "bias"}
    with pytest.raises(ValueError, match="packed for"):
        small_linear.linear_bf16(x, small_linear.pack_bf16(layer.weight), 80)


def attention(q, k, v, mask, isa="auto", threads=2):
    """q [heads, q_len, dim]; k, v [kv_heads, k_len, dim] (strided views allowed); mask bool [q_len, k_len]."""
    heads, q_len, dim = q.shape
    kv_heads, k_len, _ = k.shape
    q, mask = q.contiguous(), mask.contiguous()
    out = torch.empty(q_len, heads, dim)
    _kernels.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), heads, kv_heads,
                       q_len, k_len, dim, k.stride(0), k.stride(1), v.stride(0), v.stride(1), mask.stride(0),
                       dim ** -0.5, threads, isa)
    return out


VECTOR_ISAS = ("avx512", "avx2")


# (query heads per kv head, kv heads, head dim): SmolLM2's and Gemma 3 270M's shapes.
MODELS = [(3, 3, 64), (4, 1, 256)]


def tree_case(past, n_rep=3, kv_heads=3, dim=64, seed=0, window=0):
    """A cache of `past` positions (inside a larger buffer, as the KV cache holds it) and a pass of
    2 new tokens and a draft tree: a wrong sibling first, then a 6-node path. With `window`, each
    position also stops seeing keys that many positions back (a local-attention layer)."""
    gen = torch.Generator().manual_seed(seed)
    parents = [-1, -1, 1, 2, 3, 4, 5]
    q_len, k_len = 2 + len(parents), past + 2 + len(parents)
    kbuf, vbuf = torch.randn(kv_heads, k_len + 50, dim, generator=gen), torch.randn(kv_heads, k_len + 50, dim,
                                                                                    generator=gen)
    q = torch.randn(kv_heads * n_rep, q_len, dim, generator=gen)
    mask = torch.zeros(q_len, k_len, dtype=torch.bool)
    mask[:, :past] = True
    mask[:2, past:past + 2] = torch.ones(2, 2, dtype=torch.bool).tril()
    mask[2:, past:past + 2] = True
    for j, parent in enumerate(parents):
        row = 2 + j
        mask[row, past + row] = True
        if parent >= 0:
            mask[row, past + 2:] |= mask[2 + parent, past + 2:]
    if window:
        depth = torch.tensor([0, 1, *(1 + d for d in (1, 1, 2, 3, 4, 5, 6))])
        positions = torch.cat([torch.arange(past), past + depth])
        mask &= (positions[past:, None] - positions[None, :]) < window
    return q, kbuf[:, :k_len], vbuf[:, :k_len], mask


@pytest.mark.parametrize("model", MODELS)
# 700 and 1,500 cached keys span two and three of the kernel's 512-key segments.
@pytest.mark.parametrize("past,window", [(0, 0), (5, 0), (100, 0), (700, 0), (700, 40), (1500, 0), (1500, 600)])
def test_attention_vector_path_is_the_portable_definition(model, past, window):
    q, k, v, mask = tree_case(past, *model, window=window)
    reference = attention(q, k, v, mask, isa="scalar", threads=1)
    ran = []
    for isa in VECTOR_ISAS:
        if isa not in _kernels.supported_isas():  # this CPU lacks it: the path refuses (it is checked where it runs)
            with pytest.raises(ValueError, match=f"cannot run the {isa}"):
                attention(q, k, v, mask, isa=isa)
            continue
        ran.append(isa)
        for threads in (1, 3):
            assert torch.equal(attention(q, k, v, mask, isa=isa, threads=threads), reference)
    assert torch.equal(attention(q, k, v, mask), reference)
    # The default is the best vector path the CPU has; only a CPU without AVX2 and FMA falls back to SDPA.
    assert _kernels.attention_isa() == (ran[0] if ran else "scalar")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("past,window", [(0, 0), (37, 0), (700, 0), (700, 40), (1500, 0), (1500, 600)])
def test_an_attention_row_sees_only_its_keys(model, past, window):
    n_rep, kv_heads, dim = model
    q, k, v, mask = tree_case(past, *model, seed=past, window=window)
    full = attention(q, k, v, mask)
    for row in range(q.shape[1]):
        # The same row alone, over its visible keys only (no masked siblings between them, other
        # indices): the draft node's result is what plain decoding computes for that token.
        seen = mask[row].nonzero().flatten()
        alone = attention(q[:, row:row + 1], k[:, seen], v[:, seen], torch.ones(1, len(seen), dtype=torch.bool))
        assert torch.equal(alone[0], full[row])
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(1, kv_heads, -1, dim), k[None], v[None], attn_mask=mask.repeat(n_rep, 1)[None, None]
    ).reshape(n_rep * kv_heads, -1, dim).transpose(0, 1)
    torch.testing.assert_close(full, reference, rtol=1e-5, atol=1e-5)


BF16_ATTENTION = {"amx": _kernels.amx_attention_supported, "avx512_bf16": _kernels.bf16_attention_supported}


@pytest.mark.parametrize("isa", list(BF16_ATTENTION))
@pytest.mark.parametrize("model", [*MODELS, (20, 1, 64)])  # and more query heads per kv head than a tile's rows
# 511 and 513 cached keys: a segment's shared keys end on an odd key (a value pair half shared, half
# the row's own) and on an even one.
@pytest.mark.parametrize("past,window", [(0, 0), (37, 0), (100, 0), (511, 0), (513, 0), (700, 40), (1500, 0),
                                         (1500, 600)])
def test_a_bf16_attention_row_is_the_same_alone_and_in_a_draft_tree(isa, model, past, window):
    # The bf16 kernels take a row's keys from the cache when every row shares them and gather them
    # for a draft's own keys; either way each element sees the same inputs, so a draft node computes
    # what the same token computes alone (plain decoding), with any thread count.
    n_rep, kv_heads, dim = model
    q, k, v, mask = tree_case(past, *model, seed=past + 1, window=window)
    if not BF16_ATTENTION[isa]():  # the CPU lacks it: a clear refusal (invariant() never asks for it here)
        with pytest.raises(ValueError, match=f"cannot run the {isa}"):
            attention(q, k, v, mask, isa=isa)
        return
    full = attention(q, k, v, mask, isa=isa)
    for row in range(q.shape[1]):
        seen = mask[row].nonzero().flatten()
        alone = attention(q[:, row:row + 1], k[:, seen], v[:, seen], torch.ones(1, len(seen), dtype=torch.bool),
                          isa=isa)
        assert torch.equal(alone[0], full[row])
        assert torch.equal(attention(q[:, row:row + 1], k, v, mask[row:row + 1], isa=isa, threads=1)[0], full[row])
    # bf16 products: close to the fp32 kernel, not equal to it.
    fp32 = attention(q, k, v, mask)
    assert not torch.equal(full, fp32)
    torch.testing.assert_close(full, fp32, rtol=0.05, atol=0.03)


def test_attention_refuses_shapes_it_does_not_handle():
    q, k, v, mask = tree_case(4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        _kernels.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), q.data_ptr(), 8, 3, 9, 13, 64,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1), mask.stride(0), 0.125, 1, "auto")
    with pytest.raises(ValueError, match="multiple of 64"):
        _kernels.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), q.data_ptr(), 9, 3, 9, 13, 48,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1), mask.stride(0), 0.125, 1, "auto")


@pytest.mark.model
class TestModel:
    """SmolLM2 on the worker runtime, with the kernel installed by the loader."""

    @pytest.fixture(scope="class")
    @staticmethod
    def runtime():
        from quickdraft.verifiers.model_loader import load_model
        from quickdraft.verifiers.runtime import ModelRuntime

        torch.set_num_threads(2)
        loaded = load_model("smollm2-135m")
        assert loaded.invariant_linears == 30 * 7 + 1  # every projection and the (tied) head
        return ModelRuntime(loaded, kv_budget_bytes=1 << 30)

    @pytest.fixture(params=["fp32"] + ([f"bf16-{small_linear.bf16_isa()}"] if small_linear.bf16_isa() else []))
    @staticmethod
    def kernel(request, runtime):
        """Both kernels where the CPU multiplies bf16 (AMX tiles, where auto picks bf16, or AVX-512
        BF16), the fp32 one elsewhere."""
        from quickdraft.verifiers.model_loader import set_decode_dtype

        saved = runtime.loaded.decode_dtype
        set_decode_dtype(runtime.loaded, torch.bfloat16 if request.param.startswith("bf16") else None)
        yield request.param
        set_decode_dtype(runtime.loaded, saved)

    def test_speculative_greedy_is_plain_greedy_and_stats_are_bitwise(self, runtime, kernel):
        from quickdraft.verifiers.runtime import VerifyInput

        prompt = runtime.tokenize([{"role": "user", "content": "List five prime numbers and explain why."}])
        known, hist, plain, plain_stats = 0, list(prompt), [], []
        while len(plain) < 24:
            r = runtime.verify(VerifyInput(f"sl-plain-{kernel}", known, hist[max(0, known - 16):known], hist[known:],
                                           top_logprobs=3))
            known, hist = r.cached_len, hist + r.tokens
            plain += r.tokens
            plain_stats += r.stats
        known, hist, spec, spec_stats, steps = 0, list(prompt), [], [], 0
        while len(spec) < 24:
            right = plain[len(spec):len(spec) + 6]
            # A wrong first sibling, the right path, a wrong leaf: draft rows beside the real ones.
            tokens = [(right[0] + 9) % 49152, *right, (right[-1] + 4) % 49152]
            parents = [-1, -1, *range(1, len(right)), 1]
            r = runtime.verify(VerifyInput(f"sl-spec-{kernel}", known, hist[max(0, known - 16):known], hist[known:],
                                           tokens, parents, top_logprobs=3))
            known, hist = r.cached_len, hist + r.tokens
            spec += r.tokens
            spec_stats += r.stats
            steps += 1
        assert spec[:24] == plain[:24]
        assert steps < 12
        # Linear layers and attention batch-invariant: log-probabilities and entropies agree to the bit.
        assert spec_stats[:24] == plain_stats[:24]

    @pytest.fixture(params=[None, torch.bfloat16], ids=["prefill-fp32", "prefill-bf16"])
    @staticmethod
    def prefill(request, runtime):
        """Both prefill precisions on any CPU (auto picks bf16 only where the CPU has AMX)."""
        saved = runtime.loaded.prefill_dtype
        runtime.loaded.prefill_dtype = request.param
        yield request.param
        runtime.loaded.prefill_dtype = saved

    def test_many_new_tokens_with_a_draft_equal_plain_decoding(self, runtime, prefill):
        """More new tokens than MAX_ROWS: prefilled apart from the draft's pass, the same way in both
        modes, so none of their positions is computed by torch in one mode and the kernel in the other
        (in bf16 products too: prefill is the same with speculation on and off)."""
        from quickdraft.verifiers.runtime import VerifyInput

        first = runtime.tokenize([{"role": "user", "content": "Say hello."}])
        more = runtime.tokenize([{"role": "user", "content": "Now describe, in two sentences, how a hash map "
                                  "stores keys, resolves collisions and grows; then name one language that has "
                                  "one built in and show its syntax for a lookup with a default value."}])
        assert len(more) > small_linear.MAX_ROWS

        def run(key, draft_from):
            r = runtime.verify(VerifyInput(key, 0, [], first))
            hist = first + r.tokens + more
            known, out, stats = r.cached_len, [], []
            while len(out) < 12:
                right = draft_from[len(out):len(out) + 4] if draft_from else []
                r = runtime.verify(VerifyInput(key, known, hist[max(0, known - 16):known], hist[known:], right,
                                               list(range(-1, len(right) - 1)), top_logprobs=2))
                known, hist = r.cached_len, hist + r.tokens
                out += r.tokens
                stats += r.stats
            return out[:12], stats[:12]

        plain, plain_stats = run("sl-many-plain", None)
        spec, spec_stats = run("sl-many-spec", plain)
        assert spec == plain
        assert spec_stats == plain_stats

    def test_a_packed_session_computes_what_it_computes_alone(self, runtime):
        from quickdraft.verifiers.runtime import VerifyInput

        prompts = [runtime.tokenize([{"role": "user", "content": text}]) for text in
                   ("Name a colour.", "What is 12 times 12? Answer with the number only, then explain.",
                    "Write a haiku about compilers.")]
        drafts = [([11, 12, 13], [-1, 0, 1]), ([198, 20, 21, 22], [-1, -1, 1, 2]), ([5], [-1])]
        alone = [runtime.verify(VerifyInput(f"sl-alone{i}", 0, [], p, *d, top_logprobs=4))
                 for i, (p, d) in enumerate(zip(prompts, drafts, strict=True))]
        packed = runtime.verify_batch([VerifyInput(f"sl-packed{i}", 0, [], p, *d, top_logprobs=4)
                                       for i, (p, d) in enumerate(zip(prompts, drafts, strict=True))])
        assert packed[0].batch_size == 3 and packed[0].batch_tokens > small_linear.MAX_ROWS
        for a, b in zip(alone, packed, strict=True):
            assert a.tokens == b.tokens and a.stats == b.stats

    def test_long_context_speculation_is_bitwise_plain_decoding(self, runtime, prefill, kernel):
        """Past ~200 cached tokens torch's SDPA made speculative logits drift from plain ones; with the
        attention kernel they stay identical at any length."""
        from quickdraft.verifiers.runtime import VerifyInput

        # About 830 tokens: four times the length where the drift began (longer prompts only cost time:
        # 2,200 tokens took two minutes here with bf16 prefill on a CPU without AMX).
        code = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(45))
        prompt = runtime.tokenize([{"role": "user", "content": code + "\nWhat does f17 return for x = 2?"}])
        assert len(prompt) > 800
        outs = {}
        for mode in ("plain", "spec"):
            known, hist, out, stats = 0, list(prompt), [], []
            while len(out) < 16:
                right = outs["plain"][0][len(out):len(out) + 5] if mode == "spec" else []
                tokens = [(right[0] + 1) % 49152, *right] if right else []
                parents = [-1, -1, *range(1, len(right))] if right else []
                r = runtime.verify(VerifyInput(f"sl-long-{mode}-{prefill}-{kernel}", known,
                                               hist[max(0, known - 16):known],
                                               hist[known:], tokens, parents, top_logprobs=2))
                known, hist = r.cached_len, hist + r.tokens
                out += r.tokens
                stats += r.stats
            outs[mode] = (out[:16], stats[:16])
        assert outs["spec"] == outs["plain"]

    def test_bf16_prefill_stays_close_to_fp32(self, runtime):
        """bf16 products in prefill move the logits a little, not the model's choices."""
        from quickdraft.verifiers.runtime import VerifyInput

        code = "\n".join(f"def g{i}(x):\n    return x + {i}" for i in range(60))
        prompt = runtime.tokenize([{"role": "user", "content": code + "\nWhat does g5 return for x = 1?"}])
        assert len(prompt) > 4 * small_linear.MAX_ROWS
        outs = {}
        saved = runtime.loaded.prefill_dtype
        # The fp32 kernels for the passes, so that the prefill's precision is the only difference.
        from quickdraft.verifiers.model_loader import set_decode_dtype

        saved_decode = runtime.loaded.decode_dtype
        set_decode_dtype(runtime.loaded, None)
        try:
            for dtype in (None, torch.bfloat16):
                runtime.loaded.prefill_dtype = dtype
                r = runtime.verify(VerifyInput(f"sl-prefill-{dtype}", 0, [], prompt, top_logprobs=5))
                outs[dtype] = r
        finally:
            runtime.loaded.prefill_dtype = saved
            set_decode_dtype(runtime.loaded, saved_decode)
        fp32, bf16 = outs[None].stats[0], outs[torch.bfloat16].stats[0]
        assert outs[None].tokens == outs[torch.bfloat16].tokens
        assert fp32.top_ids[:2] == bf16.top_ids[:2]
        assert max(abs(a - b) for a, b in zip(fp32.top_logprobs, bf16.top_logprobs, strict=True)) < 0.25


def test_prefill_precision_sends_large_calls_through_bf16_products():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    small_linear.install(torch.nn.Sequential(layer))
    x = torch.randn(small_linear.MAX_ROWS + 10, 64)
    with torch.inference_mode():
        fp32 = layer(x)
        with small_linear.prefill_precision(torch.bfloat16):
            bf16 = layer(x)
            small = layer(x[:4])   # at most MAX_ROWS rows: the fp32 kernel as always
            with small_linear.invariant():
                forced = layer(x)  # a verification pass: fp32 kernel whatever its size
    assert bf16.dtype == torch.float32
    assert torch.equal(bf16, torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(),
                                                        layer.bias.bfloat16()).float())
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)
    assert torch.equal(small, small_linear.linear(x[:4], layer.weight, layer.bias))
    assert torch.equal(forced, small_linear.linear(x, layer.weight, layer.bias))
    assert layer.state_dict().keys() == {"weight", "bias"}


def test_decode_dtype_choice():
    from quickdraft.verifiers.model_loader import pick_decode_dtype

    assert pick_decode_dtype(211, "float32") is None
    assert pick_decode_dtype(0, "bfloat16") is None      # no kernel installed (CUDA, a bf16 model)
    assert pick_decode_dtype(211, "bfloat16") is torch.bfloat16
    assert pick_decode_dtype(211, "auto") is (torch.bfloat16 if small_linear.bf16_isa() else None)
    with pytest.raises(ValueError, match="decode dtype"):
        pick_decode_dtype(211, "fp8")


def test_prefill_dtype_choice():
    from quickdraft.verifiers.model_loader import pick_prefill_dtype

    cpu = torch.device("cpu")
    assert pick_prefill_dtype(cpu, torch.float32, "float32") is None
    assert pick_prefill_dtype(cpu, torch.float32, "bfloat16") is torch.bfloat16
    assert pick_prefill_dtype(cpu, torch.float32, "auto") is (torch.bfloat16 if small_linear.bf16_isa() else None)
    assert pick_prefill_dtype(cpu, torch.bfloat16, "bfloat16") is None          # a bf16 model is bf16 anyway
    assert pick_prefill_dtype(torch.device("cuda"), torch.float32, "bfloat16") is None
    with pytest.raises(ValueError, match="prefill dtype"):
        pick_prefill_dtype(cpu, torch.float32, "fp8")


def test_the_linear_kernel_benchmark_reports_time_and_bandwidth_per_shape_and_rows():
    from quickdraft.bench.linear_kernel import measure

    kernels = ["fp32"] + (["bf16"] if small_linear.bf16_isa() is not None else [])
    for kind in kernels:
        result = measure([(64, 48), (40, 17)], [1, 3], kind, threads=1, repeats=1)
        assert [(p["shape"], p["rows"]) for p in result["points"]] == [("64x48", 1), ("64x48", 3), ("40x17", 1),
                                                                       ("40x17", 3)]
        assert all(p["us"] > 0 and p["weight_gb_per_s"] > 0 for p in result["points"])
        assert result["kernel"].startswith(kind)


def test_the_attention_kernel_benchmark_times_the_fp32_and_bf16_kernels_beside_sdpa():
    from quickdraft.bench.attention_kernel import measure

    result = measure([64, 600], [1, 4], threads=1, repeats=1)
    assert result["isa"] == _kernels.attention_isa()
    bf16 = small_linear.bf16_attention_isa()
    assert result["bf16_isa"] == (None if bf16 == "auto" else bf16)
    assert [(p["context"], p["rows"]) for p in result["points"]] == [(64, 1), (64, 4), (600, 1), (600, 4)]
    for point in result["points"]:
        assert point["kernel_us"] > 0 and point["sdpa_us"] > 0
        assert ("bf16_us" in point) == (result["bf16_isa"] is not None)
