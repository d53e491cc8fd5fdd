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
"""

from __future__ import annotations

import contextlib
import pathlib
import statistics
import subprocess
import sys
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
           log_dir: pathlib.Path) -> Iterator[str]:
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

    def launch(cmd: list[str], name: str) -> subprocess.Popen:
        handle = (log_dir / f"{name}.log").open("w")
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        procs.append(proc)
        return proc

    try:
        worker = launch(worker_cmd, "worker")
        wait_serving(f"127.0.0.1:{worker_port}", timeout=900, proc=worker)
        proxy = launch([sys.executable, "-m", "quickdraft", "serve", "--worker", f"127.0.0.1:{worker_port}",
                        "--grpc-port", str(proxy_port), "--http-port", "0"], "proxy")
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


def run_e2e(paths: Sequence[pathlib.Path], texts: Sequence[str] = TEXTS, model: str = "smollm2-135m",
            max_calls: int = 20, max_new_tokens: int = 128, threads: int = 0, device: str = "auto",
            log_dir: pathlib.Path | None = None) -> dict:
    import tempfile

    log_dir = log_dir or pathlib.Path(tempfile.mkdtemp(prefix="quickdraft-e2e-"))
    out: dict = {"benchmark": "e2e", "model": model, "max_calls": max_calls, "max_new_tokens": max_new_tokens,
                 "logs": str(log_dir)}
    for text in texts:
        if text not in TEXTS:
            raise ValueError(f"unknown text {text!r}; use {', '.join(TEXTS)}")
        with _stack(model, paths if text == "oracle" else None, threads, device, log_dir / text) as proxy:
            report = replay_live(paths, proxy=proxy, max_calls=max_calls, max_new_tokens=max_new_tokens,
                                 tokenizer_name=model)
        figures = report.to_dict()
        figures["ttft_vs_new_tokens"] = ttft_follows_new_tokens(report)
        out[text] = figures
    return out
