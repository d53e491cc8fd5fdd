"""The batch-invariant attention kernel against torch's SDPA, per layer, on one model's attention
shapes (default SmolLM2-135M: 9 query heads over 3 kv heads of 64): median µs of one call over
a cached context, for a plain decoding row and for a draft of 9 rows::

    python -m quickdraft.bench.attention_kernel --contexts 1024,4096,8192 --rows 1,9

The kernel runs the vector path this CPU has (``_kernels.attention_isa()``: avx512, avx2 or scalar).
Where the CPU multiplies bf16 (``small_linear.bf16_attention_isa()``: AMX tiles or AVX-512 BF16), the
bf16 kernel that a bf16 model's passes take is timed beside it (``bf16_us``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from quickdraft.verifiers import _kernels, small_linear


def _kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, threads: int,
            isa: str = "auto") -> torch.Tensor:
    heads, q_len, dim = q.shape
    kv_heads, k_len, _ = k.shape
    out = torch.empty(q_len, heads, dim)
    _kernels.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), heads, kv_heads,
                       q_len, k_len, dim, k.stride(0), k.stride(1), v.stride(0), v.stride(1), mask.stride(0),
                       dim ** -0.5, threads, isa)
    return out


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def measure(contexts: list[int], rows: list[int], heads: int = 9, kv_heads: int = 3, dim: int = 64,
            threads: int = 2, repeats: int = 30) -> dict:
    torch.set_num_threads(threads)
    bf16 = small_linear.bf16_attention_isa()
    out = {"isa": _kernels.attention_isa(), "bf16_isa": None if bf16 == "auto" else bf16, "threads": threads,
           "heads": heads, "kv_heads": kv_heads, "dim": dim, "points": []}
    for context in contexts:
        for n in rows:
            q = torch.randn(heads, n, dim)
            k, v = torch.randn(kv_heads, context, dim), torch.randn(kv_heads, context, dim)
            mask = torch.ones(n, context, dtype=torch.bool)
            kernel = _median_us(partial(_kernel, q, k, v, mask, threads), repeats)
            sdpa = _median_us(partial(F.scaled_dot_product_attention, q[None], k[None], v[None], attn_mask=mask,
                                      enable_gqa=True), repeats)
            point = {"context": context, "rows": n, "kernel_us": round(kernel), "sdpa_us": round(sdpa)}
            if out["bf16_isa"]:
                point["bf16_us"] = round(_median_us(partial(_kernel, q, k, v, mask, threads, bf16), repeats))
            out["points"].append(point)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("::")[0])
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--rows", default="1,9")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(json.dumps(measure([int(x) for x in a.contexts.split(",")], [int(x) for x in a.rows.split(",")],
                             threads=a.threads), indent=1))


if __name__ == "__main__":
    main()
