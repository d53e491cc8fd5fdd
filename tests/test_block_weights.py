"""Weights held as the GGUF blocks they were expanded from: found again from the fp32 weights alone,
and the kernel's sums on them are bit for bit its sums on the fp32 weights, on every instruction set."""

import numpy as np
import pytest
import torch

from quickdraft.verifiers import _kernels, exact_quant, small_linear
from quickdraft.verifiers.exact_quant import Q4_1, Q8_0, find_blocks


def expanded_q4_1(n, k, seed):
    """An fp32 weight as gguf expands Q4_1 blocks: fp16 scale and minimum per 32, codes 0-15."""
    rng = np.random.default_rng(seed)
    d = (rng.random((n, k // 32)) * 0.02).astype(np.float16).astype(np.float32)
    m = (-rng.random((n, k // 32)) * 0.1).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, k // 32, 32)).astype(np.float32)
    q[:, :, 0], q[:, :, 1] = 0, 15  # a quantizer's block holds its minimum and its maximum
    w = d[..., None] * q + m[..., None]
    return torch.from_numpy(np.ascontiguousarray(w.reshape(n, k), dtype=np.float32))


def expanded_q8_0(n, k, seed):
    rng = np.random.default_rng(seed)
    d = (rng.random((n, k // 32)) * 0.01).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (n, k // 32, 32)).astype(np.float32)
    q[:, :, 0] = 127
    return torch.from_numpy(np.ascontiguousarray((q * d[..., None]).reshape(n, k), dtype=np.float32))


def fp32_kernel(x, w, b, isa, threads=2):
    y = torch.empty(x.shape[0], w.shape[0])
    _kernels.linear(x.data_ptr(), w.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(),
                    x.shape[0], w.shape[0], x.shape[1], threads, isa)
    return y


@pytest.mark.parametrize("make,fmt", [(expanded_q4_1, Q4_1), (expanded_q8_0, Q8_0)])
@pytest.mark.parametrize("shape", [(192, 576), (37, 1536), (5, 32)])
def test_block_sums_are_the_fp32_sums_to_the_bit_on_every_instruction_set(make, fmt, shape):
    n, k = shape
    w = make(n, k, seed=n + k)
    blocks = find_blocks(w)
    assert blocks is not None and blocks.format == fmt and blocks.shape == shape
    assert blocks.nbytes < w.numel() * 4 * (0.3 if fmt == Q8_0 else 0.2)
    gen = torch.Generator().manual_seed(k)
    x, b = torch.randn(70, k, generator=gen), torch.randn(n, generator=gen)
    isas = _kernels.supported_isas()
    assert "scalar" in isas
    for isa in isas:
        for bias in (None, b):
            for rows in (1, 2, 3, 4, 5, 9, 16, 17, 70):  # one tile, and several reading one expansion
                for threads in (1, 2):
                    want = fp32_kernel(x[:rows], w, bias, isa, threads)
                    got = small_linear.linear_blocks(x[:rows], blocks, bias, threads, isa)
                    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (isa, rows, threads)


def test_weights_that_are_no_block_expansion_keep_their_fp32_path():
    gen = torch.Generator().manual_seed(3)
    assert find_blocks(torch.randn(64, 576, generator=gen)) is None        # trained, not quantized
    w = expanded_q4_1(64, 576, seed=1)
    nudged = w.clone()
    nudged[40, 100] = torch.nextafter(nudged[40, 100], torch.tensor(1.0))  # one weight off by one ulp
    assert find_blocks(nudged) is None
    assert find_blocks(expanded_q4_1(64, 576, seed=1)[:, :560].contiguous()) is None  # not whole blocks
    assert find_blocks(w.double()) is None and find_blocks(w[0]) is None


def test_installed_layers_read_their_blocks_and_can_be_switched_back():
    net = torch.nn.Sequential(torch.nn.Linear(576, 192), torch.nn.Linear(192, 64, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(expanded_q4_1(192, 576, seed=4))  # the second keeps its trained weights
    assert small_linear.install(net) == 2
    layers, nbytes, found = small_linear.use_block_weights(net)
    assert layers == 1 and nbytes == exact_quant.find_blocks(net[0].weight).nbytes and list(found) == ["0"]
    x = torch.randn(3, 576)
    with torch.no_grad():
        on = net(x)
        assert small_linear.use_block_weights(net, on=False) == (0, 0, {})
        assert torch.equal(net(x), on)
        # A weight changed since the search is searched again, not read from stale blocks.
        net[0].weight.mul_(2.0)
        assert small_linear.use_block_weights(net)[:2] == (1, nbytes)
        assert torch.equal(net[0](x), fp32_kernel(x, net[0].weight, net[0].bias, "auto"))


def test_bad_block_arguments_are_refused():
    blocks = find_blocks(expanded_q8_0(8, 64, seed=2))
    x, y = torch.randn(2, 64), torch.empty(2, 8)
    with pytest.raises(ValueError, match="unknown weight format"):
        _kernels.linear_quant(x.data_ptr(), blocks.qs.data_ptr(), blocks.d.data_ptr(), 0, 0, y.data_ptr(),
                              2, 8, 64, 7, 1, "auto")
    with pytest.raises(ValueError, match="whole blocks"):
        _kernels.linear_quant(x.data_ptr(), blocks.qs.data_ptr(), blocks.d.data_ptr(), 0, 0, y.data_ptr(),
                              2, 8, 48, Q8_0, 1, "auto")


@pytest.mark.model
def test_smollm2_passes_read_gguf_blocks_and_give_the_fp32_weights_bits():
    """Every projection of SmolLM2 (Q4_1) and its tied head (Q8_0) is found; a verification pass with a
    draft gives the same tokens, log-probabilities and entropies with the blocks as with the fp32 weights."""
    from quickdraft.verifiers.model_loader import load_model
    from quickdraft.verifiers.runtime import ModelRuntime, VerifyInput

    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m", decode_dtype="float32")
    layers = [m for m in loaded.model.modules() if isinstance(m, small_linear.InvariantLinear)]
    found = [m.__dict__.get("_blocks_on") for m in layers]
    assert all(b is not None for b in found) and len(found) == 30 * 7 + 1
    assert sum(b.format == Q8_0 for b in found) == 1 and found[-1].format == Q8_0  # the head
    runtime = ModelRuntime(loaded, kv_budget_bytes=1 << 30)
    prompt = runtime.tokenize([{"role": "user", "content": "Write a Python function that reverses a list."}])

    def passes(key):
        first = runtime.verify(VerifyInput(key, 0, [], prompt, top_logprobs=4))
        history, known = prompt + first.tokens, first.cached_len
        draft = [first.tokens[0], 13, 198, 2]  # rows beside the real one, right or wrong
        second = runtime.verify(VerifyInput(key, known, history[max(0, known - 16):known], history[known:], draft,
                                            [-1, 0, 0, 1], top_logprobs=4))
        return first.tokens + second.tokens, first.stats + second.stats

    with_blocks = passes("blocks")
    small_linear.use_block_weights(loaded.model, on=False)
    try:
        assert passes("fp32") == with_blocks
    finally:
        small_linear.use_block_weights(loaded.model)


def test_a_worker_start_reads_the_blocks_it_cached_and_a_new_conversion_searches_again(tmp_path, monkeypatch):
    from quickdraft.verifiers import model_loader

    (tmp_path / "model.safetensors").write_bytes(b"weights of one conversion")
    net = torch.nn.Sequential(torch.nn.Linear(576, 192), torch.nn.Linear(192, 64))
    with torch.no_grad():
        net[0].weight.copy_(expanded_q4_1(192, 576, seed=5))
        net[1].weight.copy_(expanded_q8_0(64, 192, seed=6))
    small_linear.install(net)
    assert model_loader._use_block_weights(net, str(tmp_path))[0] == 2
    cache = tmp_path / model_loader.BLOCKS_CACHE
    assert cache.exists()

    searched = []
    monkeypatch.setattr(exact_quant, "find_blocks", lambda w: searched.append(w) or None)
    fresh = torch.nn.Sequential(torch.nn.Linear(576, 192), torch.nn.Linear(192, 64))
    fresh.load_state_dict(net.state_dict())
    small_linear.install(fresh)
    assert model_loader._use_block_weights(fresh, str(tmp_path))[0] == 2 and not searched  # read, not searched
    x = torch.randn(5, 576)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))

    # Cached blocks that no longer expand to a layer's weight are not used for it.
    other = torch.nn.Sequential(torch.nn.Linear(576, 192), torch.nn.Linear(192, 64))
    with torch.no_grad():
        other[0].weight.copy_(expanded_q4_1(192, 576, seed=7))
    small_linear.install(other)
    assert model_loader._use_block_weights(other, str(tmp_path))[0] == 0 and len(searched) == 2

    # Another conversion (the weights file changed): the cache is not even read.
    (tmp_path / "model.safetensors").write_bytes(b"weights of a later conversion, longer")
    assert exact_quant.load(cache, "a stamp it was not written with") == {}
    again = torch.nn.Sequential(torch.nn.Linear(576, 192), torch.nn.Linear(192, 64))
    again.load_state_dict(net.state_dict())
    small_linear.install(again)
    assert model_loader._use_block_weights(again, str(tmp_path))[0] == 0 and len(searched) == 4


def test_a_damaged_or_unwritable_cache_never_stops_a_worker_start(tmp_path, monkeypatch, caplog):
    from quickdraft.verifiers import model_loader

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / model_loader.BLOCKS_CACHE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{trunc")
    net = torch.nn.Sequential(torch.nn.Linear(576, 64))
    with torch.no_grad():
        net[0].weight.copy_(expanded_q4_1(64, 576, seed=8))
    small_linear.install(net)
    assert model_loader._use_block_weights(net, str(tmp_path))[0] == 1  # searched, and the cache rewritten
    assert set(exact_quant.load(tmp_path / model_loader.BLOCKS_CACHE, model_loader.weights_stamp(tmp_path))) == {"0"}

    def refuse(*args):
        raise RuntimeError("Error while serializing: no space left on device")

    monkeypatch.setattr(exact_quant, "save", refuse)
    (tmp_path / "model.safetensors").write_bytes(b"weights of another conversion")
    fresh = torch.nn.Sequential(torch.nn.Linear(576, 64))
    fresh.load_state_dict(net.state_dict())
    small_linear.install(fresh)
    assert model_loader._use_block_weights(fresh, str(tmp_path))[0] == 1
    assert "could not cache the GGUF blocks" in caplog.text
    assert not list(tmp_path.glob("*.tmp*"))


def test_q4_1_blocks_without_their_minimums_are_refused():
    blocks = find_blocks(expanded_q4_1(8, 64, seed=9))
    x, y = torch.randn(2, 64), torch.empty(2, 8)
    with pytest.raises(ValueError, match="minimums"):
        _kernels.linear_quant(x.data_ptr(), blocks.qs.data_ptr(), blocks.d.data_ptr(), 0, 0, y.data_ptr(),
                              2, 8, 64, Q4_1, 1, "auto")
