"""The soak benchmark: memory sampled from the proxy's metrics while sessions run, and its flatness rule."""

from __future__ import annotations

import json

import pytest
from conftest import trace_files
from test_cli_and_replay import quickdraft

from quickdraft.bench.soak import flatness

MB = 2**20


def test_flatness_ignores_warm_up_and_catches_growth():
    warm_then_flat = [100 * MB + i * 50 * MB for i in range(10)] + [600 * MB] * 30
    assert flatness(warm_then_flat)["flat"] is True
    leaking = [1000 * MB + i * 20 * MB for i in range(40)]  # 20 MB per sample, forever
    result = flatness(leaking)
    assert result["flat"] is False and result["growth_mb"] > 64
    assert flatness([1.0] * 5)["flat"] is None  # too short to say


@pytest.mark.model
def test_a_short_soak_samples_proxy_and_worker_memory(proxy_address, http_base, tmp_path):
    out = tmp_path / "soak.json"
    done = quickdraft("bench", "soak", *map(str, trace_files(3)), "--proxy", proxy_address, "--sessions", "3",
                      "--duration-s", "20", "--sample-s", "1", "--max-new-tokens", "16",
                      "--metrics-url", http_base.removesuffix("/v1") + "/metrics", "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["requests"] >= 3 and data["failed_requests"] == 0
    assert len(data["samples"]) >= 10
    assert data["memory"]["proxy"]["flat"] is not None
    workers = [k for k in data["memory"] if k.startswith("worker") and k.endswith("resident")]
    assert workers and all(data["memory"][w]["max_mb"] > 100 for w in workers)
    assert isinstance(data["memory_flat"], bool)
