"""The command line: generated code freshness, oracle replay and live replay end to end."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, trace_files, trimmed_trace

ORACLE_KEYS = {"calls", "steps", "output_tokens", "mean_accepted_per_step", "tokens_per_step",
               "drafted_per_step", "draft_us_per_step", "prepare_ms_per_call"}
LIVE_KEYS = {"calls", "skipped_calls", "steps", "output_tokens", "tokens_per_step", "mean_accepted_per_step",
             "drafted_per_step", "ttft_ms_p50", "tokens_per_s_speculative", "tokens_per_s_plain", "speedup",
             "outputs_identical"}


def quickdraft(*args, timeout=900, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "quickdraft", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def test_generated_grpc_code_matches_the_proto():
    done = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_help_lists_every_command():
    out = quickdraft("--help").stdout
    listed = {line.strip("│ ").split()[0] for line in out.splitlines() if line.startswith("│ ") and line.strip("│ ")}
    assert {"up", "serve", "worker", "replay", "bench", "demo", "records"} <= listed


@pytest.mark.parametrize(("args", "needle"), [
    (["bench", "soak", "--sessions", ",", "--proxy", "127.0.0.1:1"], "--sessions takes positive numbers"),
    (["bench", "load", "--sessions", "8,x", "--proxy", "127.0.0.1:1"], "--sessions takes numbers"),
    (["bench", "e2e", "--text", "nope"], "unknown text 'nope'"),
    (["records", "migrate", "--database-url", "garbage"], "not a database URL"),
    # A dialect SQLAlchemy knows whose driver (mysqlclient) is not installed here.
    (["records", "migrate", "--database-url", "mysql://u@127.0.0.1/db"], "the driver for mysql:// is not installed"),
])
def test_bad_options_are_usage_errors_not_tracebacks(args, needle):
    done = quickdraft(*args, timeout=120, env={"COLUMNS": "200"})
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("drafter", ["suffix", "pld"])
def test_oracle_replay_writes_every_key(tmp_path, drafter):
    out = tmp_path / "out.json"
    done = quickdraft("replay", *map(str, trace_files(2)), "--oracle", "--drafter", drafter, "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert ORACLE_KEYS <= data.keys()
    assert data["calls"] > 20 and data["output_tokens"] > 1000
    assert data["tokens_per_step"] == pytest.approx(data["output_tokens"] / data["steps"], rel=1e-3)
    assert data["drafted_per_step"] <= 8
    # Copy-based drafting on agent traces beats one token per step by a wide margin.
    assert data["tokens_per_step"] > (1.8 if drafter == "suffix" else 1.2)


def test_oracle_replay_with_redis_shares_state_between_processes(tmp_path):
    """A second process pointed at the same Redis starts with what the first one learned."""
    import uuid

    import redis

    db = "redis://127.0.0.1:6379/0"
    prefix = f"qdtest-{uuid.uuid4().hex[:8]}"
    env_prefix = {"QUICKDRAFT_REDIS_PREFIX": prefix}
    files = list(map(str, trace_files(2)))
    try:
        figures = []
        for run in ("in-process", "first", "second"):
            out = tmp_path / f"{run}.json"
            extra = [] if run == "in-process" else ["--redis-url", db]
            done = quickdraft("replay", *files, "--oracle", "--json", str(out), *extra, env=env_prefix)
            assert done.returncode == 0, done.stderr
            figures.append(json.loads(out.read_text())["tokens_per_step"])
        in_process, first, second = figures
        assert first == pytest.approx(in_process, rel=0.01)
        assert second > 1.5 * first  # warm: it has every response already
    finally:
        client = redis.Redis.from_url(db)
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)


def test_oracle_replay_compares_drafters_and_plots(tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "replay.png"
    done = quickdraft("replay", *map(str, trace_files(2)), "--oracle", "--drafter", "suffix,pld", "--json", str(out),
                      "--plot", str(png))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["drafter"] == "suffix" and set(data["comparison"]) == {"suffix", "pld"}
    assert data["comparison"]["suffix"]["tokens_per_step"] == data["tokens_per_step"]
    assert data["comparison"]["pld"]["tokens_per_step"] < data["tokens_per_step"]
    assert_png(png)


def assert_png(path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 600
        # Something was drawn: a blank canvas has a single colour.
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or []) > 20


def test_replay_rejects_an_unknown_drafter():
    done = quickdraft("replay", str(trace_files(1)[0]), "--oracle", "--drafter", "magic")
    assert done.returncode != 0 and "unknown drafter 'magic'" in done.stderr


@pytest.mark.model
def test_live_replay_is_lossless_on_the_real_model(tmp_path, proxy_address):
    out, png = tmp_path / "live.json", tmp_path / "live.png"
    done = quickdraft("replay", str(trimmed_trace(tmp_path)), "--proxy", proxy_address, "--max-calls", "3",
                      "--max-new-tokens", "24", "--json", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stderr
    assert_png(png)
    data = json.loads(out.read_text())
    assert LIVE_KEYS <= data.keys()
    assert data["calls"] == 3 and data["outputs_identical"] is True
    assert data["skipped_calls"] >= 0 and data["tokens_per_s_plain"] > 0


def test_e2e_warm_start_log_holds_the_warm_trajectories_and_is_removed(tmp_path):
    """`bench e2e --warm N`: the last N trajectories' responses wait in a Redis log of the run's own."""
    import redis

    from quickdraft.bench.e2e import _warm_log
    from quickdraft.bench.traces import trajectory_calls

    db = "redis://127.0.0.1:6379/0"
    client = redis.Redis.from_url(db)
    files = trace_files(3)
    with _warm_log(files, 1, db, "smollm2-135m") as warmed:
        prefix = warmed["env"]["QUICKDRAFT_REDIS_PREFIX"]
        assert warmed["names"] == {files[-1].name.removesuffix(".traj.json")}
        keys = [k.decode() for k in client.scan_iter(match=f"{prefix}:*")]
        logs = [k for k in keys if k.endswith(":log")]
        assert len(logs) == 1  # one tenant and tokenizer
        # One entry per response of the warm trajectory, and none of the others.
        assert client.xlen(logs[0]) == sum(1 for _ in trajectory_calls(files[-1]))
        assert warmed["output_tokens"] > 100
        # The drafters' calibration from the warm replay waits beside the log, for the proxy.
        assert any(k.endswith(":state") for k in keys)
        # Keys a killed run could not delete expire on their own.
        assert all(0 < client.ttl(k) <= 86400 for k in keys)
    assert not list(client.scan_iter(match=f"{prefix}:*"))
    with pytest.raises(ValueError, match="--warm 3"):
        with _warm_log(files, 3, db, "smollm2-135m"):
            pass
    client.close()


@pytest.mark.model
def test_prefill_benchmark_compares_the_attention_paths_and_bf16_products(tmp_path):
    out = tmp_path / "prefill.json"
    # Two chunks, the second over a cached prefix (the worker's chunk is 1,024 tokens; smaller ones
    # take the same paths at a fraction of the time, as long as each has more rows than a
    # verification pass: one of up to MAX_ROWS rows multiplies as passes do, in bf16 on a CPU with
    # AMX tiles, where one bf16 rounding flipped by the attention path's last bits moves the
    # logits by 0.1).
    from quickdraft.verifiers.small_linear import MAX_ROWS

    assert MAX_ROWS < 140
    done = quickdraft("bench", "prefill", "--prefill-tokens", "300", "--prefill-chunk", "160", "--threads", "1",
                      "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["tokens"] == 300 and data["chunk"] == 160
    # In turns, the order reversed in the second round.
    assert [r["path"] for r in data["runs"]] == ["masked", "two-pass", "two-pass-bf16",
                                                 "two-pass-bf16", "two-pass", "masked"]
    assert all(len(r["chunk_seconds"]) == 2 for r in data["runs"])  # 160 + 140
    assert data["masked_s"] > 0 and data["two_pass_s"] > 0 and data["bf16_s"] > 0
    assert data["same_argmax"] and data["max_logit_diff"] < 1e-3
    # bf16 products move the logits a little (their argmax on this random prompt is reported, not
    # asserted: a near-tie may flip on another CPU's bf16 kernels).
    assert 0 < data["bf16_max_logit_diff"] < 1.0 and isinstance(data["bf16_same_argmax"], bool)
