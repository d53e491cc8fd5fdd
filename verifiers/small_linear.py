"""Batch-invariant linear layers for CPU verification passes (kernel: ``_kernels.cpp``).

Two things make the compiled kernel worth routing a model's ``nn.Linear`` calls to:

* **speed**: a verification pass scores 1 + a few draft tokens, and BLAS's GEMM at
  that size costs far more than one row (51 ms at 4 rows vs 30 ms at 1 for
  SmolLM2's weights); the kernel streams the weights once and keeps 1–16 rows
  near the cost of one;
* **losslessness**: its value for a row never depends on the other rows of the
  call, so a position computes the same logits and KV whether it is scored alone
  (speculation off), next to a draft, or packed with other sessions' tokens.

Which calls take it: any call with at most ``MAX_ROWS`` rows, and every call made
inside ``invariant()`` (the runtime's verification passes, whatever their size).
Larger calls outside it (prefill chunks) keep torch's GEMM, which is faster there.
The runtime arranges that a position is never computed by torch in one mode and by
the kernel in the other (see ``ModelRuntime._prefill_head``).

A model converted from GGUF can also hand the kernel its weights as the 4- or 8-bit blocks they
were expanded from (``use_block_weights``, ``exact_quant.py``): the same results bit for bit, at
a fraction of the bytes a pass streams.

On CPUs with AMX tiles or AVX-512 BF16 the kernel can also multiply in bf16
(``use_bf16_kernel``): the weights are packed once into bf16 tiles, so a pass streams half
the bytes, and its extra rows cost almost nothing on tiles and half the fp32 arithmetic with
AVX-512 BF16. Its rows are batch-invariant too, but not equal to the fp32 kernel's (nor the
tile kernel's to the vector one's), so a model uses one kernel for every pass.

Inside ``prefill_precision(torch.bfloat16)`` those large torch calls multiply in bf16
(activations and a bf16 copy of the weights, made on first use). Prefill chunks are the
same whether speculation is on or off, so this changes no comparison between the two; on
CPUs with AMX it makes a 1,024-token chunk's products several times faster.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from quickdraft.verifiers import exact_quant
from quickdraft.verifiers.exact_quant import BlockWeight

try:
    from quickdraft.verifiers import _kernels
except ImportError:  # an install without the compiled extension: plain torch everywhere
    _kernels = None

# Unforced calls with up to this many rows use the kernel. At 32-64 rows it is as fast as
# torch here, and above that torch's GEMM is compute-efficient enough that it wins.
MAX_ROWS = 64

_state = threading.local()
T = TypeVar("T")


def available() -> bool:
    return _kernels is not None


def isa() -> str | None:
    """The kernel's instruction set on this CPU (avx512, avx2, scalar), None without the extension."""
    return _kernels.isa() if _kernels is not None else None


def forced() -> bool:
    """Whether this thread is inside ``invariant()``."""
    return bool(getattr(_state, "forced", False))


@contextlib.contextmanager
def _thread_setting(name: str, value: object) -> Iterator[None]:
    previous = getattr(_state, name, None)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, previous)


@contextlib.contextmanager
def invariant(bf16: bool = False) -> Iterator[None]:
    """Every installed linear layer called in this block (on this thread) uses the kernel, and so
    does attention where it can (``invariant_attention.py``); with ``bf16`` (a model whose layers
    use ``use_bf16_kernel``) attention takes a bf16 kernel where the CPU has one
    (``bf16_attention_isa()``)."""
    with _thread_setting("forced", True), _thread_setting("attention_isa", bf16_attention_isa() if bf16 else None):
        yield


def attention_isa() -> str:
    """The attention kernel this thread's ``invariant()`` block asks for: ``amx`` (bf16 tiles),
    ``avx512_bf16`` (bf16 vector products) or ``auto`` (the fp32 kernel)."""
    return getattr(_state, "attention_isa", None) or "auto"


def prefill_precision(dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """Large calls outside ``invariant()`` in this block (on this thread) multiply in ``dtype``;
    None: in the layer's own dtype. Attention of prefill chunks follows it (``attention.py``)."""
    return _thread_setting("prefill_dtype", dtype)


def prefill_dtype() -> torch.dtype | None:
    """The dtype set by ``prefill_precision`` on this thread, None if none."""
    return getattr(_state, "prefill_dtype", None)


@functools.cache
def fast_bf16_cpu() -> bool:
    """Whether this CPU has AMX tiles, on which even attention's bf16 products pay (torch's bf16
    attention without them is slower than its fp32 one: bench/RESULTS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


@functools.cache
def amx_available() -> bool:
    """Whether the bf16 tile kernels (linear layers and attention) run here: a CPU with AMX and
    AVX-512 BF16, a Linux kernel that enables the tiles."""
    # The attention kernel's check includes the linear kernel's (the tiles and the OS permission).
    return _kernels is not None and _kernels.amx_attention_supported()


@functools.cache
def bf16_attention_isa() -> str:
    """The attention kernel of a bf16 model's verification passes here: ``amx`` (tiles) where the
    CPU has them, else ``avx512_bf16`` (vdpbf16ps) where it has AVX-512 BF16, else ``auto`` (fp32)."""
    if amx_available():
        return "amx"
    if _kernels is not None and _kernels.bf16_attention_supported():
        return "avx512_bf16"
    return "auto"


def bf16_isa() -> str | None:
    """The bf16 linear kernel this CPU runs: ``amx`` (tiles), ``avx512_bf16`` (vector dot products),
    or None where it has neither (or the extension is not built)."""
    if _kernels is None:
        return None
    try:
        return _kernels.bf16_linear_isa()
    except ValueError:
        return None


def _require_kernels() -> None:
    if _kernels is None:
        raise RuntimeError("quickdraft.verifiers._kernels is not built")


def _rows(x: torch.Tensor, in_features: int, out_features: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A call's input as contiguous rows, and its output buffer (fp32, x's leading shape)."""
    rows = x.numel() // in_features
    return rows, x.reshape(rows, in_features).contiguous(), torch.empty((*x.shape[:-1], out_features),
                                                                        dtype=torch.float32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           threads: int | None = None) -> torch.Tensor:
    """``F.linear`` through the kernel: contiguous fp32 CPU tensors, no autograd."""
    _require_kernels()
    out_features, in_features = weight.shape
    rows, flat, y = _rows(x, in_features, out_features)
    _kernels.linear(flat.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                    rows, out_features, in_features, threads or torch.get_num_threads())
    return y


def linear_blocks(x: torch.Tensor, blocks: BlockWeight, bias: torch.Tensor | None = None,
                  threads: int | None = None, isa: str = "auto") -> torch.Tensor:
    """``linear`` on the weight ``blocks`` expand to, bit for bit, reading only the blocks."""
    _require_kernels()
    out_features, in_features = blocks.shape
    rows, flat, y = _rows(x, in_features, out_features)
    _kernels.linear_quant(flat.data_ptr(), blocks.qs.data_ptr(), blocks.d.data_ptr(),
                          0 if blocks.m is None else blocks.m.data_ptr(), 0 if bias is None else bias.data_ptr(),
                          y.data_ptr(), rows, out_features, in_features, blocks.format,
                          threads or torch.get_num_threads(), isa)
    return y


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """An fp32 [out, in] weight in ``linear_bf16``'s packed bf16 tile layout (an int16 buffer)."""
    _require_kernels()
    if weight.dtype != torch.float32 or weight.dim() != 2:
        raise ValueError(f"pack_bf16 takes a 2-d fp32 weight, not {weight.dtype} {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    source = weight.detach().contiguous()  # held until the kernel has read it
    packed = torch.empty(_kernels.packed_bf16_elements(out_features, in_features), dtype=torch.int16)
    _kernels.pack_bf16(source.data_ptr(), packed.data_ptr(), out_features, in_features)
    return packed


def linear_bf16(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
                threads: int | None = None, isa: str = "auto") -> torch.Tensor:
    """``F.linear`` with x rounded to bf16 and a weight packed by ``pack_bf16``, accumulated in fp32.
    ``isa``: ``amx`` (tiles), ``avx512_bf16`` (vector dot products), ``auto`` (``bf16_isa()``), or
    ``reference`` (the same sums in plain C++, for tests; not bitwise either kernel's). A kernel this
    CPU cannot run is a ValueError."""
    _require_kernels()
    in_features = x.shape[-1]
    if packed.numel() != _kernels.packed_bf16_elements(out_features, in_features) or x.dtype != torch.float32:
        raise ValueError(f"linear_bf16: fp32 input and a weight packed for ({out_features}, {in_features}) expected")
    rows, flat, y = _rows(x, in_features, out_features)
    _kernels.linear_bf16(flat.data_ptr(), packed.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                         rows, out_features, in_features, threads or torch.get_num_threads(), isa)
    return y


def _kernel_call(x: torch.Tensor, rows: int) -> bool:
    """Whether an installed layer's call on ``x`` (``rows`` rows) takes the kernel."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled() \
        and (rows <= MAX_ROWS or forced())


def _prefill_lowp(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``prefill_precision`` sets for a torch call on ``x``, None: ``x``'s own."""
    lowp = prefill_dtype()
    if lowp is not None and lowp != x.dtype and not forced() and not torch.is_grad_enabled():
        return lowp
    return None


def prefill_call_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype an installed layer multiplies a call on ``x`` (its last dimension the features) in when
    the call is a prefill product in lower precision; None for a kernel call or one in ``x``'s dtype."""
    return None if _kernel_call(x, x.numel() // x.shape[-1]) else _prefill_lowp(x)


class InvariantLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) that takes the kernel when it may."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _kernel_call(x, x.numel() // self.in_features):
            packed = self.__dict__.get("_bf16_tiles")
            if packed is not None:
                return linear_bf16(x, packed, self.out_features, self.bias)
            blocks = self.__dict__.get("_blocks_on")
            if blocks is not None:
                return linear_blocks(x, blocks, self.bias)
            return linear(x, self.weight, self.bias)
        lowp = _prefill_lowp(x)
        if lowp is not None:
            weight, bias = self._weights_in(lowp)
            return F.linear(x.to(lowp), weight, bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def _weights_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.derived("_lowp", lambda: (self.weight.detach().to(dtype),
                                              None if self.bias is None else self.bias.detach().to(dtype)), dtype)

    def derived(self, name: str, make: Callable[[], T], *key: object) -> T:
        """A copy made from the weight (a bf16 copy, packed tiles), kept under ``name`` and made again
        once the weight (or ``key``) has changed since. A plain attribute, not a buffer: the state
        dict stays the model's own."""
        stamp = (self.weight.data_ptr(), self.weight._version, *key)
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != stamp:
            cached = self.__dict__[name] = (stamp, make())
        return cached[1]


def _eligible(module: nn.Module) -> bool:
    weight, bias = module.weight, module.bias
    return (type(module) is nn.Linear and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.is_contiguous() and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))


def use_bf16_kernel(model: nn.Module, on: bool = True) -> int:
    """Route the model's installed layers through the bf16 kernel (``on``) or back to the fp32
    one; returns how many layers changed. Weights are packed on the first switch (about 1 s for
    SmolLM2; the packed copy is half the fp32 weights' size) and kept for the next."""
    if on and bf16_isa() is None:
        raise RuntimeError("the bf16 kernel needs a CPU with AMX tiles or AVX-512 BF16 instructions; "
                           "use the fp32 kernel here")
    count = 0
    for module in model.modules():
        if isinstance(module, InvariantLinear):
            # The packed copy is kept across switches (made again if the weight has changed since);
            # _bf16_tiles, set only while the tiles are on, is what forward() reads.
            if on:
                packed = module.derived("_bf16_packed", lambda m=module: pack_bf16(m.weight))
                count += module.__dict__.get("_bf16_tiles") is not packed
                module.__dict__["_bf16_tiles"] = packed
            else:
                count += module.__dict__.pop("_bf16_tiles", None) is not None
    return count


def use_block_weights(model: nn.Module, on: bool = True,
                      known: Mapping[str, BlockWeight] | None = None) -> tuple[int, int, dict[str, BlockWeight]]:
    """Let the model's installed layers whose weights are exact expansions of GGUF blocks give the
    fp32 kernel those blocks instead (``on``), or the fp32 weights again. Returns the layers that now
    read blocks, the blocks' bytes, and the blocks by layer name. ``known`` (a cache of an earlier
    start, by layer name) is taken where it still expands to the weight; other weights are searched
    (about 2 s for SmolLM2). Results are the same bits either way: this changes no output, only a
    pass's memory traffic. Like the bf16 tiles, the blocks are those of the weights as they are now: call
    it again after changing a weight in place."""
    found: dict[str, BlockWeight] = {}
    for name, module in model.named_modules():
        if not isinstance(module, InvariantLinear):
            continue
        blocks = None
        if on:
            cached = (known or {}).get(name)
            blocks = module.derived("_blocks", lambda m=module, c=cached: c if c is not None and
                                    exact_quant.expands_to(c, m.weight) else exact_quant.find_blocks(m.weight))
        if blocks is None:
            module.__dict__.pop("_blocks_on", None)
        else:
            module.__dict__["_blocks_on"] = found[name] = blocks
    return len(found), sum(b.nbytes for b in found.values()), found


def install(model: nn.Module) -> int:
    """Route the model's fp32 CPU linear layers through the kernel; returns how many. Models on
    other devices or in other dtypes are left as they are."""
    if _kernels is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and _eligible(module):
            module.__class__ = InvariantLinear
            count += 1
    return count
