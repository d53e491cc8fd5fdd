"""A worker keeps freed tensor memory for reuse (verifiers/heap.py): no page faults for the next
pass's temporaries. Each case runs in a child process, since malloc's settings are process-wide."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys

import pytest

from quickdraft.verifiers import heap

# The temporaries of four layers of a bf16 prefill chunk of 1,024 positions (SmolLM2's widths): the
# input cast, gate and up in bf16, cast up, multiplied, cast down, the residual sum.
CHILD = """
import ctypes, json, resource, sys, torch
from quickdraft.verifiers import heap
torch.set_num_threads(1)  # no thread pool starting (and faulting its stacks in) half-way
tuned = heap.keep_freed_memory(int(sys.argv[1])) if int(sys.argv[1]) else None
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
first = torch.ones(1024 * 1024)  # 4 MB: in the heap (below its end), or a mapping of its own far above
in_heap = first.data_ptr() < libc.sbrk(0)
del first
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
print(json.dumps({"tuned": tuned, "in_heap": in_heap, "faults": faults}))
"""


def _run(keep_mb: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(keep_mb)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_freed_temporaries_are_reused_without_page_faults():
    if platform.libc_ver()[0] != "glibc":  # the thresholds are glibc's: elsewhere it says no and changes nothing
        assert _run(256)["tuned"] is False
        return
    plain, tuned = _run(0), _run(256)
    assert tuned["tuned"] is True
    # A block of a few MB comes from the heap, where a freed one stays for the next request; with the C
    # library's defaults the first such block is a mapping of its own, returned to the kernel on free.
    assert tuned["in_heap"] and not plain["in_heap"]
    # Once the heap holds a round's blocks, later rounds find them there: no fresh pages (the median
    # round; a stray fault of the interpreter's own may land anywhere). (How many rounds fault with the
    # defaults depends on glibc's sliding thresholds and on transparent huge pages: not asserted.)
    assert statistics.median(tuned["faults"][2:]) == 0, tuned


def test_a_size_of_nothing_is_refused():
    with pytest.raises(ValueError, match="positive"):
        heap.keep_freed_memory(0)
