"""Attention for verification passes: grouped-query attention without copying the KV cache.

transformers' SDPA path expands the key/value heads of a grouped-query model
(``repeat_kv``) whenever a mask is given and more than one query is scored,
which copies the session's whole KV cache in every layer of every verification
pass. Here the query heads that share a key/value head are folded into the
query-length dimension instead, and the mask is repeated along it, so SDPA reads
the cache in place. Registered as attention implementation ``quickdraft_sdpa``.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from quickdraft.verifiers import invariant_attention
from quickdraft.verifiers.batching import packed_attention

NAME = "quickdraft_sdpa"
# The model's keyword argument that carries a PackedPlan down to every attention call.
PLAN_KWARG = "qd_plan"


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
    if attention_mask is None:
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
