"""Oracle replay: how many tokens per verification step a drafter would yield.

Semantics (../shared/MISSION.md): trajectories in sorted file-name order share one
drafting state, as one proxy would see a stream of agent runs. For each assistant
message, the prompt is the chat-template rendering of the messages before it and
the response is its content's tokens. Each step drafts from prompt + accepted
response so far, accepts the longest branch of the draft tree that equals the
recorded response, and adds one bonus token.

The draft budget is a mean over the run (MISSION.md: ``drafted_per_step`` is a mean):
each step asks the drafter for up to four times the budget and sends the nodes whose
acceptance chance clears a threshold steered to keep that mean (``MeanBudget``).
``fixed_budget=True`` sends at most ``budget`` nodes every step instead.
"""

from __future__ import annotations

import asyncio
import gc
import pathlib
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from quickdraft.bench.traces import tokenized_calls, trajectory_files, trajectory_name
from quickdraft.catalog import load_tokenizer, tokenizer_id
from quickdraft.suffix_cache.base import Drafter, Scope, SessionKey, export_states, import_states, takes_min_chance
from quickdraft.suffix_cache.budget import MeanBudget
from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.prior_text import MAX_MB, NONE, batch_encoder, is_off, load_prior_text
from quickdraft.suffix_cache.registry import make_drafter


@dataclass(slots=True, frozen=True)
class OracleStep:
    """One step of the replay, for an observer (``replay_oracle(on_step=...)``)."""

    prompt: list[int]
    response: list[int]
    done: int            # response tokens emitted before this step
    offered: DraftTree   # the drafter's tree, before the budget's cut
    sent: DraftTree      # what the step verified
    accepted: int        # draft tokens accepted
    emitted: int         # accepted + the bonus token (the response's last step may have none)


@dataclass(slots=True)
class OracleReport:
    drafter: str
    tokenizer: str
    trajectories: int
    calls: int
    steps: int
    output_tokens: int
    accepted_tokens: int
    drafted_tokens: int
    mean_accepted_per_step: float
    tokens_per_step: float
    drafted_per_step: float
    draft_us_per_step: float
    prepare_ms_per_call: float
    draft_budget: int
    budget_mode: str
    wall_s: float
    prior_text: str = "none"   # the public text drafts could also copy from (suffix_cache/prior_text.py)
    prior_tokens: int = 0
    prior_load_s: float = 0.0  # once per process, before the first call: not in prepare_ms_per_call

    def to_dict(self) -> dict:
        return asdict(self)


class _SharedLogThread:
    """The Redis response log on its own event loop, so the synchronous replay can publish to it."""

    def __init__(self, url: str, drafter: Drafter) -> None:
        from quickdraft.suffix_cache.redis_log import LogSettings, ResponseLog

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        from quickdraft.settings import Settings

        settings = Settings()
        by_name = {drafter.name: drafter}
        self.log = ResponseLog(LogSettings(url, prefix=settings.redis_prefix, max_tokens=settings.redis_max_tokens),
                               apply=drafter.learn_response,
                               export_state=lambda scope: export_states(by_name, scope),
                               import_state=lambda scope, blobs: import_states(by_name, scope, blobs))
        self._call(self.log.start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def publish(self, scope: Scope, tokens: list[int]) -> None:
        self.loop.call_soon_threadsafe(self.log.publish, scope, tokens)

    def close(self) -> None:
        self._call(self.log.flush(60))
        self._call(self.log.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def replay_oracle(
    paths: Sequence[str | pathlib.Path],
    drafter_name: str = "suffix",
    tokenizer_name: str = "smollm2-135m",
    budget: int = 8,
    tenant: str = "default",
    drafter: Drafter | None = None,
    progress: bool = True,
    redis_url: str | None = None,
    per_step: dict[str, array] | None = None,
    fixed_budget: bool = False,
    on_step: Callable[[OracleStep], None] | None = None,
    prior_text: str | None = None,
    prior_max_mb: float = MAX_MB,
) -> OracleReport:
    """Replay trajectories through a drafter; with ``redis_url`` its learned state lives in Redis
    as the proxy's does (replayed at start, every response appended). ``per_step``, if given, receives
    the tokens each step yielded, per trajectory in order (for plots); ``on_step``, if given, sees
    every step (outside the timed parts). ``prior_text`` (``"stdlib"`` or a folder, as the proxy's
    setting) gives the drafter public text to copy from, loaded before the replay starts (a larger
    source than ``prior_max_mb`` is refused, as the proxy's ``prior_text_max_mb``)."""
    files = trajectory_files(paths)
    tok = load_tokenizer(tokenizer_name)
    tok_id = tokenizer_id(tok)
    scope = Scope(tenant, tok_id)
    drafter = drafter or make_drafter(drafter_name)
    t0 = time.perf_counter()
    prior = None if is_off(prior_text) else load_prior_text(prior_text, tok_id, batch_encoder(tok), progress=progress,
                                                                   max_mb=prior_max_mb)
    if prior is not None:
        drafter.use_prior(prior)
    prior_load_s = time.perf_counter() - t0
    allot = None if fixed_budget else MeanBudget(mean=budget)
    ask = budget if allot is None else allot.cap
    shared = _SharedLogThread(redis_url, drafter) if redis_url else None
    # Tell the drafter the budget's threshold, unless on_step wants the whole offer (or the drafter
    # predates the argument).
    tell_threshold = allot is not None and on_step is None and takes_min_chance(drafter)
    calls = steps = out = accepted = drafted = 0
    draft_s = prepare_s = 0.0
    # What is loaded by now (tokenizer, torch, transformers) lives for the whole run: keep it out
    # of the cyclic collector's scans, as a long-running proxy does after start-up (proxy/server.py),
    # so collections triggered by the steps' short-lived objects stay short.
    gc.collect()
    gc.freeze()
    started = time.perf_counter()

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("oracle replay [bold]{task.fields[drafter]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[tps]} tok/step"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("replay", total=len(files), drafter=drafter_name, tps="-")
        for file in files:
            yields = array("H")
            if per_step is not None:
                per_step[trajectory_name(file)] = yields
            for session_id, prompt, response in tokenized_calls(file, tok, tok_id):
                key = SessionKey(scope, session_id)
                t0 = time.perf_counter()
                drafter.begin_call(key, prompt)
                prepare_s += time.perf_counter() - t0
                done = 0
                while done < len(response):
                    t0 = time.perf_counter()
                    # The budget cuts nodes under its threshold: the drafter need not hand them over.
                    if tell_threshold:
                        offered = tree = drafter.propose(key, ask, min_chance=allot.threshold)
                    else:
                        offered = tree = drafter.propose(key, ask)
                    if allot is not None:
                        tree = allot.cut(tree)
                        allot.spent(len(tree))
                    t1 = time.perf_counter()
                    n_acc = len(tree.longest_accepted(response[done:]))
                    new = response[done : done + n_acc + 1]
                    t2 = time.perf_counter()
                    drafter.accept(key, new)
                    draft_s += (t1 - t0) + (time.perf_counter() - t2)
                    if on_step is not None:
                        on_step(OracleStep(prompt, response, done, offered, tree, n_acc, len(new)))
                    done += len(new)
                    yields.append(len(new))
                    steps += 1
                    accepted += n_acc
                    out += len(new)
                    drafted += len(tree)
                t0 = time.perf_counter()
                drafter.end_call(key)
                prepare_s += time.perf_counter() - t0
                if shared is not None:
                    shared.publish(scope, response)
                calls += 1
            drafter.drop_session(SessionKey(scope, trajectory_name(file)))
            bar.update(task, advance=1, tps=f"{out / max(steps, 1):.3f}")
    if shared is not None:
        shared.close()
    steps_ = max(steps, 1)
    return OracleReport(
        drafter=drafter_name,
        tokenizer=tokenizer_name,
        trajectories=len(files),
        calls=calls,
        steps=steps,
        output_tokens=out,
        accepted_tokens=accepted,
        drafted_tokens=drafted,
        mean_accepted_per_step=round(accepted / steps_, 4),
        tokens_per_step=round(out / steps_, 4),
        drafted_per_step=round(drafted / steps_, 3),
        draft_us_per_step=round(draft_s / steps_ * 1e6, 2),
        prepare_ms_per_call=round(prepare_s / max(calls, 1) * 1e3, 3),
        draft_budget=budget,
        budget_mode="fixed" if fixed_budget else "mean",
        wall_s=round(time.perf_counter() - started, 1),
        prior_text=prior.source if prior is not None else NONE,
        prior_tokens=prior.tokens if prior is not None else 0,
        prior_load_s=round(prior_load_s, 2),
    )
