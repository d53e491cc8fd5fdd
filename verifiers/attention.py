"""Attention for verification passes: grouped-query attention without copying the KV cache.

transformers' SDPA path expands the key/value heads of a grouped-query model
(``repeat_kv``) whenever a mask is given and more than one query is scored,
which copies the session's whole KV cache in every layer of every verification
pass. Here the query heads that share a key/value head are folded into the
query-length dimension instead, and the mask is repeated along it, so SDPA reads
the cache in place. Registered as attention implementation ``quickdraft_sdpa``.

A prefill chunk that continues a cached prefix sees every cached position and,
causally, its own: with an explicit mask SDPA's CPU kernel pays for reading the
mask and cannot skip the masked half of the chunk's own block. Such a chunk is
computed as two mask-free flash passes (the cached prefix, then the chunk's own
causal block) merged by their log-sum-exp, which is exact up to rounding and
about a third faster at agent context lengths (bench/RESULTS.md). A sliding-window
layer's chunk reads only the keys its window reaches, not the whole cache. Under
``small_linear.prefill_precision(bf16)`` a prefill chunk's attention runs in bf16 too: the cached prefix
(most of the work) by a kernel of ours, on AMX tiles where the CPU has them (1.3-1.7 times torch's bf16
flash kernel, and no cast of the whole cache every layer) and with vdpbf16ps where it has AVX-512 BF16
without them (1.6-1.9 times torch's fp32 flash kernel there). Either kernel masks the chunk's own block
in the same call, so nothing is merged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from quickdraft.verifiers import invariant_attention, small_linear
from quickdraft.verifiers.batching import packed_attention
from quickdraft.verifiers.small_linear import _kernels

# Whether the bf16 prefix kernel runs on this CPU, and on AMX tiles.
_BF16_PREFIX = _kernels is not None and _kernels.prefill_attention_bf16_supported()
_TILES_PREFIX = _BF16_PREFIX and _kernels.prefill_attention_tiles_supported()

NAME = "quickdraft_sdpa"
# The model's keyword argument that carries a PackedPlan down to every attention call.
PLAN_KWARG = "qd_plan"
# The model's keyword argument that marks a pass as a plain causal prefill chunk after the cache.
CAUSAL_CHUNK_KWARG = "qd_causal_chunk"


def bf16_prefix_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tiles: bool = False) -> bool:
    """Whether ``bf16_prefix_attention`` takes this call: fp32 CPU tensors of one sequence, a head
    dimension of a multiple of 64, and a CPU with AVX-512 BF16 (with ``tiles``: AMX, heads of at most 256)."""
    return (_BF16_PREFIX and query.device.type == "cpu" and query.dtype == torch.float32
            and key.dtype == torch.float32 and value.dtype == torch.float32 and key.device.type == "cpu"
            and query.shape[0] == 1 and query.shape[-1] % 64 == 0
            and (not tiles or _TILES_PREFIX and query.shape[-1] <= 256))


def bf16_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          scale: float | None, tiles: bool = False,
                          causal_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query [1, heads, q_len, dim] over every key of key/value [1, kv_heads, k_len, dim]
    (views into the cache are fine), products in bf16 (``csrc/prefill_attention_bf16.h``, or on AMX tiles
    ``csrc/prefill_attention_amx.h``); returns the output [1, heads, q_len, dim] and its log-sum-exp
    [1, heads, q_len], in fp32, as torch's flash kernel. With ``causal_from`` P, the keys are
    P cached positions followed by the chunk itself, and the chunk's position i sees keys up to P + i."""
    _, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    q, key, value = invariant_attention.kernel_operands(query, key, value)
    out = torch.empty((1, heads, q_len, dim), dtype=torch.float32)
    lse = torch.empty((1, heads, q_len), dtype=torch.float32)
    _kernels.prefill_attention_bf16(q.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                    heads, kv_heads, q_len, k_len, dim, key.stride(1), key.stride(2),
                                    value.stride(1), value.stride(2), dim ** -0.5 if scale is None else scale,
                                    torch.get_num_threads(), tiles, -1 if causal_from is None else causal_from)
    return out, lse


def causal_chunk_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_rep: int, scaling: float | None
) -> torch.Tensor:
    """Attention of a chunk of new positions over the cached prefix and, causally, over itself.

    ``key``/``value`` hold the prefix followed by the chunk (as the cache does after its update);
    returns (batch, heads, q_len, dim).
    """
    batch, heads, q_len, dim = query.shape
    past = key.shape[2] - q_len
    out_dtype = query.dtype
    lowp = small_linear.prefill_dtype()
    if lowp is not None and lowp != query.dtype:
        # A kernel of ours takes the whole chunk where one runs, the cached prefix (most of the work) and the
        # chunk's own block masked causally in the same call: on AMX tiles, faster than torch's bf16 flash
        # kernel and no cast of the whole cache every layer; without AMX, where torch's bf16 flash is slower
        # than its fp32 one (AVX-512 BF16, 300 new positions over 6,600 cached: 1.36 s against 0.97 s for 30
        # layers), the vdpbf16ps kernel (bench/RESULTS.md).
        tiles = small_linear.fast_bf16_cpu()
        if lowp == torch.bfloat16 and bf16_prefix_applies(query, key, value, tiles):
            out, _ = bf16_prefix_attention(query, key, value, scaling, tiles, causal_from=past)
            return out.to(out_dtype)
        if tiles:  # no kernel of ours for this call: all of it in torch's bf16
            query, key, value = query.to(lowp), key.to(lowp), value.to(lowp)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    own_k, own_v = key[:, :, past:], value[:, :, past:]
    if n_rep > 1:  # the chunk's own block is small: expand its key/value heads rather than fold queries
        own_k, own_v = own_k.repeat_interleave(n_rep, 1), own_v.repeat_interleave(n_rep, 1)
    out_own, lse_own = flash(query, own_k, own_v, 0.0, True, scale=scaling)
    if past == 0:
        return out_own.to(out_dtype)
    folded = query.reshape(batch, heads // n_rep, n_rep * q_len, dim)
    out_past, lse_past = flash(folded, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scaling)
    out_past = out_past.reshape(batch, heads, q_len, dim)
    lse_past = lse_past.reshape(batch, heads, q_len)
    top = torch.maximum(lse_past, lse_own)
    w_past = torch.exp(lse_past - top).unsqueeze(-1)
    w_own = torch.exp(lse_own - top).unsqueeze(-1)
    # The log-sum-exps are fp32 whatever the query's dtype: merge in fp32, hand back the caller's.
    return ((out_past * w_past + out_own * w_own) / (w_past + w_own)).to(out_dtype)


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    plan = kwargs.get(PLAN_KWARG)
    if plan is not None:  # several sessions packed into one pass (verifiers/batching.py)
        return packed_attention(module, query, plan, dropout, scaling), None
    n_rep = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    window = getattr(module, "sliding_window", None)
    if kwargs.get(CAUSAL_CHUNK_KWARG) and window and attention_mask is not None:
        # A sliding-window layer's queries see only the last `window` positions: the cache keeps
        # every position (for rollback), but a prefill chunk need not read the older ones.
        first = max(0, key.shape[2] - q_len - window + 1)
        key, value, attention_mask = key[:, :, first:], value[:, :, first:], attention_mask[:, :, :, first:]
    if kwargs.get(CAUSAL_CHUNK_KWARG) and not window and query.device.type == "cpu" and dropout == 0.0:
        out = causal_chunk_attention(query, key, value, n_rep, scaling)
    elif attention_mask is None:
        # Plain causal prefill from an empty cache: SDPA handles the grouping itself.
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, scale=scaling, is_causal=q_len > 1, enable_gqa=n_rep > 1
        )
    elif invariant_attention.applies(query, key, attention_mask, dropout):
        # A verification pass on CPU: every row computed as plain decoding computes it.
        return invariant_attention.attention(query, key, value, attention_mask, scaling), None
    else:
        if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
            attention_mask = attention_mask.to(query.dtype)
        mask = attention_mask[:, :, :, : key.shape[2]]
        if n_rep > 1:
            query = query.reshape(batch, heads // n_rep, n_rep * q_len, dim)
            mask = mask.repeat(1, 1, n_rep, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
        out = out.reshape(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)
