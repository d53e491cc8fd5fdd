"""The batch-invariant linear kernels alone: median µs of one call and the weight bytes it reads per
second, for weights that stay in cache and ones streamed from memory (default: SmolLM2's output layer
and a mid-sized weight)::

    python -m quickdraft.bench.linear_kernel --shapes 49152x576,8192x576 --rows 1,8

``--kernel bf16`` (default where the CPU multiplies bf16: AMX tiles or AVX-512 BF16) times
``linear_bf16`` on packed weights, ``fp32`` the fp32 kernel.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial

import torch

from quickdraft.bench.attention_kernel import _median_us
from quickdraft.verifiers import small_linear


def _repeat(fn: Callable[[], object], times: int) -> None:
    for _ in range(times):
        fn()


def measure(shapes: list[tuple[int, int]], rows: list[int], kernel: str, threads: int = 2,
            repeats: int = 9) -> dict:
    torch.set_num_threads(threads)
    out = {"kernel": kernel if kernel == "fp32" else f"bf16 ({small_linear.bf16_isa()})",
           "fp32_isa": small_linear.isa(), "threads": threads, "points": []}
    for n, k in shapes:
        w = torch.randn(n, k)
        packed = small_linear.pack_bf16(w) if kernel == "bf16" else None
        nbytes = packed.numel() * 2 if packed is not None else w.numel() * 4
        for m in rows:
            x = torch.randn(m, k)
            call = (partial(small_linear.linear_bf16, x, packed, n, threads=threads) if packed is not None
                    else partial(small_linear.linear, x, w, threads=threads))

            calls = max(1, 50_000 // n)  # short calls repeated, so the timer's cost does not count
            us = _median_us(partial(_repeat, call, calls), repeats) / calls
            out["points"].append({"shape": f"{n}x{k}", "rows": m, "us": round(us, 1),
                                  "weight_gb_per_s": round(nbytes / us / 1e3, 1)})
            print(json.dumps(out["points"][-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="49152x576,8192x576", help="weights as OUTxIN, comma-separated")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--kernel", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    kernel = a.kernel or ("bf16" if small_linear.bf16_isa() is not None else "fp32")
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    result = measure(shapes, [int(r) for r in a.rows.split(",")], kernel, a.threads)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
