"""Batch-invariant attention for CPU verification passes (kernel: ``csrc/attention.h``).

torch's SDPA blocks keys and rows by the shape of the call and sums the masked
keys' zeros between the visible ones, so a draft node's output moves in the last
bits with its siblings and with the pass's row count, and speculation drifts from
plain decoding by about 1e-6 in the logits. The kernel gives every query row the
same operations over the keys it sees, in cache order, whatever else is in the
call; with the linear kernel (``small_linear.py``) it makes a verification pass's
logits and KV bitwise those of plain decoding. A row's keys are cut into fixed segments of 512
(counted in the row's own keys), merged by their log-sum-exp in order: threads split a long
context by segment, so one row's pass uses both cores and a draft's rows read each segment of
K and V once (at a 6.7k-token context, 30 layers: 1 row 28.8 -> 23.5 ms, 5 rows 47.7 -> 29.3 ms).

It runs inside ``small_linear.invariant()`` (the runtime's verification passes) on
fp32 CPU tensors with a boolean mask, where the CPU has AVX-512 or AVX2 with FMA (its
portable path is the reference the tests check both against, too slow to serve);
everywhere else the caller keeps SDPA. Inside ``invariant(bf16=True)`` (a model on the bf16 linear
kernel) the same segments take their two products in bf16: on AMX tiles where the CPU has them
(``csrc/attention_amx.h``: a draft's extra rows then cost little more than the softmax), else with
AVX-512 BF16 (``csrc/attention_bf16.h``: twice the fp32 kernel's products per instruction, a draft row
about 0.6-0.75 of its fp32 cost on Zen 4).
"""

from __future__ import annotations

import torch

from quickdraft.verifiers import small_linear
from quickdraft.verifiers.small_linear import _kernels

_VECTOR = _kernels is not None and _kernels.attention_isa() in ("avx512", "avx2")


def applies(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float) -> bool:
    """Whether this attention call takes the kernel."""
    return (_VECTOR and small_linear.forced() and mask is not None and mask.dtype == torch.bool
            and dropout == 0.0 and query.dtype == torch.float32 and key.dtype == torch.float32
            and query.device.type == "cpu" and query.shape[0] == 1 and query.shape[-1] % 64 == 0)


def kernel_operands(query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the C++ attention kernels read: the one sequence's queries contiguous, and keys and values
    whose dimensions are contiguous (a view into the KV cache stays a view)."""
    q = query[0].contiguous()
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    return q, key, value


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
              scale: float | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) v for query [1, heads, q_len, dim] over key/value [1, kv_heads, k_len, dim]
    (views into a KV cache are fine) and a boolean mask [1, 1, q_len, >= k_len]; returns [1, q_len, heads, dim]
    (written into ``out`` when given)."""
    _, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    q, key, value = kernel_operands(query, key, value)
    rows = mask[0, 0]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if out is None:
        out = torch.empty((1, q_len, heads, dim), dtype=torch.float32)
    _kernels.attention(q.data_ptr(), key.data_ptr(), value.data_ptr(), rows.data_ptr(), out.data_ptr(),
                       heads, kv_heads, q_len, k_len, dim, key.stride(1), key.stride(2), value.stride(1),
                       value.stride(2), rows.stride(0), dim ** -0.5 if scale is None else scale,
                       torch.get_num_threads(), small_linear.attention_isa())
    return out
