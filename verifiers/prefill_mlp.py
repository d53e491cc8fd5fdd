"""A bf16 prefill chunk's MLP in three calls (kernel: ``csrc/act_mul_bf16.h``).

Inside ``small_linear.prefill_precision(torch.bfloat16)`` a gated MLP, ``down(act(gate(x)) * up(x))``,
cast x to bf16 twice, multiplied gate and up separately, cast both products back to fp32, took the
activation and the product in fp32 and cast the result to bf16 again for ``down``: the element-wise
steps cost about as much as the three matrix products. Here x is cast once, gate and up are one product
against their weights stacked (a bf16 copy, made on first use), ``act(gate) * up`` is one pass from bf16 to
bf16, and only ``down``'s output returns to fp32.

The values are those of the unfused bf16 path up to the activation's last bits (one bf16 step on rare
elements), and prefill is the same pass with speculation on and off, so nothing in the lossless comparison
changes. Verification passes (``invariant()``), small calls and fp32 prefill keep the model's own forward.

``install`` takes a model's MLPs whose gate, up and down are installed linear layers without bias and whose
activation is SiLU or GELU's tanh form (checked on values, whatever transformers names the class), and
checks on each MLP that the fused path gives its forward's result before routing it there.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from quickdraft.verifiers import small_linear
from quickdraft.verifiers.small_linear import MAX_ROWS, InvariantLinear, _kernels

log = logging.getLogger(__name__)

SILU, GELU_TANH = 0, 1


def supported() -> bool:
    """Whether the fused kernel runs on this CPU (AVX-512 BF16, which every CPU that prefills in bf16 by
    default has)."""
    return _kernels is not None and _kernels.act_mul_bf16_supported()


def act_mul_bf16(gate: torch.Tensor, up: torch.Tensor, act: int, isa: str = "auto") -> torch.Tensor:
    """``act(gate) * up`` over 2-d bf16 tensors whose rows are contiguous (views of a wider product are fine),
    computed in fp32 and rounded once to bf16. ``isa="reference"`` runs the kernel's plain C++ definition."""
    if gate.dtype != torch.bfloat16 or up.dtype != torch.bfloat16 or gate.shape != up.shape or gate.dim() != 2:
        raise ValueError(f"act_mul_bf16 takes two bf16 matrices of one shape, not {gate.dtype} {tuple(gate.shape)} "
                         f"and {up.dtype} {tuple(up.shape)}")
    if gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("act_mul_bf16 needs each row's elements contiguous")
    rows, cols = gate.shape
    out = torch.empty((rows, cols), dtype=torch.bfloat16)
    _kernels.act_mul_bf16(gate.data_ptr(), up.data_ptr(), out.data_ptr(), rows, cols, gate.stride(0), up.stride(0),
                          cols, act, torch.get_num_threads(), isa)
    return out


def _activation_kind(act_fn: nn.Module) -> int | None:
    """SILU or GELU_TANH if ``act_fn`` computes one of them (to within fp32 rounding), else None."""
    x = torch.linspace(-12.0, 12.0, 4097)
    with torch.no_grad():
        try:
            y = act_fn(x)
        except Exception:  # an activation that takes something else: not ours to fuse
            return None
    silu = F.silu(x)
    gelu = F.gelu(x, approximate="tanh")
    for kind, want in ((SILU, silu), (GELU_TANH, gelu)):
        if y.shape == want.shape and torch.allclose(y, want, rtol=1e-5, atol=1e-6):
            return kind
    return None


STACKED = "_gate_up_bf16"  # where gate_proj keeps the stacked bf16 copy (small_linear.InvariantLinear.derived)


def _stacked_bf16(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[gate; up] in bf16, cast half by half (no fp32 copy of both)."""
    out = torch.empty((gate.shape[0] + up.shape[0], gate.shape[1]), dtype=torch.bfloat16)
    out[: gate.shape[0]].copy_(gate.detach())
    out[gate.shape[0]:].copy_(up.detach())
    return out


class PrefillMLP(nn.Module):
    """Mixed into a gated MLP's class (``install``): bf16 prefill chunks take the fused path."""

    _qd_act: int

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Fused exactly where gate and up would each be a bf16 prefill product of an fp32 input.
        if (not args and not kwargs and x.dtype == torch.float32
                and small_linear.prefill_call_dtype(x) == torch.bfloat16 and not self._projection_hooks()):
            return self.fused_forward(x)
        return super().forward(x, *args, **kwargs)

    def _projection_hooks(self) -> bool:
        """Whether a hook watches gate, up or down (the fused path would skip their calls)."""
        return any(p._forward_hooks or p._forward_pre_hooks for p in (self.gate_proj, self.up_proj, self.down_proj))

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        width = gate.out_features
        stacked = gate.derived(STACKED, lambda: _stacked_bf16(gate.weight, up.weight),
                               up.weight.data_ptr(), up.weight._version)
        rows = x.reshape(-1, x.shape[-1])
        both = F.linear(rows.to(torch.bfloat16), stacked)
        h = act_mul_bf16(both[:, :width], both[:, width:], self._qd_act)
        down_weight, down_bias = down._weights_in(torch.bfloat16)
        return F.linear(h, down_weight, down_bias).to(x.dtype).reshape(*x.shape[:-1], down.out_features)


def _fusable(module: nn.Module) -> int | None:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, InvariantLinear) and p.bias is None for p in parts[:2]) \
            or not isinstance(parts[2], InvariantLinear):
        return None
    if parts[0].weight.shape != parts[1].weight.shape or parts[2].in_features != parts[0].out_features:
        return None
    act_fn = getattr(module, "act_fn", None)
    return _activation_kind(act_fn) if isinstance(act_fn, nn.Module) else None


def _agrees(module: nn.Module) -> bool:
    """Whether the fused path gives this MLP's own bf16 forward (its structure is the gated one we assume);
    an MLP whose forward fails on a plain [rows, hidden] input does not agree."""
    x = torch.randn(MAX_ROWS + 7, module.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), small_linear.prefill_precision(torch.bfloat16):
            mine = module.fused_forward(x)
            theirs = super(PrefillMLP, module).forward(x)
    except Exception:
        return False
    finally:
        # The unfused forward left bf16 copies of gate and up that the fused path never reads.
        for proj in (module.gate_proj, module.up_proj):
            proj.__dict__.pop("_lowp", None)
    scale = float(theirs.abs().max()) or 1.0
    return mine.shape == theirs.shape and float((mine - theirs).abs().max()) <= 2 ** -6 * scale


def install(model: nn.Module) -> int:
    """Route the model's gated MLPs' bf16 prefill chunks through the fused path; returns how many.
    Nothing changes where the kernel does not run, or for an MLP of another shape."""
    if not supported():
        return 0
    count = 0
    classes: dict[type, type] = {}
    for module in model.modules():
        if isinstance(module, PrefillMLP):
            continue
        act = _fusable(module)
        if act is None:
            continue
        base = type(module)
        if base not in classes:
            classes[base] = type(f"Prefill{base.__name__}", (PrefillMLP, base), {})
        module.__class__ = classes[base]
        module._qd_act = act
        # Each module checked (a few ms): its forward may depend on more than its class.
        if not _agrees(module):
            log.warning("a %s does not compute down(act(gate(x)) * up(x)); its prefill keeps the unfused path",
                        base.__name__)
            module.__class__ = base
            del module._qd_act
            module.gate_proj.__dict__.pop(STACKED, None)
            module.down_proj.__dict__.pop("_lowp", None)
            continue
        count += 1
    return count
