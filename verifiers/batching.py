"""One forward pass over the verification steps of many sessions ("packed" batching).

Sessions differ in cached length, new tokens and draft tree, and each keeps its own
KV cache. Padding them into one rectangular batch would copy every session's
cache in every pass, so instead their tokens are packed into one sequence: the
linear layers (most of a small model's cost, and what gets cheaper per token
with more rows) run once over all of them, while attention runs per session
over that session's own cache with that session's own tree mask. RoPE follows
each token's own position id, so packing changes nothing a token computes.

The model sees a ``PackedCache`` whose layers append each session's slice of the
new keys and values to that session's cache, and the attention function
(``verifiers/attention.py``) receives the ``PackedPlan`` through the model's
keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from quickdraft.verifiers import invariant_attention


@dataclass(slots=True)
class PackedItem:
    cache: Cache                 # the session's own cache (GrowableLayer per model layer)
    start: int                   # offset of its tokens in the packed sequence
    length: int                  # new context tokens + draft nodes
    mask: torch.Tensor           # [1, 1, length, past + length] bool: tree mask over its cache
    sliding_mask: torch.Tensor | None = None  # the same for local-attention layers


@dataclass(slots=True)
class PackedPlan:
    items: list[PackedItem]

    @property
    def total(self) -> int:
        return sum(item.length for item in self.items)


class _PackedLayer(DynamicLayer):
    """Routes each session's slice of the new keys/values into that session's cache."""

    def __init__(self, plan: PackedPlan, layer_idx: int) -> None:
        super().__init__()
        self.plan = plan
        self.layer_idx = layer_idx
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        for item in self.plan.items:
            end = item.start + item.length
            item.cache.layers[self.layer_idx].update(key_states[:, :, item.start:end],
                                                     value_states[:, :, item.start:end])
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0


class PackedCache(Cache):
    def __init__(self, plan: PackedPlan, num_layers: int) -> None:
        super().__init__(layers=[_PackedLayer(plan, i) for i in range(num_layers)])


def packed_attention(module: torch.nn.Module, query: torch.Tensor, plan: PackedPlan, dropout: float,
                     scaling: float | None) -> torch.Tensor:
    """Attention of each session's queries over its own cache; returns [1, tokens, heads, dim]."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    batch, heads, total, dim = query.shape
    layer = module.layer_idx
    sliding = bool(getattr(module, "is_sliding", False))
    if invariant_attention.applies(query, query, plan.items[0].mask, dropout):
        # Each session's rows written in place, computed exactly as if the session were alone.
        out = torch.empty((1, total, heads, dim), dtype=query.dtype)
        for item in plan.items:
            cache_layer = item.cache.layers[layer]
            mask = item.sliding_mask if sliding and item.sliding_mask is not None else item.mask
            end = item.start + item.length
            invariant_attention.attention(query[:, :, item.start:end], cache_layer.keys, cache_layer.values, mask,
                                          scaling, out[:, item.start:end])
        return out
    outs = []
    for item in plan.items:
        cache_layer = item.cache.layers[layer]
        key, value = cache_layer.keys, cache_layer.values
        q = query[:, :, item.start:item.start + item.length]
        mask = item.sliding_mask if sliding and item.sliding_mask is not None else item.mask
        mask = mask[:, :, :, : key.shape[2]]
        if n_rep > 1:
            q = q.reshape(batch, heads // n_rep, n_rep * item.length, dim)
            mask = mask.repeat(1, 1, n_rep, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                               scale=scaling)
        outs.append(out.reshape(batch, heads, item.length, dim))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()
