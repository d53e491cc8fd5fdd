"""The drafter interface every model-free drafter implements.

A drafter keeps two kinds of state:

* per session (tenant, session id, tokenizer): the conversation's token history,
  extended incrementally across the calls of one agent run;
* per scope (tenant, tokenizer): what the tenant's earlier responses taught it.

One tenant's state never drafts for another, and token ids of one tokenizer are
never matched against another's.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import NamedTuple

from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.prior_text import PriorText


# The two keys are named tuples rather than frozen dataclasses: every drafting step looks
# them up in several dicts, and a tuple hashes in C (a dataclass's generated __hash__ is a
# Python call, about 0.5 µs a lookup on the dev machine).
class Scope(NamedTuple):
    """Where learned state lives: one tenant, one vocabulary."""

    tenant: str
    tokenizer: str


class SessionKey(NamedTuple):
    scope: Scope
    session_id: str


@dataclass(frozen=True, slots=True)
class PositionStats:
    """The target's distribution at one verified position (top-k and entropy)."""

    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]
    entropy: float


@dataclass(slots=True)
class AcceptedRun:
    """Tokens a session accepted, in order, waiting to be learned, with the target's statistics
    for them as long as every part came with some (None from the first part without: a run is
    learned either with its statistics or one-hot, not half and half)."""

    tokens: list[int] = field(default_factory=list)
    stats: list[PositionStats] | None = field(default_factory=list)

    def add(self, tokens: Sequence[int], stats: Sequence[PositionStats] | None) -> None:
        self.tokens.extend(tokens)
        if self.stats is not None and stats is not None and len(stats) >= len(tokens):
            self.stats.extend(stats[: len(tokens)])
        else:
            self.stats = None


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] holds, a[:hi] == b[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Drafter(ABC):
    """Proposes draft trees for a session and learns from accepted tokens."""

    name: str = ""

    @abstractmethod
    def begin_call(self, key: SessionKey, prompt: Sequence[int]) -> None:
        """A new call of the session: ``prompt`` usually extends the last call's history."""

    @abstractmethod
    def propose(self, key: SessionKey, budget: int, min_chance: float = 0.0) -> DraftTree:
        """A draft tree of at most ``budget`` nodes continuing the session's history. A caller that
        will cut every node whose acceptance chance is under ``min_chance`` (``MeanBudget``) may say
        so: a drafter is then free to leave those nodes out (counted in the tree's ``left_out``)."""

    @abstractmethod
    def accept(
        self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None
    ) -> None:
        """Tokens the target produced (accepted draft tokens and the bonus token)."""

    @abstractmethod
    def end_call(self, key: SessionKey) -> None:
        """The call's response is complete; learn it for the session's scope."""

    @abstractmethod
    def drop_session(self, key: SessionKey) -> None:
        """Forget the session's own state (scope-wide learning stays)."""

    def memory_bytes(self) -> int | None:
        """Bytes of the tenants' and sessions' learned state this drafter holds (shared prior text not
        counted); None: not measured."""
        return None

    def parts(self) -> tuple[Drafter, ...]:
        """The drafters whose learned state this one is made of: itself, or a composite's members (a
        proxy that holds both teaches each part once)."""
        return (self,)

    def offered(self, key: SessionKey) -> DraftTree | None:
        """The whole tree the last ``propose`` grew for the session, nodes it left out under
        ``min_chance`` included, or None: nothing proposed since the call began or since the last
        ``accept``, or a drafter that does not keep its tree. A caller that needs those nodes after
        all need not ask again."""
        return None

    def follow(self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None) -> None:
        """Like ``accept``, but the learning may wait for ``flush`` (or the call's end): the context
        moves past ``tokens`` at once. A drafter that cannot split the two learns here."""
        self.accept(key, tokens, stats)

    def flush(self, key: SessionKey) -> None:  # noqa: B027 (optional hook)
        """Learn what ``follow`` deferred for the session."""

    def set_temperature(self, key: SessionKey, temperature: float) -> None:  # noqa: B027 (optional hook)
        """The session's current call samples at ``temperature`` (0: greedy). Drafters that draw
        their trees stochastically follow it; the others need not care, since acceptance is
        lossless whatever the tree."""

    def use_prior(self, prior: PriorText) -> None:  # noqa: B027 (optional hook)
        """Public text every tenant of ``prior.tokenizer`` may draft from (``prior_text``); a drafter
        that cannot use it ignores it."""

    def maintain_in(self, executor: Executor | None) -> None:  # noqa: B027 (optional hook)
        """Rebuild large learned structures on ``executor`` (a thread) and swap them in when done,
        rather than in the call that makes them due (None, the default: in that call, so a replay's
        drafts never depend on timing). The proxy passes one, so its event loop never stalls on them."""

    def learn_response(self, scope: Scope, response: Sequence[int]) -> None:  # noqa: B027 (optional hook)
        """Learn a response produced elsewhere (another replica, or a restart's replay)."""

    def export_state(self, scope: Scope) -> bytes | None:
        """What the scope taught this drafter that replaying responses cannot rebuild (for example
        how often its drafts were accepted), as bytes for the shared store; None: nothing new since
        the last export. May be called from another thread than the one drafting."""
        return None

    def import_state(self, scope: Scope, data: bytes) -> bool:
        """Start the scope from ``export_state``'s bytes (another replica's, or a previous run's);
        False if they are not this drafter's (the drafter then keeps what it has)."""
        return False


def takes_min_chance(drafter: Drafter) -> bool:
    """Whether ``drafter.propose`` takes ``min_chance`` by that name (callers then pass it as a
    keyword; a drafter written against the older, two-argument interface is called the old way)."""
    try:
        params = inspect.signature(drafter.propose).parameters
    except (TypeError, ValueError):
        return False
    named = params.get("min_chance")
    if named is not None:
        return named.kind is not inspect.Parameter.POSITIONAL_ONLY
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def export_states(drafters: Mapping[str, Drafter], scope: Scope) -> dict[str, bytes]:
    """Each drafter's new learned state for the scope, by the name it is registered under."""
    blobs = {name: d.export_state(scope) for name, d in drafters.items()}
    return {name: blob for name, blob in blobs.items() if blob}


def import_states(drafters: Mapping[str, Drafter], scope: Scope, blobs: Mapping[str, bytes]) -> list[str]:
    """Hand each stored state to the drafter registered under its name; returns the names whose
    state a drafter refused (another version's). States of drafters not present are skipped."""
    return [name for name, blob in blobs.items()
            if name in drafters and not drafters[name].import_state(scope, blob)]
