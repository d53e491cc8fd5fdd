"""The bf16 prefix kernel (``verifiers/csrc/prefill_attention_bf16.h``, and where AMX runs its tile version
``prefill_attention_amx.h``) against torch's flash attention, in fp32 and in bf16, on one model's attention
shapes (default SmolLM2-135M: 9 query heads over 3 kv heads of 64): median ms of one layer's attention of a
prefill chunk over the cached prefix, and each result's largest difference from fp32 flash::

    python -m quickdraft.bench.prefill_attention_kernel --shapes 300x6600,1024x4096

``QxK``: Q new positions over K cached keys. The kernel needs AVX-512 BF16.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from quickdraft.bench.attention_kernel import _median_us
from quickdraft.verifiers.attention import bf16_prefix_applies, bf16_prefix_attention


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _, heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    folded = q.reshape(1, kv_heads, heads // kv_heads * q_len, dim).to(dtype)
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(folded, k.to(dtype), v.to(dtype), 0.0, False,
                                                                      scale=dim ** -0.5)[0]
    return out.float().reshape(1, heads, q_len, dim)


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
        k = torch.randn(1, kv_heads, k_len + 256, dim)[:, :, :k_len]
        v = torch.randn(1, kv_heads, k_len + 256, dim)[:, :, :k_len]
        if not bf16_prefix_applies(q, k, v):
            raise SystemExit("the bf16 prefix kernel does not run on this CPU (it needs AVX-512 BF16)")
        out["points"].append(_point(q, k, v, repeats))
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
