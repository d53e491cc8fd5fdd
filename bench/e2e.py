"""`quickdraft bench e2e`: the whole stack on the real model, speculation on vs off.

Starts its own worker and proxy on free ports, replays agent calls through them
(live replay: each call with speculation on, then off), and stops them. Two
texts are measured, as ../shared/MISSION.md asks:

* ``model``: the model's own greedy outputs (the lossless proof: outputs must be
  identical both ways);
* ``oracle``: a worker started with ``--oracle-traces`` emits the recorded agent
  responses while running the real model on every pass (the realistic speedup on
  agent text).

It also reports how time to first token follows the prompt's *new* tokens (the
worker reuses each session's cached prefix) rather than the whole prompt.

With ``warm=N`` the proxy starts the way a long-running one would: the tenant's
earlier responses (the last N trajectories of the set, oracle-replayed into a
Redis response log under a prefix of this run's own) are what its drafters begin
with. The benchmarked calls come from the first trajectories; the report says if
any of them was also a warm-up trajectory. Each text warms a log of its own: a proxy
that replayed the model's text has seen the later calls' prompts, which hold the very
responses the oracle text then replays, and what it learned would reach the next
proxy through a shared log.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence

from quickdraft.bench.live_replay import LiveReport, replay_live

TEXTS = ("model", "oracle")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _stack(model: str, traces: Sequence[pathlib.Path] | None, threads: int, device: str,
           log_dir: pathlib.Path, proxy_env: dict[str, str] | None = None) -> Iterator[str]:
    """A worker (following the recordings when ``traces`` is given) and a proxy; yields the proxy address."""
    from quickdraft.cli import _die_with_parent, wait_serving

    worker_port, proxy_port = _free_port(), _free_port()
    worker_cmd = [sys.executable, "-m", "quickdraft", "worker", "--model", model, "--port", str(worker_port),
                  "--device", device]
    if threads:
        worker_cmd += ["--threads", str(threads)]
    for t in traces or ():
        worker_cmd += ["--oracle-traces", str(t)]
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def launch(cmd: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        handle = (log_dir / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent, env={**os.environ, **env} if env else None)
        procs.append(proc)
        return proc

    try:
        worker = launch(worker_cmd, "worker")
        wait_serving(f"127.0.0.1:{worker_port}", timeout=900, proc=worker)
        proxy = launch([sys.executable, "-m", "quickdraft", "serve", "--worker", f"127.0.0.1:{worker_port}",
                        "--grpc-port", str(proxy_port), "--http-port", "0"], "proxy", proxy_env)
        wait_serving(f"127.0.0.1:{proxy_port}", timeout=120, proc=proxy)
        yield f"127.0.0.1:{proxy_port}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def ttft_follows_new_tokens(report: LiveReport) -> dict:
    """Least-squares slopes of time to first token (speculative run) on new vs whole-prompt tokens,
    over calls that extended a session (the worker held part of their prompt)."""
    later = [c for c in report.per_call or () if c.reused_prompt_tokens > 0]
    if len(later) < 3:
        return {"later_calls": len(later)}
    new = [c.prompt_tokens - c.reused_prompt_tokens for c in later]
    whole = [c.prompt_tokens for c in later]
    ttft = [c.ttft_ms for c in later]

    def corr(x: list[float], y: list[float]) -> float:
        return round(statistics.correlation(x, y), 3) if len(set(x)) > 1 else 0.0

    return {
        "later_calls": len(later),
        "median_prompt_tokens": statistics.median(whole),
        "median_new_tokens": statistics.median(new),
        "median_ttft_ms": statistics.median(ttft),
        "ttft_corr_with_new_tokens": corr(new, ttft),
        "ttft_corr_with_prompt_tokens": corr(whole, ttft),
        "ttft_ms_per_1k_new_tokens": round(1e3 * statistics.linear_regression(new, ttft).slope, 1)
        if len(set(new)) > 1 else None,
    }


@contextlib.contextmanager
def _warm_log(paths: Sequence[pathlib.Path], warm: int, redis_url: str, model: str) -> Iterator[dict]:
    """Oracle-replay the last ``warm`` trajectories into a Redis response log of this run's own;
    yields the proxy's environment for it and what was warmed. The log is deleted afterwards."""
    import redis

    from quickdraft.bench.oracle_replay import replay_oracle
    from quickdraft.bench.traces import trajectory_files, trajectory_name

    files = trajectory_files(paths)
    if not 0 < warm < len(files):
        raise ValueError(f"--warm {warm}: pick between 1 and {len(files) - 1} of the {len(files)} trajectories")
    prefix = f"qd-e2e-{uuid.uuid4().hex[:12]}"
    env = {"QUICKDRAFT_REDIS_URL": redis_url, "QUICKDRAFT_REDIS_PREFIX": prefix}
    saved = {k: os.environ.get(k) for k in env}
    client = redis.Redis.from_url(redis_url)
    try:
        os.environ.update(env)  # the replay's response log reads the prefix from the settings
        report = replay_oracle(files[-warm:], "hybrid", tokenizer_name=model, redis_url=redis_url)
        # Deleted below; a day's expiry covers a run killed before it gets there (SIGTERM skips `finally`).
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.expire(key, 86400)
        yield {"env": env, "names": {trajectory_name(f) for f in files[-warm:]},
               "output_tokens": report.output_tokens}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def run_e2e(paths: Sequence[pathlib.Path], texts: Sequence[str] = TEXTS, model: str = "smollm2-135m",
            max_calls: int = 20, max_new_tokens: int = 128, threads: int = 0, device: str = "auto",
            log_dir: pathlib.Path | None = None, warm: int = 0,
            redis_url: str = "redis://127.0.0.1:6379/0") -> dict:
    import tempfile

    log_dir = log_dir or pathlib.Path(tempfile.mkdtemp(prefix="quickdraft-e2e-"))
    out: dict = {"benchmark": "e2e", "model": model, "max_calls": max_calls, "max_new_tokens": max_new_tokens,
                 "logs": str(log_dir), "warm_trajectories": warm}
    for text in texts:
        if text not in TEXTS:
            raise ValueError(f"unknown text {text!r}; use {', '.join(TEXTS)}")
    for text in texts:
        with contextlib.ExitStack() as stack:
            warmed = stack.enter_context(_warm_log(paths, warm, redis_url, model)) if warm else None
            if warmed is not None:
                out["warm_output_tokens"] = warmed["output_tokens"]
            with _stack(model, paths if text == "oracle" else None, threads, device, log_dir / text,
                        warmed["env"] if warmed else None) as proxy:
                report = replay_live(paths, proxy=proxy, max_calls=max_calls, max_new_tokens=max_new_tokens,
                                     tokenizer_name=model)
            figures = report.to_dict()
            figures["ttft_vs_new_tokens"] = ttft_follows_new_tokens(report)
            if warmed is not None:
                figures["warm_overlap_calls"] = sum(r.trajectory in warmed["names"] for r in report.per_call or ())
            out[text] = figures
    return out
