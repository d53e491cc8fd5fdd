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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

try:
    from quickdraft.verifiers import _kernels
except ImportError:  # an install without the compiled extension: plain torch everywhere
    _kernels = None

# Unforced calls with up to this many rows use the kernel. At 32-64 rows it is as fast as
# torch here, and above that torch's GEMM is compute-efficient enough that it wins.
MAX_ROWS = 64

_state = threading.local()


def available() -> bool:
    return _kernels is not None


def isa() -> str | None:
    """The kernel's instruction set on this CPU (avx512, avx2, scalar), None without the extension."""
    return _kernels.isa() if _kernels is not None else None


def forced() -> bool:
    """Whether this thread is inside ``invariant()``."""
    return getattr(_state, "forced", False)


@contextlib.contextmanager
def invariant() -> Iterator[None]:
    """Every installed linear layer called in this block (on this thread) uses the kernel, and so
    does attention where it can (``invariant_attention.py``)."""
    previous = getattr(_state, "forced", False)
    _state.forced = True
    try:
        yield
    finally:
        _state.forced = previous


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           threads: int | None = None) -> torch.Tensor:
    """``F.linear`` through the kernel: contiguous fp32 CPU tensors, no autograd."""
    if _kernels is None:
        raise RuntimeError("quickdraft.verifiers._kernels is not built")
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    flat = x.reshape(rows, in_features).contiguous()
    y = torch.empty((*x.shape[:-1], out_features), dtype=torch.float32)
    _kernels.linear(flat.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                    rows, out_features, in_features, threads or torch.get_num_threads())
    return y


class InvariantLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) that takes the kernel when it may."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled() \
                and (rows <= MAX_ROWS or forced()):
            return linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _eligible(module: nn.Module) -> bool:
    weight, bias = module.weight, module.bias
    return (type(module) is nn.Linear and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.is_contiguous() and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))


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
