"""Goodput-aware draft sizing: speculate only as much as pays off at the current load.

A verification pass costs more the more positions it scores; on a busy worker
many sessions share each pass, so one session's draft nodes slow every other
session's step too. Following SmartSpec's idea (maximise goodput: accepted tokens
per second of the whole batch), each step the proxy picks how many of the
draft tree's nodes to send, from

* the worker's measured pass cost by positions scored (``PassCost``, learned online
  from every response's ``forward_ms`` and ``batch_tokens``);
* the load it reported last (sessions and positions in its last pass);
* this session's calibrated acceptance: the drafter's node probabilities sum to the
  expected accepted length, scaled by how that estimate has fared for the session;
* what a step costs beyond the pass (``StepOverhead``: the call both ways and the proxy's
  own work between steps), paid once a step whatever the draft: counted where the session
  is alone on the worker, which idles meanwhile (beside others, their passes fill it).

It chooses the prefix of the tree (trees are grown best first, so every prefix is
the best tree of its size) that maximises the batch's tokens per millisecond, which
is zero nodes when the worker is compute-bound and the draft is not likely enough.
The batch size is the larger of what the worker last reported and the steps this
proxy has in flight on it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Positions scored per pass, bucketed (upper bounds): the cost curve is flat at
# first (weights are read once per pass) and linear once compute dominates.
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
EXPLORE_UP_TO = 32  # positions: unmeasured pass sizes up to this are predicted optimistically
STALE_AFTER = 256   # passes: a size not measured for this long counts as unmeasured again


@dataclass(slots=True)
class PassCost:
    """Mean pass time by positions scored, from the worker's own reports.

    A size measured while the machine was busy with something else (another process, a
    collection, a noisy neighbour) may look dear; if that makes the sizer stop sending drafts
    of that size, nothing would ever measure it again, and one bad minute would silence
    speculation for the proxy's lifetime. So a size not measured in the last ``STALE_AFTER``
    passes is forgotten: it is predicted optimistically again, tried once, and measured afresh."""

    decay: float = 0.9
    stale_after: int = STALE_AFTER
    _ms: dict[int, float] = field(default_factory=dict)
    _tokens: dict[int, float] = field(default_factory=dict)
    _weight: dict[int, float] = field(default_factory=dict)
    _seen: dict[int, int] = field(default_factory=dict)  # bucket -> pass count when last measured
    _passes: int = 0

    def observe(self, tokens: int, ms: float) -> None:
        if tokens <= 0 or ms <= 0:
            return
        self._passes += 1
        self._forget_stale()
        b = _bucket(tokens)
        self._seen[b] = self._passes
        self._ms[b] = self._ms.get(b, 0.0) * self.decay + ms
        self._tokens[b] = self._tokens.get(b, 0.0) * self.decay + tokens
        self._weight[b] = self._weight.get(b, 0.0) * self.decay + 1.0

    def _forget_stale(self) -> None:
        for b in [b for b, seen in self._seen.items() if self._passes - seen > self.stale_after]:
            for table in (self._ms, self._tokens, self._weight, self._seen):
                table.pop(b, None)

    def known(self) -> list[tuple[float, float]]:
        """(mean positions, mean ms) per bucket, by positions."""
        return sorted((self._tokens[b] / self._weight[b], self._ms[b] / self._weight[b]) for b in self._ms)

    def predict(self, tokens: int) -> float | None:
        """Interpolated between measured buckets, extrapolated linearly beyond them; None without data.

        A size whose bucket is unmeasured (never, or not lately) is predicted optimistically, at
        the cost of the nearest smaller measured size (the curve is flat until compute dominates),
        or below every measured size at its share of the smallest one's cost.
        Otherwise a line drawn from small drafts to a prefill pass, or through the two smallest
        sizes, would make mid-sized drafts look dear, they would never be sent, and so never
        measured. Only sizes of one session's draft are explored this way: at batch sizes where
        compute dominates, the line is the better guess and a wrong optimistic one would cost
        every session."""
        return self.predictor()(tokens)

    def predictor(self):
        """``predict`` for many sizes against one snapshot of the curve (the sizer asks for each)."""
        points = self.known()
        xs = [x for x, _ in points]
        return lambda tokens: self._predict(points, xs, tokens)

    def _predict(self, points: list[tuple[float, float]], xs: list[float], tokens: int) -> float | None:
        if not points:
            return None
        if tokens <= EXPLORE_UP_TO and _bucket(tokens) not in self._ms:
            below = [ms for x, ms in points if x <= tokens]
            if below:
                return below[-1]
            # Smaller than every measured size (a fresh proxy has seen a prefill and a whole tree):
            # priced at the smallest one's cost, every size would cost the same, the largest draft
            # would always win and the small sizes would never be measured. Flat-then-linear, a pass
            # costs at least its share of a larger one: optimistic, so the size gets tried.
            x0, ms0 = points[0]
            return ms0 * tokens / x0
        if len(points) == 1:
            return points[0][1]
        i = bisect.bisect_left(xs, tokens)
        if i < len(points) and abs(xs[i] - tokens) < 1e-9:
            return points[i][1]
        lo, hi = (points[-2], points[-1]) if i >= len(points) else (points[0], points[1]) if i == 0 else \
            (points[i - 1], points[i])
        slope = (hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9)
        return max(lo[1] + max(slope, 0.0) * (tokens - lo[0]), 1e-3)


def _bucket(tokens: int) -> int:
    i = bisect.bisect_left(BUCKETS, tokens)
    return BUCKETS[min(i, len(BUCKETS) - 1)]


@dataclass(slots=True)
class Acceptance:
    """How a session's drafts fare: accepted tokens against the drafter's own expectation."""

    expected: float = 1.0
    accepted: float = 1.0
    decay: float = 0.8

    def observe(self, expected: float, accepted: int) -> None:
        self.expected = self.expected * self.decay + expected
        self.accepted = self.accepted * self.decay + accepted

    @property
    def ratio(self) -> float:
        return min(self.accepted / max(self.expected, 1e-6), 2.0)


@dataclass(slots=True)
class StepOverhead:
    """Milliseconds a step costs beyond the worker's pass: the call's way there and back (its
    round trip less the pass's ``forward_ms``) and the proxy's own work until the session's next
    call (drafting, learning, streaming the tokens out). A longer draft saves steps, and with them
    this cost, so leaving it out made drafts too short where passes are cheap: on two shared cores
    it was about 10-15 ms a step beside 35-50 ms passes.

    The call's part is the floor of what was seen: a step that waited behind another pass took
    longer without costing more per step, so waits must not read as overhead. The floor creeps up
    slowly so a lasting change is learned. The proxy's part is a moving average."""

    call_ms: float | None = None
    proxy_ms: float = 0.0
    creep: float = 0.02   # of the floor per step: a floor that was a lucky minimum is left behind
    decay: float = 0.9

    def observe_call(self, round_trip_ms: float, forward_ms: float) -> None:
        seen = max(round_trip_ms - forward_ms, 0.0)
        self.call_ms = seen if self.call_ms is None else min(seen, self.call_ms * (1.0 + self.creep) + 0.01)

    def observe_proxy(self, ms: float) -> None:
        self.proxy_ms = self.proxy_ms * self.decay + max(ms, 0.0) * (1.0 - self.decay)

    @property
    def ms(self) -> float:
        return (self.call_ms or 0.0) + self.proxy_ms


@dataclass(frozen=True, slots=True)
class Load:
    """What the worker reported about its last pass."""

    batch_size: int = 1
    batch_tokens: int = 1
    queue_depth: int = 0     # steps that were waiting behind the pass


def choose_draft_size(probs: list[float], ratio: float, batch_size: int, cost: PassCost,
                      overhead_ms: float = 0.0) -> int:
    """How many of the tree's first nodes to send, when about ``batch_size`` sessions share each pass.

    Every session of the batch is assumed to draft like this one (as SmartSpec picks one
    speculation length per batch): the expected tokens per pass, ``B × (1 + accepted(k))``,
    over the pass time for ``B × (1 + k)`` positions plus the step's ``overhead_ms`` beyond the
    pass (``StepOverhead``). Judging only one's own marginal nodes
    while assuming the others keep theirs would let every session justify its draft and the
    batch as a whole lose; this view cannot."""
    if not probs:
        return 0
    b = max(batch_size, 1)
    prefix = [0.0]
    for p in probs:
        prefix.append(prefix[-1] + p)
    best_size, best_rate = 0, None
    predict = cost.predictor()
    # Every prefix is a candidate, so a draft is cut where its next node stops paying (the pass cost
    # between measured sizes is interpolated), not only at a power of two.
    for k in range(len(probs) + 1):
        ms = predict(b * (1 + k))
        if ms is None:
            return len(probs)  # nothing measured yet: send the whole tree and learn
        rate = b * (1.0 + ratio * prefix[k]) / (ms + overhead_ms)
        if best_rate is None or rate > best_rate * 1.0001:
            best_size, best_rate = k, rate
    return best_size
