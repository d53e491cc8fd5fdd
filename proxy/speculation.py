"""The speculation loop: draft -> verify on a worker -> accept -> learn -> stream.

Each step sends the worker the history tokens it has not seen and a draft
tree; the worker returns the accepted draft tokens plus one bonus token, all
chosen exactly as plain decoding would. With speculation off the draft is empty
and each step yields one token (the baseline the figures compare against).
If the worker lost the session's cache it asks for a resync and gets the whole
history; if it dies, another worker of the model rebuilds the session from
history and the step is repeated, so the output is the same either way.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proxy.errors import NoWorker, Overloaded
from quickdraft.proxy.goodput import Load, choose_draft_size
from quickdraft.proxy.sessions import Session
from quickdraft.proxy.worker_pool import WorkerClient, WorkerPool
from quickdraft.suffix_cache.base import Drafter, PositionStats, SessionKey
from quickdraft.suffix_cache.draft import DraftTree

log = logging.getLogger(__name__)

ANCHOR = 16
STATS_TOP_K = 4
# A step's deadline grows with the history it sends: prefilling thousands of tokens takes
# seconds on a CPU (a 16K-token Gemma 3 prompt about two minutes on two cores).
VERIFY_TIMEOUT_PER_TOKEN_S = 0.010


def verify_timeout(base_s: float, new_tokens: int) -> float:
    """How long a worker may take over one step that sends it ``new_tokens`` history tokens."""
    return base_s + VERIFY_TIMEOUT_PER_TOKEN_S * new_tokens


@dataclass(slots=True)
class GenerationParams:
    model: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    speculate: bool = True
    draft_budget: int = 32
    adaptive: bool = True        # size each draft by the worker's load (proxy/goodput.py)


@dataclass(slots=True)
class StepEvent:
    tokens: list[int]             # new output tokens (end-of-turn excluded)
    finished: bool = False
    finish_reason: str = ""


@dataclass(slots=True)
class LoopStats:
    steps: int = 0
    accepted_draft_tokens: int = 0
    drafted_tokens: int = 0
    reused_prompt_tokens: int = -1
    prefilled_tokens: int = 0      # history tokens sent to (and run by) the worker(s)
    resyncs: int = 0
    failovers: int = 0
    first_token_at: float = 0.0


@dataclass(slots=True)
class SpeculationLoop:
    pool: WorkerPool
    drafter: Drafter
    drafter_key: SessionKey
    session: Session
    params: GenerationParams
    eos: frozenset[int]
    stats: LoopStats = field(default_factory=LoopStats)
    seed: int = 0
    verify_timeout_s: float = 120.0
    _answered: float | None = None  # when the last step's answer came (perf_counter)

    def _draft(self, remaining: int) -> tuple[DraftTree, DraftTree]:
        """The tree to send, and the whole tree it was cut from (for judging the drafter)."""
        if not self.params.speculate or self.params.draft_budget <= 0 or remaining <= 1:
            return DraftTree(), DraftTree()
        tree = self.drafter.propose(self.drafter_key, self.params.draft_budget)
        # Nodes deeper than the remaining completion budget could never be kept.
        tree = full = tree.pruned_to_depth(remaining - 1)
        if self.params.adaptive and tree.token_ids:
            s = self.session
            worker = self.pool.pick(self.params.model, s.worker_key)
            batch = max(worker.load.batch_size, worker.in_flight + 1)
            # Alone on the worker, the step's time beyond the pass leaves it idle; beside other
            # sessions their passes fill that time, so it costs the batch nothing. (Nor is it learned
            # then: the time since the last answer includes the event loop serving the others.)
            overhead = 0.0
            if batch == 1:
                if self._answered is not None:  # the proxy's own time since the last answer
                    worker.overhead.observe_proxy((time.perf_counter() - self._answered) * 1e3)
                overhead = worker.overhead.ms
            size = choose_draft_size(tree.probs, s.acceptance.ratio, batch, worker.cost, overhead)
            tree = tree.truncated(size)
        return tree, full

    async def _verify(self, worker: WorkerClient, tree: DraftTree) -> pb.VerifyResponse:
        s = self.session
        p = self.params
        if s.worker_address != worker.address:
            # worker_len counts what another worker holds. This one may hold an older copy of the
            # session that its anchor cannot tell apart (an edit that kept the length): send it all.
            s.worker_len, s.worker_address = 0, worker.address
        for _ in range(2):
            known = s.worker_len
            request = pb.VerifyRequest(
                session_key=s.worker_key,
                known_len=known,
                anchor=s.history[max(0, known - ANCHOR) : known],
                new_tokens=s.history[known:],
                draft=pb.DraftTree(token_ids=tree.token_ids, parents=tree.parents),
                sampling=pb.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k),
                top_logprobs=STATS_TOP_K,
                seed=self.seed,
            )
            worker.in_flight += 1
            sent = time.perf_counter()
            try:
                response = await worker.stub.Verify(
                    request, timeout=verify_timeout(self.verify_timeout_s, len(request.new_tokens)))
            finally:
                worker.in_flight -= 1
            self._answered = time.perf_counter()
            if response.batch_tokens:
                worker.cost.observe(response.batch_tokens, response.forward_ms)
                worker.overhead.observe_call((self._answered - sent) * 1e3, response.forward_ms)
                worker.load = Load(max(response.batch_size, 1), response.batch_tokens, response.queue_depth)
            if not response.resync_required:
                if self.stats.reused_prompt_tokens < 0:
                    self.stats.reused_prompt_tokens = known
                self.stats.prefilled_tokens += len(request.new_tokens)
                return response
            self.stats.resyncs += 1
            s.worker_len = 0
        raise RuntimeError("worker asked for a resync twice in a row")

    async def _verify_anywhere(self, tree: DraftTree) -> pb.VerifyResponse:
        tried: set[str] = set()
        while True:
            worker = self.pool.pick(self.params.model, self.session.worker_key, exclude=tried)
            try:
                return await self._verify(worker, tree)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise Overloaded(f"the worker serving {self.params.model!r} is full: {exc.details()}", 0.5) \
                        from exc
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                # A worker past its deadline is hung or swamped: its sessions go elsewhere, and the
                # health round brings it back once it answers again. (What it may still compute for
                # this step is harmless: the next worker is sent the whole history.)
                log.warning("worker %s failed (%s); moving session to another worker", worker.address,
                            exc.code().name)
                self.pool.mark_down(worker)
                tried.add(worker.address)
                self.session.worker_len = 0
                self.stats.failovers += 1
                try:
                    self.pool.pick(self.params.model, self.session.worker_key, exclude=tried)
                except NoWorker:
                    what = (f"did not answer a verification step within its deadline "
                            f"(verify_timeout_s={self.verify_timeout_s:g})"
                            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "failed")
                    raise NoWorker(
                        f"the worker serving {self.params.model!r} {what} and no other worker is available"
                    ) from exc

    async def run(self) -> AsyncIterator[StepEvent]:
        p = self.params
        s = self.session
        self.seed = p.seed or random.getrandbits(63)
        produced = 0
        while True:
            remaining = p.max_tokens - produced
            tree, full = self._draft(remaining)
            response = await self._verify_anywhere(tree)
            emitted = list(response.tokens)[:remaining]
            n_acc = min(len(response.accepted_nodes), len(emitted))
            eos_at = next((i for i, t in enumerate(emitted) if t in self.eos), -1)
            if eos_at >= 0:
                emitted = emitted[: eos_at + 1]
                n_acc = min(n_acc, eos_at)
            before = len(s.history)
            s.history.extend(emitted)
            s.worker_len = min(response.cached_len, len(s.history))
            self.stats.steps += 1
            # Judged on the whole tree, so a session whose drafts were cut to nothing keeps
            # learning whether they would have paid (else one bad stretch silences it for good).
            s.acceptance.observe(*full.judged(emitted))
            if log.isEnabledFor(logging.DEBUG):  # per-step sizing, to see why a session drafts as it does
                log.debug("step %s/%s: offered %d nodes (expected %.2f), sent %d, accepted %d; session ratio %.2f; "
                          "pass %d positions in %.0f ms", s.tenant, s.session_id, len(full), sum(full.probs), len(tree),
                          n_acc, s.acceptance.ratio, response.batch_tokens, response.forward_ms)
            s.tokens_per_step = 0.8 * s.tokens_per_step + 0.2 * len(emitted)
            s.last_scored = max(response.computed_tokens, 1)
            self.stats.accepted_draft_tokens += n_acc
            self.stats.drafted_tokens += len(tree)
            if not self.stats.first_token_at:
                self.stats.first_token_at = time.perf_counter()
            stats = [
                PositionStats(tuple(st.top_ids), tuple(st.top_logprobs), st.entropy)
                for st in response.stats[: len(emitted)]
            ]
            self.drafter.accept(self.drafter_key, s.history[before:], stats or None)
            produced += len(emitted)
            if eos_at >= 0:
                yield StepEvent(emitted[:-1], finished=True, finish_reason="stop")
                return
            if produced >= p.max_tokens:
                yield StepEvent(emitted, finished=True, finish_reason="length")
                return
            yield StepEvent(emitted)

