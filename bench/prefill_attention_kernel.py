"""The bf16 prefix kernel (``verifiers/csrc/prefill_attention_bf16.h``, and where AMX runs its tile version
``prefill_attention_amx.h``) against torch's flash attention, in fp32 and in bf16, on one model's attention
shapes (default SmolLM2-135M: 9 query heads over 3 kv heads of 64): median ms of one layer's attention of a
prefill chunk over the cached prefix, and each result's largest difference from fp32 flash::

    python -m quickdraft.bench.prefill_attention_kernel --shapes 300x6600,1024x4096

``QxK``: Q new positions over K cached keys. The kernel needs AVX-512 BF16.

The ``chunk_*`` figures take the chunk's own keys too (K cached, then the Q new ones): ``chunk_causal`` is
the model's path, one kernel call with the causal limit (tiles where AMX runs), and ``chunk_merged`` the path
before it, the kernel over the cached keys and torch's flash over the chunk's own block (bf16 on AMX, fp32
without) merged by their log-sum-exp; their differences are from the same merge done in fp32.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from quickdraft.bench.attention_kernel import _median_us
from quickdraft.verifiers.attention import bf16_prefix_applies, bf16_prefix_attention


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _flash_lse(q.to(dtype), k.to(dtype), v.to(dtype))[0].float()


def _own_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's causal flash over the chunk's own keys (heads expanded, as the model's old path did)."""
    n_rep = q.shape[1] // k.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.to(dtype), k.repeat_interleave(n_rep, 1).to(dtype), v.repeat_interleave(n_rep, 1).to(dtype), 0.0, True,
        scale=q.shape[-1] ** -0.5)[:2]
    return out.float(), lse


def _merge(past: tuple[torch.Tensor, torch.Tensor], own: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    (out_p, lse_p), (out_o, lse_o) = past, own
    top = torch.maximum(lse_p, lse_o)
    w_p, w_o = torch.exp(lse_p - top)[..., None], torch.exp(lse_o - top)[..., None]
    return (out_p * w_p + out_o * w_o) / (w_p + w_o)


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's flash attention over every key, query heads folded onto their kv head; output and lse."""
    _, heads, q_len, dim = q.shape
    folded = q.reshape(1, k.shape[1], heads // k.shape[1] * q_len, dim)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(folded, k, v, 0.0, False,
                                                                          scale=dim ** -0.5)[:2]
    return out.reshape(1, heads, q_len, dim), lse.reshape(1, heads, q_len)


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> dict:
    """A whole prefill chunk's attention: q after the k_len - q_len cached keys of k and v."""
    past = k.shape[2] - q.shape[2]
    tiles = bf16_prefix_applies(q, k, v, tiles=True)
    cached, own = (k[:, :, :past], v[:, :, :past]), (k[:, :, past:], v[:, :, past:])
    reference = _merge(_flash_lse(q, *cached), _own_block(q, *own, torch.float32))
    paths = {
        "chunk_causal": lambda: bf16_prefix_attention(q, k, v, None, tiles, causal_from=past)[0],
        "chunk_merged": lambda: _merge(bf16_prefix_attention(q, *cached, None, tiles),
                                       _own_block(q, *own, torch.bfloat16 if tiles else torch.float32)),
    }
    point = {}
    for name, fn in paths.items():
        point[f"{name}_ms"] = round(_median_us(fn, repeats) / 1e3, 2)
        point[f"{name}_max_diff"] = float((fn() - reference).abs().max())
    point["chunk_causal_vs_merged"] = round(point["chunk_merged_ms"] / point["chunk_causal_ms"], 2)
    return point


def _point(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> dict:
    reference = _flash(q, k, v, torch.float32)
    point = {"q_len": q.shape[2], "k_len": k.shape[2]}
    paths = [("kernel", partial(lambda q, k, v: bf16_prefix_attention(q, k, v, None)[0], q, k, v))]
    if bf16_prefix_applies(q, k, v, tiles=True):
        paths.append(("kernel_tiles", partial(lambda q, k, v: bf16_prefix_attention(q, k, v, None, True)[0], q, k, v)))
    paths += [("flash_fp32", partial(_flash, q, k, v, torch.float32)),
              ("flash_bf16", partial(_flash, q, k, v, torch.bfloat16))]
    for name, fn in paths:
        point[f"{name}_ms"] = round(_median_us(fn, repeats) / 1e3, 2)
        point[f"{name}_max_diff"] = float((fn() - reference).abs().max())
    point["kernel_vs_flash_fp32"] = round(point["flash_fp32_ms"] / point["kernel_ms"], 2)
    if "kernel_tiles_ms" in point:  # where AMX runs, torch's bf16 kernel is the one to beat
        point["kernel_tiles_vs_flash_bf16"] = round(point["flash_bf16_ms"] / point["kernel_tiles_ms"], 2)
    return point


def measure(shapes: list[tuple[int, int]], heads: int = 9, kv_heads: int = 3, dim: int = 64, threads: int = 2,
            repeats: int = 7) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(shapes, heads, kv_heads, dim, threads, repeats)
    finally:
        torch.set_num_threads(before)


def _measure(shapes: list[tuple[int, int]], heads: int, kv_heads: int, dim: int, threads: int,
             repeats: int) -> dict:
    torch.manual_seed(0)
    out = {"threads": threads, "heads": heads, "kv_heads": kv_heads, "dim": dim, "points": []}
    for q_len, k_len in shapes:
        q = torch.randn(1, heads, q_len, dim)
        # Views into a longer cache, as a model's layers hand them over.
        cache_k, cache_v = (torch.randn(1, kv_heads, k_len + q_len + 256, dim) for _ in range(2))
        k, v = cache_k[:, :, :k_len], cache_v[:, :, :k_len]
        if not bf16_prefix_applies(q, k, v):
            raise SystemExit("the bf16 prefix kernel does not run on this CPU (it needs AVX-512 BF16)")
        point = _point(q, k, v, repeats)
        point.update(_chunk(q, cache_k[:, :, :k_len + q_len], cache_v[:, :, :k_len + q_len], repeats))
        out["points"].append(point)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("::")[0])
    ap.add_argument("--shapes", default="300x6600,1024x4096", help="QxK pairs, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    print(json.dumps(measure(shapes, threads=a.threads), indent=1))


if __name__ == "__main__":
    main()
