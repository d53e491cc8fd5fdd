"""The GGUF blocks a model's fp32 weights were expanded from, found again from the weights alone.

A model converted from a GGUF file holds fp32 weights that are exact expansions of 4- or 8-bit
blocks of 32 (SmolLM2's projections are Q4_1, its embedding Q8_0). A verification pass scores a
few rows, so its time is mostly the weights streaming from memory; held as their blocks (0.75 or
1.125 bytes a weight instead of 4), they stream 3.5-5x fewer bytes, and the kernel expands each
weight to the very fp32 value the model holds right before its product, so a pass's results are
bit for bit those of the fp32 weights. A weight that is not such an expansion (trained or
fine-tuned since, or another quantization) is left as it is: ``find_blocks`` returns None.

The search needs no GGUF reader: a Q4_1 block's smallest weight is its minimum ``m`` (q = 0)
and its largest is ``m + 15 d`` as quantizers write it, so ``d`` is one of a few fp16 values;
each candidate is kept only where expanding it gives back every weight bit for bit.
"""

from __future__ import annotations

import os
import pathlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

Q4_1 = 1
Q8_0 = 2
BLOCK = 32
# fp16 neighbours of the scale estimated from the block's extremes, tried in this order.
ULP_STEPS = (0, -1, 1, -2, 2)


@dataclass(frozen=True, slots=True)
class BlockWeight:
    """An [N, K] weight as blocks of 32 along K, in the layout ``_kernels.linear_quant`` reads."""

    format: int                  # Q4_1 or Q8_0
    qs: torch.Tensor             # Q4_1: uint8 [N, K/32, 16], byte j = weight j | weight j + 16 << 4; Q8_0: int8 [N, K]
    d: torch.Tensor              # fp32 [N, K/32]
    m: torch.Tensor | None       # Q4_1: fp32 [N, K/32]
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)


def _fp16_steps(estimate: np.ndarray, step: int) -> np.ndarray:
    """fp32 values of the fp16 numbers ``step`` units in the last place from ``estimate`` (>= 0)."""
    bits = estimate.astype(np.float16).view(np.uint16).astype(np.int32) + step
    return np.clip(bits, 0, 0x7BFF).astype(np.uint16).view(np.float16).astype(np.float32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.view(np.uint32) == b.view(np.uint32)).all(axis=1)


def _expand_q4_1(d: np.ndarray, q: np.ndarray, m: np.ndarray) -> np.ndarray:
    """As gguf expands Q4_1 to fp32: d * q (exact: an fp16 scale times a 4-bit code), then + m, rounded."""
    return (d * q) + m


def _expand_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """As gguf expands Q8_0 to fp32: q * d (exact: an 8-bit code times an fp16 scale)."""
    return q * d


def _search(blocks: np.ndarray, estimate: np.ndarray, expand) -> tuple[np.ndarray, np.ndarray] | None:
    """(scales, codes) that ``expand`` back to ``blocks`` bit for bit, trying the fp16 scales next to
    ``estimate``; None where some block has none."""
    scales = np.zeros(len(blocks), np.float32)
    codes = np.zeros(blocks.shape, np.float32)
    todo = np.arange(len(blocks))
    for step in ULP_STEPS:
        d = _fp16_steps(estimate[todo], step)
        q, back = expand(blocks[todo], d, todo)
        ok = _same_bits(back, blocks[todo])
        scales[todo[ok]], codes[todo[ok]] = d[ok], q[ok]
        todo = todo[~ok]
        if not len(todo):
            return scales, codes
    return None


def _q4_1(w: np.ndarray) -> BlockWeight | None:
    n, k = w.shape
    blocks = w.reshape(-1, BLOCK)
    low = blocks.min(axis=1)
    if not np.array_equal(low.astype(np.float16).astype(np.float32), low):
        return None

    def expand(b: np.ndarray, d: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = low[rows, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d[:, None] > 0, np.rint((b - m) / d[:, None]), 0.0).clip(0, 15).astype(np.float32)
        return q, _expand_q4_1(d[:, None], q, m)

    found = _search(blocks, (blocks.max(axis=1) - low) / np.float32(15), expand)
    if found is None:
        return None
    d, q = found
    q = q.astype(np.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    packed = q[:, :, 0, :] | (q[:, :, 1, :] << 4)
    return BlockWeight(Q4_1, torch.from_numpy(np.ascontiguousarray(packed)),
                       torch.from_numpy(d.reshape(n, k // BLOCK)), torch.from_numpy(low.reshape(n, k // BLOCK)),
                       (n, k))


def _q8_0(w: np.ndarray) -> BlockWeight | None:
    n, k = w.shape
    blocks = w.reshape(-1, BLOCK)

    def expand(b: np.ndarray, d: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d[:, None] > 0, np.rint(b / d[:, None]), 0.0).clip(-128, 127).astype(np.float32)
        return q, _expand_q8_0(q, d[:, None])

    found = _search(blocks, np.abs(blocks).max(axis=1) / np.float32(127), expand)
    if found is None:
        return None
    d, q = found
    return BlockWeight(Q8_0, torch.from_numpy(q.astype(np.int8).reshape(n, k)),
                       torch.from_numpy(d.reshape(n, k // BLOCK)), None, (n, k))


def find_blocks(weight: torch.Tensor) -> BlockWeight | None:
    """The Q4_1 or Q8_0 blocks that expand to this 2-d fp32 CPU weight bit for bit, or None. The format
    is the one that fits the first rows; one block that fits no candidate leaves the whole weight fp32."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu" \
            or weight.shape[1] % BLOCK or not weight.numel():
        return None
    w = weight.detach().contiguous().numpy()
    probe = w[: min(len(w), 8)]  # the format, from a few rows, before the whole weight is searched
    for fmt in (_q4_1, _q8_0):
        if fmt(probe) is not None:
            return fmt(w)
    return None


def expand(blocks: BlockWeight, rows: np.ndarray) -> np.ndarray:
    """The fp32 weight rows ``rows`` that ``blocks`` expand to."""
    d = blocks.d.numpy()[rows][:, :, None]
    if blocks.format == Q4_1:
        packed = blocks.qs.numpy()[rows]
        q = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float32)
        w = _expand_q4_1(d, q, blocks.m.numpy()[rows][:, :, None])
    else:
        q = blocks.qs.numpy()[rows].reshape(len(rows), -1, BLOCK).astype(np.float32)
        w = _expand_q8_0(q, d)
    return w.reshape(len(rows), -1)


def _well_formed(b: BlockWeight) -> bool:
    n, k = b.shape
    qs_shape, qs_dtype = ((n, k // BLOCK, BLOCK // 2), torch.uint8) if b.format == Q4_1 else ((n, k), torch.int8)
    return (b.format in (Q4_1, Q8_0) and tuple(b.qs.shape) == qs_shape and b.qs.dtype == qs_dtype
            and tuple(b.d.shape) == (n, k // BLOCK) and b.d.dtype == torch.float32
            and (b.m is None) == (b.format == Q8_0)
            and (b.m is None or (tuple(b.m.shape) == (n, k // BLOCK) and b.m.dtype == torch.float32)))


def expands_to(blocks: BlockWeight, weight: torch.Tensor) -> bool:
    """Whether ``blocks`` (from a cache) expand to ``weight``, every row bit for bit: a cache of
    another model or an older conversion fails this (about 0.4 s for SmolLM2, against 2.4 s to search)."""
    if tuple(weight.shape) != blocks.shape or weight.dtype != torch.float32 or not _well_formed(blocks):
        return False
    w = weight.detach().contiguous().numpy()
    for start in range(0, len(w), 4096):  # a slice at a time: the head's expansion alone is 113 MB
        rows = np.arange(start, min(start + 4096, len(w)))
        if not _same_bits(expand(blocks, rows), w[rows]).all():
            return False
    return True


def save(path: pathlib.Path, found: Mapping[str, BlockWeight], stamp: str) -> None:
    """Write ``found`` (by layer name) to ``path`` (safetensors), marked with ``stamp``, atomically."""
    from safetensors.torch import save_file

    tensors, meta = {}, {"stamp": stamp}
    for name, b in found.items():
        tensors[f"{name}.qs"], tensors[f"{name}.d"] = b.qs, b.d
        if b.m is not None:
            tensors[f"{name}.m"] = b.m
        meta[name] = str(b.format)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: pathlib.Path, stamp: str) -> dict[str, BlockWeight]:
    """What ``save`` wrote to ``path`` if it carries ``stamp``; empty if not, or if the file is missing or
    damaged (whatever it holds is checked again against the weights before use: ``expands_to``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("stamp") != stamp:
                return {}
            out = {}
            for name, fmt in meta.items():
                if name == "stamp":
                    continue
                qs, d = f.get_tensor(f"{name}.qs"), f.get_tensor(f"{name}.d")
                m = f.get_tensor(f"{name}.m") if int(fmt) == Q4_1 else None
                out[name] = BlockWeight(int(fmt), qs, d, m, (d.shape[0], d.shape[1] * BLOCK))
            return out
    except Exception:  # safetensors reports a damaged file as a bare SafetensorError
        return {}
