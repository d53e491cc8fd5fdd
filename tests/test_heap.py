"""A worker keeps freed tensor memory for reuse (verifiers/heap.py): no page faults for the next
pass's temporaries. Each case runs in a child process, since malloc's settings are process-wide."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from quickdraft.verifiers import heap

# The temporaries of four layers of a bf16 prefill chunk of 1,024 positions (SmolLM2's widths): the
# input cast, gate and up in bf16, cast up, multiplied, cast down, the residual sum.
CHILD = """
import json, resource, sys, torch
from quickdraft.verifiers import heap
torch.set_num_threads(1)  # no thread pool starting (and faulting its stacks in) half-way
tuned = heap.keep_freed_memory(int(sys.argv[1])) if int(sys.argv[1]) else None
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(1024, 576)
    for layer in range(4):
        xb = x.bfloat16()
        g = torch.empty(1024, 1536, dtype=torch.bfloat16).fill_(1)
        u = torch.empty(1024, 1536, dtype=torch.bfloat16).fill_(1)
        gf, uf = g.float(), u.float()
        del g, u
        h = gf * uf
        del gf, uf
        hb = h.bfloat16()
        del h
        y = torch.empty(1024, 576).fill_(1)
        del hb, xb
        x = x + y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _run(keep_mb: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(keep_mb)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_freed_temporaries_are_reused_without_page_faults():
    plain, tuned = _run(0), _run(256)
    assert tuned["tuned"] is True
    # Once the heap holds a round's blocks, later rounds find them there: no fresh pages (the median
    # round; a stray fault of the interpreter's own may land anywhere). With the C library's defaults,
    # blocks go back to the kernel and are faulted in again round after round.
    assert statistics.median(tuned["faults"][2:]) == 0, tuned
    assert statistics.median(plain["faults"][2:]) > 1000, plain


def test_a_size_of_nothing_is_refused():
    with pytest.raises(ValueError, match="positive"):
        heap.keep_freed_memory(0)
