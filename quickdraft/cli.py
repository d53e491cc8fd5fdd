"""The ``quickdraft`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from quickdraft.proto.tls import TlsConfig, TlsConfigError, sync_channel
from quickdraft.settings import Settings, load_settings

app = typer.Typer(
    help="QuickDraft: a lossless speculative-decoding proxy for agent workloads.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="TOML settings file (environment variables QUICKDRAFT_* override it)")
]


def _tls(s: Settings) -> TlsConfig:
    """The TLS settings, their files read now: a bad one stops the command before anything starts."""
    try:
        return s.tls.check()
    except TlsConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="TLS settings") from exc


def _logging(s: Settings) -> None:
    """Readable logs on a terminal; one JSON object per line (``log_format = "json"``) for log pipelines."""
    if s.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger", "process": "pid"},
        ))
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.basicConfig(level=s.log_level.upper(), handlers=[handler], force=True)
    # Libraries that narrate every start at INFO (alembic: a line per plugin and per migration check).
    if s.log_level != "debug":
        for noisy in ("httpx", "urllib3", "filelock", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _terminate_on_sigterm() -> None:
    """Let SIGTERM unwind like Ctrl-C, so `finally` blocks stop child processes."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _die_with_parent() -> None:
    """In a child process: receive SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- worker ----------------------------------------------------------------------
@app.command()
def worker(
    model: Annotated[str, typer.Option(help="catalog name (smollm2-135m) or a transformers model directory")] = None,
    port: Annotated[int, typer.Option(help="gRPC port")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16")] = None,
    prefill_dtype: Annotated[str, typer.Option(
        help="prefill products of an fp32 CPU model: auto (bf16 where the CPU multiplies it: AMX tiles or AVX-512 "
             "BF16), float32 or bfloat16")] = None,
    decode_dtype: Annotated[str, typer.Option(
        help="verification passes' products of an fp32 CPU model: auto (bf16 where the CPU multiplies it: AMX "
             "tiles or AVX-512 BF16), float32 or bfloat16")] = None,
    kv_budget_mb: Annotated[int, typer.Option(help="KV cache memory for all sessions")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: default)")] = None,
    max_batch: Annotated[int, typer.Option(help="sessions' steps batched into one forward pass, at most")] = None,
    max_queue: Annotated[int, typer.Option(help="steps waiting before RESOURCE_EXHAUSTED")] = None,
    register: Annotated[list[str], typer.Option(
        "--register", help="announce this worker to the proxy at HOST:PORT (repeatable); no proxy restart needed",
    )] = None,
    advertise: Annotated[str, typer.Option(help="HOST:PORT the proxy reaches this worker on (with --register)")] = None,
    oracle_traces: Annotated[list[pathlib.Path], typer.Option(
        "--oracle-traces", help="emit the recorded responses of these trajectories (files or folders) instead of "
        "the model's choices; the model still runs every pass",
    )] = None,
    pass_cost_ms: Annotated[float, typer.Option(
        help="with --oracle-traces: skip the model, each pass costs this many ms (quick checks only)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Start a worker that holds one model and verifies drafts for the proxy."""
    _quiet_transformers()
    s = load_settings(config, model=model, worker_port=port, host=host, device=device, dtype=dtype,
                      prefill_dtype=prefill_dtype, decode_dtype=decode_dtype, kv_budget_mb=kv_budget_mb,
                      threads=threads, max_batch=max_batch, max_queue=max_queue,
                      register_with=register or None,
                      advertise=advertise, oracle_traces=[str(p) for p in oracle_traces] if oracle_traces else None,
                      pass_cost_ms=pass_cost_ms)
    _logging(s)
    if s.pass_cost_ms is not None and not s.oracle_traces:
        raise typer.BadParameter("--pass-cost-ms needs --oracle-traces (it replaces the model's choices)")
    from quickdraft.proxy.worker_pool import is_unspecified

    if s.register_with and not s.advertise and is_unspecified(s.host):
        raise typer.BadParameter(f"--register with --host {s.host} needs --advertise HOST:PORT: the address the "
                                 "proxy reaches this worker on")
    tls = _tls(s)
    import torch

    from quickdraft.verifiers.model_loader import load_model
    from quickdraft.verifiers.runtime import ModelRuntime
    from quickdraft.verifiers.server import model_thread, serve_worker

    if s.heap_keep_mb:
        from quickdraft.verifiers.heap import keep_freed_memory

        keep_freed_memory(s.heap_keep_mb)  # (says so in the log where the C library will not)
    started = time.perf_counter()

    def load() -> ModelRuntime:
        if s.threads:
            torch.set_num_threads(s.threads)
        loaded = load_model(s.model, s.device, s.dtype, s.prefill_dtype, s.decode_dtype)
        return ModelRuntime(loaded, kv_budget_bytes=s.kv_budget_mb << 20, kv_active_s=s.kv_active_s)

    # Loaded on the thread that will run every pass: a second thread running OpenMP regions slows
    # every pass (model_thread's docstring).
    thread = model_thread()
    runtime = thread.submit(load).result()
    loaded = runtime.loaded
    if s.oracle_traces:
        from quickdraft.verifiers.oracle_target import OracleTarget

        runtime.follow_recordings(OracleTarget.from_traces(
            s.oracle_traces, loaded.tokenizer, runtime.info().tokenizer_id, runtime.turn_end_token(),
            max_prompt_tokens=runtime.context_length,
        ), s.pass_cost_ms)
    prefill = "".join(f", {what} in {str(dt).removeprefix('torch.')}" for what, dt in
                      (("prefill", loaded.prefill_dtype), ("passes", loaded.decode_dtype)) if dt is not None)
    logging.getLogger("quickdraft").info(
        "loaded %s on %s (%s%s) in %.1f s", loaded.name, loaded.device, runtime.info().dtype, prefill,
        time.perf_counter() - started,
    )
    _terminate_on_sigterm()  # (a container's stop): the server stops as on Ctrl-C
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_worker(runtime, s.host, s.worker_port, register_with=s.register_with,
                                 advertise=s.advertise, max_batch=s.max_batch, max_batch_tokens=s.max_batch_tokens,
                                 max_queue=s.max_queue, registration_token=s.registration_token, tls=tls,
                                 thread=thread))


# -- proxy -----------------------------------------------------------------------
@app.command()
def serve(
    worker_addr: Annotated[list[str], typer.Option("--worker", help="worker HOST:PORT (repeatable)")] = None,
    grpc_port: Annotated[int, typer.Option(help="gRPC port")] = None,
    http_port: Annotated[int, typer.Option(help="OpenAI-compatible HTTP port (0: off)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = None,
    redis_url: Annotated[str, typer.Option(help="Redis URL for shared drafting state")] = None,
    config: ConfigOpt = None,
) -> None:
    """Start only the proxy (gRPC, and the OpenAI-compatible HTTP endpoint), in front of running workers
    (given with --worker, or registering themselves with `quickdraft worker --register`)."""
    _terminate_on_sigterm()  # a container's stop flushes records and shared state as Ctrl-C does
    s = load_settings(config, workers=worker_addr or None, grpc_port=grpc_port, http_port=http_port, host=host,
                      redis_url=redis_url)
    _logging(s)
    tls = _tls(s)
    from quickdraft.proxy.server import serve_proxy

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_proxy(s, tls=tls))


LOOPBACK = "127.0.0.1"
TLS_ENV = ("QUICKDRAFT_TLS_CERT_FILE", "QUICKDRAFT_TLS_KEY_FILE", "QUICKDRAFT_TLS_CA_FILE",
           "QUICKDRAFT_TLS_CLIENT_CA_FILE")


def _without_tls() -> dict[str, str]:
    """The environment with TLS turned off (blank variables override a config file's settings too)."""
    return os.environ | dict.fromkeys(TLS_ENV, "")


def _spawn_worker(model: str, port: int, config: str | None) -> subprocess.Popen:
    # `up`'s workers are its children and only its proxy calls them: they listen on loopback, in
    # plaintext (TLS would protect nothing there and would need a certificate naming 127.0.0.1).
    cmd = [sys.executable, "-m", "quickdraft", "worker", "--model", model, "--port", str(port), "--host", LOOPBACK]
    if config:
        cmd += ["--config", config]
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent, env=_without_tls())


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


@app.command()
def up(
    grpc_port: Annotated[int, typer.Option(help="gRPC port of the proxy")] = None,
    http_port: Annotated[int, typer.Option(help="OpenAI-compatible HTTP port (0: off)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = None,
    redis_url: Annotated[str, typer.Option(help="Redis URL; none: in-process cache")] = None,
    model: Annotated[list[str], typer.Option(
        "--model", help="models to start workers for (repeatable; default: smollm2-135m and gemma3-270m)")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the whole local stack: a worker per model and the proxy. Serves until interrupted."""
    _terminate_on_sigterm()
    s = load_settings(config, grpc_port=grpc_port, http_port=http_port, host=host, redis_url=redis_url)
    _logging(s)
    tls = _tls(s)
    models = model or s.up_models
    procs: list[subprocess.Popen] = []
    addresses = []
    try:
        for name in models:
            port = free_port(LOOPBACK)
            procs.append(_spawn_worker(name, port, config))
            addresses.append(f"{LOOPBACK}:{port}")
        s = s.model_copy(update={"workers": addresses})
        from quickdraft.proxy.server import serve_proxy

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_proxy(s, plaintext_workers=addresses, tls=tls))
    finally:
        _stop(procs)


# -- replay and benchmarks ----------------------------------------------------------
def _write_json(path: pathlib.Path | None, data: dict, kind: str | None = None) -> None:
    """Print the figures, write them to ``path``, and (with ``kind``) record the run in SQL."""
    text = json.dumps(data, indent=2)
    if path:
        path.write_text(text + "\n")
    print(text)
    if kind:
        _record_run(kind, data)


def _record_run(kind: str, figures: dict) -> None:
    s = load_settings()
    if not s.record_runs:
        return
    from quickdraft.records import RecordStore, RunRecord

    command = " ".join(["quickdraft", *sys.argv[1:]])
    try:
        store = RecordStore(s.database_url)
        store.migrate()
        run_id = store.add_run(RunRecord(kind=kind, command=command[:2000], figures=figures))
        store.close()
    except Exception as exc:  # a record is a convenience: never fail the run for it
        console.print(f"[yellow]could not record this run in {s.database_url}: {exc}[/]")
        return
    console.print(f"recorded as run {run_id} ({kind}) in {s.database_url.split('@')[-1]}")


def _prior_text_option(value: str | None) -> tuple[str, float]:
    """The prior text source a command uses (its option, else the setting) and the size it may
    have (the setting), the source checked before any work."""
    from quickdraft.suffix_cache.prior_text import PriorTextError, is_off, source_files

    settings = load_settings()
    source = value if value is not None else settings.prior_text
    if not is_off(source):
        try:
            source_files(source, settings.prior_text_max_mb)
        except PriorTextError as exc:
            where = "--prior-text" if value is not None else "the prior_text setting (QUICKDRAFT_PRIOR_TEXT)"
            raise typer.BadParameter(str(exc), param_hint=where) from exc
    return source, settings.prior_text_max_mb


@app.command()
def replay(
    paths: Annotated[list[pathlib.Path], typer.Argument(
        help="trajectories: .traj.json (mini-swe-agent) or .traj (SWE-agent) files, or folders of them")],
    oracle: Annotated[bool, typer.Option("--oracle", help="draft against the recorded responses, no model")] = False,
    proxy: Annotated[str, typer.Option(
        help="HOST:PORT of a running proxy (live replay; TLS where the tls_ca_file setting names roots)")] = None,
    drafter: Annotated[str, typer.Option(
        help="suffix, stand, aded, pld or hybrid (oracle default: suffix; live: the proxy's default, hybrid); "
             "oracle: several, comma-separated, are "
             "replayed one after the other and compared (the JSON's top level is the first, `comparison` holds all)"
    )] = "",
    tokenizer: Annotated[str, typer.Option(help="tokenizer (catalog name or path)")] = "smollm2-135m",
    budget: Annotated[int, typer.Option(
        help="oracle: draft tree nodes per step, as a mean over the run (a step may send up to 4x)")] = 8,
    fixed_budget: Annotated[bool, typer.Option(
        help="oracle: send at most --budget nodes every step instead of a mean")] = False,
    max_calls: Annotated[int, typer.Option(help="live: calls to send")] = 20,
    max_new_tokens: Annotated[int, typer.Option(help="live: completion budget per call")] = 128,
    model: Annotated[str, typer.Option(help="live: model to ask for")] = "auto",
    redis_url: Annotated[str, typer.Option(
        help="oracle: keep drafting state in this Redis, as the proxy does; live: count its commands per token"
    )] = None,
    prior_text: Annotated[str, typer.Option(
        help="oracle: public text drafts may also copy from: stdlib, a folder or none (default: the "
             "prior_text setting, as the proxy)")] = None,
    json_out: Annotated[pathlib.Path, typer.Option("--json", help="write the figures here")] = None,
    plot: Annotated[pathlib.Path, typer.Option(
        help="draw a PNG: oracle: tokens per step along each trajectory and the drafters side by side; "
             "live: tokens per step and speedup per call")] = None,
) -> None:
    """Replay agent trajectories: --oracle for drafting quality, --proxy for live speed."""
    _quiet_transformers()
    if oracle == bool(proxy):
        raise typer.BadParameter("choose exactly one of --oracle or --proxy HOST:PORT")
    from quickdraft.bench.traces import trajectory_files, trajectory_messages

    try:
        files = trajectory_files(paths)
        for file in files:  # a file that is not a trajectory is reported before any work starts
            trajectory_messages(file)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="PATHS") from exc
    if not files:
        raise typer.BadParameter(f"no .traj.json or .traj files in {', '.join(map(str, paths))}", param_hint="PATHS")
    if oracle:
        from quickdraft.bench.oracle_replay import replay_oracle
        from quickdraft.suffix_cache.registry import DRAFTERS

        names = [n.strip() for n in (drafter or "suffix").split(",") if n.strip()]
        for name in names:
            if name not in DRAFTERS:
                raise typer.BadParameter(f"unknown drafter {name!r}; use one of {sorted(DRAFTERS)}")
        prior, prior_max_mb = _prior_text_option(prior_text)
        per_step: dict[str, dict] = {name: {} for name in names}
        reports = {name: replay_oracle(paths, name, tokenizer, budget=budget, redis_url=redis_url,
                                       per_step=per_step[name], fixed_budget=fixed_budget,
                                       prior_text=prior, prior_max_mb=prior_max_mb).to_dict() for name in names}
        figures = dict(reports[names[0]])
        if len(names) > 1:
            figures["comparison"] = reports
        if plot:
            from quickdraft.bench.plots import plot_oracle

            plot_oracle(reports, per_step, plot)
    else:
        from quickdraft.bench.live_replay import replay_live

        figures = replay_live(paths, proxy, max_calls=max_calls, max_new_tokens=max_new_tokens, model=model,
                              drafter=drafter, tokenizer_name=tokenizer, redis_url=redis_url,
                              tls=_tls(load_settings())).to_dict()
        if plot:
            from quickdraft.bench.plots import plot_live

            plot_live(figures, plot)
    if plot:
        console.print(f"plot written to {plot}")
    _write_json(json_out, figures, kind="replay-oracle" if oracle else "replay-live")


BENCHMARKS = {
    "drafters": "oracle replay of every drafter side by side (PATHS: trajectories)",
    "forward": "cost of one verification pass by context length and draft size (in-process model)",
    "prefill": "time to prefill --prefill-tokens tokens chunk by chunk, masked SDPA vs the worker's two-pass "
               "attention, side by side (in-process model)",
    "load": "many sessions at once against a running stack (--proxy), speculation on vs off, by level (--sessions)",
    "soak": "the largest --sessions level for --duration-s against a running stack, speculation on; samples the "
            "proxy's and workers' memory from --metrics-url and says whether it stayed flat",
    "e2e": "starts a worker and a proxy, live-replays agent calls with speculation on vs off, on the model's "
           "own text and on the recorded agent text (oracle-traces worker)",
}


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))],
    paths: Annotated[list[pathlib.Path], typer.Argument(help="trajectories (default: the dev traces)")] = None,
    model: Annotated[str, typer.Option(help="forward, prefill, e2e: model to measure")] = "smollm2-135m",
    threads: Annotated[int, typer.Option(help="forward, prefill, e2e: torch CPU threads (0: default)")] = 0,
    prefill_tokens: Annotated[int, typer.Option(help="prefill: prompt length (capped at the model's context)")] = 8192,
    prefill_chunk: Annotated[int, typer.Option(
        help="prefill: tokens per chunk (0: the worker's own chunk size)", min=0)] = 0,
    device: Annotated[str, typer.Option(help="e2e: worker device (auto, cpu, cuda)")] = "auto",
    decode_dtype: Annotated[str, typer.Option(
        help="forward: verification passes' products of an fp32 CPU model: auto, float32 or bfloat16 (e2e: "
             "set QUICKDRAFT_DECODE_DTYPE for its worker)")] = "auto",
    block_weights: Annotated[bool, typer.Option(
        help="forward: the fp32 kernel reads a GGUF model's weights as their 4/8-bit blocks (the same results, "
             "fewer bytes a pass); --no-block-weights reads the fp32 weights")] = True,
    max_calls: Annotated[int, typer.Option(help="e2e: calls per text")] = 20,
    max_new_tokens: Annotated[int, typer.Option(help="e2e, load: completion budget per call")] = 128,
    proxy: Annotated[str, typer.Option(help="load: HOST:PORT of the running proxy")] = "127.0.0.1:50051",
    sessions: Annotated[str, typer.Option(help="load: concurrency levels, comma-separated")] = "1,8,32,64",
    duration_s: Annotated[float, typer.Option(help="load: seconds per level and mode; soak: seconds in all")] = 60.0,
    metrics_url: Annotated[str, typer.Option(
        help="soak: the proxy's Prometheus endpoint (default: http://PROXY_HOST:8000/metrics)")] = None,
    sample_s: Annotated[float, typer.Option(help="soak: seconds between memory samples")] = 10.0,
    context_cap: Annotated[int, typer.Option(help="load: longest prompt sent, in tokens")] = 2048,
    max_message_chars: Annotated[int, typer.Option(help="load: each message cut to this many characters")] = 1500,
    text: Annotated[list[str], typer.Option("--text", help="e2e: model (its own outputs) and/or oracle "
                                            "(recorded agent text); default both")] = None,
    warm: Annotated[int, typer.Option(
        help="e2e: start the proxy with the tenant's earlier responses from the last N trajectories "
             "(oracle-replayed into a Redis log of the run's own; 0: a cold proxy)")] = 0,
    redis_url: Annotated[str, typer.Option(help="e2e with --warm: the Redis to hold that log")] = \
        "redis://127.0.0.1:6379/0",
    anchor: Annotated[bool, typer.Option(
        help="drafters: also replay the SuffixDecoding anchor (shared/anchor/build_anchor.sh builds it) at "
             "the same time, and report each drafter's tokens per step as a multiple of its")] = False,
    json_out: Annotated[pathlib.Path, typer.Option("--json", help="write the figures here")] = None,
) -> None:
    """Run a named benchmark."""
    _quiet_transformers()
    if name not in BENCHMARKS:
        raise typer.BadParameter(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    if name in ("load", "soak"):
        try:
            levels = [int(x) for x in sessions.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"--sessions takes numbers separated by commas, got {sessions!r}") from None
        if not levels or min(levels) <= 0:
            raise typer.BadParameter(f"--sessions takes positive numbers separated by commas, got {sessions!r}")
    if name == "soak":
        from quickdraft.bench.soak import run_soak
        from quickdraft.bench.traces import default_traces_dir

        tls = _tls(load_settings())
        scheme = "https" if tls.calls_securely else "http"
        url = metrics_url or f"{scheme}://{proxy.rsplit(':', 1)[0]}:8000/metrics"
        result = run_soak(paths or [default_traces_dir()], proxy=proxy, metrics_url=url, sessions=max(levels),
                          duration_s=duration_s, sample_s=sample_s, max_new_tokens=max_new_tokens,
                          max_message_chars=max_message_chars, context_cap=context_cap, tokenizer=model, tls=tls)
        table = Table("memory", "samples", "MB after warm-up", "MB at the end", "peak MB", "growth MB", "flat")
        for proc_name, m in result["memory"].items():
            if m["flat"] is not None:
                verdict = str(m["flat"]) if m.get("verdict", True) else "(by design: up to the KV budget)"
                table.add_row(proc_name, str(m["samples"]), str(m["second_quarter_median_mb"]),
                              str(m["last_quarter_median_mb"]), str(m["max_mb"]), str(m["growth_mb"]), verdict)
        console.print(table)
        console.print(f"{result['requests']} requests, {result['tokens_per_s']} tok/s, failed "
                      f"{result['failed_requests']}, rejected (deliberate limits) {result['rejected_requests']}")
        _write_json(json_out, result, kind="bench-soak")
        return
    if name == "load":
        from quickdraft.bench.load import run_load
        from quickdraft.bench.traces import default_traces_dir

        result = run_load(paths or [default_traces_dir()], proxy=proxy, levels=levels, duration_s=duration_s,
                          max_new_tokens=max_new_tokens, max_message_chars=max_message_chars,
                          context_cap=context_cap, tokenizer=model, tls=_tls(load_settings()))
        table = Table("sessions", "tok/s spec", "tok/s plain", "speedup", "TTFT p50/p95 ms", "TPOT p50/p95 ms",
                      "failed")
        for lv in result["levels"]:
            table.add_row(str(lv["sessions"]), f"{lv['tokens_per_s_speculative']:.1f}",
                          f"{lv['tokens_per_s_plain']:.1f}", f"{lv['speedup']:.2f}x",
                          f"{lv['ttft_p50_ms']} / {lv['ttft_p95_ms']}", f"{lv['tpot_p50_ms']} / {lv['tpot_p95_ms']}",
                          str(lv["failed_requests"]))
        console.print(table)
        _write_json(json_out, result, kind="bench-load")
        return
    if name == "e2e":
        from quickdraft.bench.e2e import TEXTS, run_e2e
        from quickdraft.bench.traces import default_traces_dir

        unknown = [t for t in text or () if t not in TEXTS]
        if unknown:
            raise typer.BadParameter(f"unknown text {unknown[0]!r}; use {' or '.join(TEXTS)}", param_hint="--text")

        result = run_e2e(paths or [default_traces_dir()], texts=text or TEXTS, model=model, max_calls=max_calls,
                         max_new_tokens=max_new_tokens, threads=threads, device=device, warm=warm,
                         redis_url=redis_url)
        table = Table("text", "calls", "tokens/step", "tok/s spec", "tok/s plain", "speedup", "identical")
        for t in text or TEXTS:
            r = result[t]
            table.add_row(t, str(r["calls"]), f"{r['tokens_per_step']:.2f}", f"{r['tokens_per_s_speculative']:.2f}",
                          f"{r['tokens_per_s_plain']:.2f}", f"{r['speedup']:.2f}x", str(r["outputs_identical"]))
        console.print(table)
        _write_json(json_out, result, kind="bench-e2e")
        return
    if name == "prefill":
        import torch

        from quickdraft.bench.prefill_cost import measure as measure_prefill
        from quickdraft.verifiers.heap import keep_freed_memory
        from quickdraft.verifiers.model_loader import load_model

        if threads:
            torch.set_num_threads(threads)
        keep_freed_memory()  # as a worker does with the default `heap_keep_mb`
        loaded = load_model(model)
        tokens = min(prefill_tokens, loaded.model.config.max_position_embeddings)
        from quickdraft.bench.prefill_cost import PREFILL_CHUNK

        result = measure_prefill(loaded.model, tokens, chunk=prefill_chunk or PREFILL_CHUNK,
                                 bf16=loaded.invariant_linears > 0)
        table = Table("path", "seconds (median)", "per 1k tokens")
        rows = [("masked SDPA", "masked_s"), ("two-pass, fp32", "two_pass_s"), ("two-pass, bf16 products", "bf16_s")]
        for path, key in rows:
            if key in result:
                table.add_row(path, f"{result[key]:.2f}", f"{result[key] / tokens * 1000:.2f}")
        console.print(table)
        console.print(f"two-pass vs masked: {result['speedup']:.2f}x, last logits differ by at most "
                      f"{result['max_logit_diff']:.1e}, same argmax: {result['same_argmax']}")
        if "bf16_s" in result:
            console.print(f"bf16 vs fp32 two-pass: {result['bf16_speedup']:.2f}x, last logits differ by at most "
                          f"{result['bf16_max_logit_diff']:.1e}, same argmax: {result['bf16_same_argmax']}")
        _write_json(json_out, {"benchmark": "prefill", "model": model, "threads": torch.get_num_threads(),
                               **result}, kind="bench-prefill")
        return
    if name == "forward":
        import torch

        from quickdraft.bench.forward_cost import measure, measure_growing
        from quickdraft.verifiers import small_linear
        from quickdraft.verifiers.model_loader import load_model
        from quickdraft.verifiers.runtime import ModelRuntime

        if threads:
            torch.set_num_threads(threads)
        runtime = ModelRuntime(load_model(model, decode_dtype=decode_dtype))
        loaded = runtime.loaded
        blocks = small_linear.use_block_weights(loaded.model, on=block_weights)[0] if loaded.device.type == "cpu" \
            and loaded.decode_dtype is None else 0
        points = measure(runtime) + measure_growing(runtime)
        fp32 = f"fp32 ({blocks} layers reading GGUF blocks)" if blocks else "fp32"
        kernels = (f"bf16 ({small_linear.bf16_isa()})" if loaded.decode_dtype is not None else fp32) \
            if loaded.device.type == "cpu" \
            else f"torch {str(loaded.dtype).removeprefix('torch.')} on {loaded.device}"
        table = Table("series", "context", "scored tokens", "median ms",
                      title=f"verification passes, {kernels} kernels")
        for p in points:
            table.add_row(p["series"], str(p["context"]), str(p["scored"]), f"{p['median_ms']:.1f}")
        console.print(table)
        _write_json(json_out, {"benchmark": "forward", "model": model, "threads": torch.get_num_threads(),
                               "kernels": kernels, "points": points}, kind="bench-forward")
        return
    from quickdraft.bench.oracle_replay import replay_oracle
    from quickdraft.bench.traces import default_traces_dir
    from quickdraft.suffix_cache.registry import DRAFTERS

    paths = paths or [default_traces_dir()]
    prior, prior_max_mb = _prior_text_option(None)
    beside = None
    if anchor:
        from quickdraft.bench.anchor_run import AnchorError, AnchorRun

        try:
            beside = AnchorRun(paths)  # runs meanwhile, on a core of its own
        except AnchorError as exc:
            raise typer.BadParameter(str(exc), param_hint="--anchor") from exc
    try:
        rows = {d: replay_oracle(paths, d, prior_text=prior, prior_max_mb=prior_max_mb).to_dict()
                for d in sorted(DRAFTERS)}
        if beside is not None:
            console.print("[dim]waiting for the anchor's replay ...[/dim]")
            try:
                found = beside.figures()
            except AnchorError as exc:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(1) from exc
    finally:
        if beside is not None:
            beside.stop()
    table = Table("drafter", "tokens/step", "drafted/step", "µs/step", "ms/call set-up",
                  *(["× anchor"] if beside is not None else []))
    figures: dict[str, object] = {"benchmark": "drafters", "results": rows}
    vs_anchor = {}
    if beside is not None:
        vs_anchor = {d: r["tokens_per_step"] / found.tokens_per_step for d, r in rows.items()}
        figures["anchor"] = found.raw
        figures["tokens_per_step_vs_anchor"] = {d: round(x, 4) for d, x in vs_anchor.items()}
    for d, r in rows.items():
        table.add_row(d, f"{r['tokens_per_step']:.3f}", f"{r['drafted_per_step']:.2f}",
                      f"{r['draft_us_per_step']:.1f}", f"{r['prepare_ms_per_call']:.2f}",
                      *([f"{vs_anchor[d]:.3f}"] if vs_anchor else []))
    if beside is not None:
        table.add_row("anchor (SuffixDecoding)", f"{found.tokens_per_step:.3f}",
                      f"{found.drafted_per_step:.2f}", f"{found.draft_us_per_step:.1f}",
                      f"{found.prepare_ms_per_call:.2f}", "1.000")
    console.print(table)
    _write_json(json_out, figures, kind="bench-drafters")


@app.command()
def demo(
    traces: Annotated[pathlib.Path, typer.Option(help="trajectories to replay (default: the dev traces)")] = None,
    max_calls: Annotated[int, typer.Option(help="calls to replay")] = 5,
    max_new_tokens: Annotated[int, typer.Option(help="completion budget per call")] = 64,
    json_out: Annotated[pathlib.Path, typer.Option("--json", help="write the figures here")] = None,
) -> None:
    """Start the stack, run a short live replay, print the figures, stop the stack."""
    _quiet_transformers()
    port = free_port()
    _terminate_on_sigterm()
    # A stack of its own on loopback: plaintext, whatever TLS the settings name.
    proc = subprocess.Popen([sys.executable, "-m", "quickdraft", "up", "--grpc-port", str(port),
                             "--http-port", str(free_port()), "--host", LOOPBACK],
                            start_new_session=True, preexec_fn=_die_with_parent, env=_without_tls())
    address = f"127.0.0.1:{port}"
    try:
        console.print(f"[bold]starting the stack on {address}[/] (the first start converts the model)")
        wait_serving(address, timeout=600, proc=proc)
        from quickdraft.bench.live_replay import replay_live
        from quickdraft.bench.traces import default_traces_dir

        report = replay_live(
            [traces or default_traces_dir()], address, max_calls=max_calls, max_new_tokens=max_new_tokens
        )
        _write_json(json_out, report.to_dict(), kind="demo")
    finally:
        _stop([proc])


# -- records -----------------------------------------------------------------------
records_app = typer.Typer(help="SQL records of requests and runs (SQLite by default, PostgreSQL by URL).",
                          no_args_is_help=True)
app.add_typer(records_app, name="records")
DatabaseOpt = Annotated[str | None, typer.Option(
    "--database-url", help="SQLAlchemy URL (default: the database_url setting)")]


def _store(database_url: str | None):
    from sqlalchemy.exc import ArgumentError

    from quickdraft.records import RecordStore

    url = database_url or load_settings().database_url
    try:
        return RecordStore(url)
    except ArgumentError as exc:
        raise typer.BadParameter(f"not a database URL ({exc}); e.g. sqlite:///path.db or "
                                 "postgresql://user@host:5432/db", param_hint="--database-url") from None
    except ImportError as exc:  # a known dialect whose driver package is not installed
        raise typer.BadParameter(f"the driver for {url.split(':', 1)[0]}:// is not installed ({exc}); install it "
                                 "into this environment, or use sqlite:///path.db or postgresql:// (psycopg 3 "
                                 "comes with QuickDraft)", param_hint="--database-url") from None


@records_app.command("migrate")
def records_migrate(database_url: DatabaseOpt = None) -> None:
    """Create or upgrade the schema to the newest revision (Alembic); the proxy and runs also do this."""
    store = _store(database_url)
    console.print(f"{store.url.split('@')[-1]}: schema at revision {store.migrate()}")


@records_app.command("requests")
def records_requests(
    limit: Annotated[int, typer.Option(help="newest N")] = 20,
    tenant: Annotated[str, typer.Option(help="only this tenant")] = None,
    database_url: DatabaseOpt = None,
) -> None:
    """The newest request records: tenant, route, drafter and figures."""
    store = _store(database_url)
    store.migrate()
    table = Table("time (UTC)", "tenant", "route", "drafter", "status", "prompt", "completion", "tok/step",
                  "TTFT ms", "total ms")
    for r in store.recent_requests(limit, tenant):
        per_step = r.completion_tokens / r.verification_steps if r.verification_steps else 0.0
        table.add_row(r.created_at.strftime("%Y-%m-%d %H:%M:%S"), r.tenant, r.route, r.drafter, r.status,
                      str(r.prompt_tokens), str(r.completion_tokens), f"{per_step:.2f}", f"{r.ttft_ms:.0f}",
                      f"{r.total_ms:.0f}")
    console.print(table)


@records_app.command("runs")
def records_runs(
    limit: Annotated[int, typer.Option(help="newest N")] = 20,
    kind: Annotated[str, typer.Option(help="only this kind (replay-oracle, replay-live, bench-e2e, ...)")] = None,
    database_url: DatabaseOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the records with their figures as JSON")] = False,
) -> None:
    """The newest replay and benchmark runs with their headline figures."""
    store = _store(database_url)
    store.migrate()
    runs = store.recent_runs(limit, kind)
    if json_out:
        print(json.dumps([{"id": r.id, "created_at": r.created_at.isoformat(), "kind": r.kind, "command": r.command,
                           "host": r.host, "figures": r.figures} for r in runs], indent=2))
        return
    table = Table("id", "time (UTC)", "kind", "tokens/step", "speedup", "command")
    for r in runs:
        f = r.figures
        table.add_row(str(r.id), r.created_at.strftime("%Y-%m-%d %H:%M:%S"), r.kind,
                      _fmt(f.get("tokens_per_step")), _fmt(f.get("speedup")), r.command)
    console.print(table)


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "—"


def wait_serving(address: str, timeout: float, proc: subprocess.Popen | None = None,
                 tls: TlsConfig | None = None) -> None:
    """Block until the gRPC health service at ``address`` reports SERVING (asked over TLS where ``tls`` says)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with sync_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the stack exited with status {proc.returncode} before it was ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{address} did not report SERVING within {timeout:.0f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
