"""Verifying a draft tree against the target's distributions, losslessly.

The draft arrives as token ids in topological order with parent indices (-1 for
children of the root, the last context token). All nodes are scored in one
forward pass: each node attends to the cached context, to the new context
tokens, and to its own ancestors; its position is the context end plus its
depth.

Acceptance walks from the root. At each node the target's next token is chosen
exactly as plain decoding would choose it (argmax when greedy; a sample from the
processed distribution otherwise); if a child carries that token the walk
descends, otherwise that token is the bonus and the walk stops. The emitted
token at every position is therefore the target's own choice, whatever the draft
held: its distribution is exactly the target's, and greedy output is token for
token the plain greedy output. For drafts that are point proposals (each node one
token, as every drafter here sends) this is what speculative sampling's rejection
rule, applied to the siblings one after another, reduces to, and it accepts as
often.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quickdraft.proto.sampling import is_greedy


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)


@dataclass(frozen=True, slots=True)
class TokenStats:
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]
    entropy: float


def node_depths(parents: Sequence[int]) -> list[int]:
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def tree_inputs(
    past: int, n_new: int, parents: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [1, q], boolean attention mask [1, 1, q, past + q]) for new tokens + draft."""
    m = len(parents)
    q = n_new + m
    depths = node_depths(parents)
    positions = list(range(past, past + n_new)) + [past + n_new - 1 + d for d in depths]
    mask = torch.zeros((q, past + q), dtype=torch.bool)
    mask[:, :past] = True
    mask[:, past : past + n_new] = _new_block(q, n_new)
    for j, parent in enumerate(parents):
        row = n_new + j
        mask[row, past + row] = True
        if parent >= 0:
            mask[row, past + n_new : past + q] |= mask[n_new + parent, past + n_new : past + q]
    pos = torch.tensor([positions], dtype=torch.long, device=device)
    return pos, mask.to(device)[None, None]


def sliding_window_mask(mask: torch.Tensor, positions: torch.Tensor, past: int, window: int) -> torch.Tensor:
    """The tree mask for local-attention layers: a query sees a key only if their positions are
    less than ``window`` apart (the cached context's positions are its indices; a draft node's
    position is the context end plus its depth)."""
    pos = positions[0]
    keys = torch.cat([torch.arange(past, device=pos.device), pos])
    near = (pos[:, None] - keys[None, :]) < window
    return mask & near[None, None]


def _new_block(q: int, n_new: int) -> torch.Tensor:
    """Visibility of the new context tokens: causal among themselves, all of them for draft rows."""
    block = torch.ones((q, n_new), dtype=torch.bool)
    block[:n_new] = torch.ones((n_new, n_new), dtype=torch.bool).tril()
    return block


def processed_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution plain sampling draws from (temperature, top-k, top-p applied)."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= sampling.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return torch.softmax(scores, dim=-1)


def position_uniform(seed: int, position: int) -> float:
    """The uniform draw for one output position: fixed by (seed, position) alone, so a
    seeded request samples the same tokens whether or not drafts were accepted."""
    return random.Random(hash((seed, position))).random()


def choose_token(logits: torch.Tensor, sampling: Sampling, uniform: float) -> int:
    if sampling.greedy:
        return int(torch.argmax(logits))
    cdf = processed_probs(logits, sampling).cumsum(-1)
    # Inverse-CDF sampling; the clamp guards against a last cumulative value just below 1.
    return int(min(torch.searchsorted(cdf, torch.tensor([uniform * float(cdf[-1])], device=cdf.device)).item(),
                   cdf.shape[-1] - 1))


def accept_walk(
    logits: torch.Tensor,
    tokens: Sequence[int],
    parents: Sequence[int],
    sampling: Sampling,
    seed: int = 0,
    position: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Walk the tree. ``logits[0]`` scores the root, ``logits[1 + j]`` scores node j;
    ``position`` is the sequence position of the first token to emit.

    Returns (emitted tokens: accepted nodes' tokens then the bonus, accepted node
    indices, logits row of each emitted token's distribution).
    """
    children: dict[tuple[int, int], int] = {}
    for j, (tok, parent) in enumerate(zip(tokens, parents, strict=True)):
        children.setdefault((parent, tok), j)
    node, emitted, accepted, rows = -1, [], [], []
    while True:
        row = node + 1
        uniform = 0.0 if sampling.greedy else position_uniform(seed, position + len(emitted))
        nxt = choose_token(logits[row], sampling, uniform)
        emitted.append(nxt)
        rows.append(row)
        child = children.get((node, nxt))
        if child is None:
            return emitted, accepted, rows
        accepted.append(child)
        node = child


def token_stats(logits: torch.Tensor, k: int) -> list[TokenStats]:
    """Top-k log-probabilities and entropy of each row (temperature 1). Row by row: torch sums
    one row in another order when it reduces several at once, and a position's figures must not
    depend on how many draft rows shared its pass."""
    out = []
    for row in logits.float():
        logp = torch.log_softmax(row, dim=-1)
        entropy = -(logp.exp() * logp).sum()
        top = torch.topk(logp, k)
        out.append(TokenStats(tuple(top.indices.tolist()), tuple(top.values.tolist()), float(entropy)))
    return out
