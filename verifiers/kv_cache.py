"""Per-session KV caches on a worker, under a memory budget with LRU eviction.

Each layer keeps its keys and values in a buffer that grows by doubling, so a
decoding step writes only its new positions instead of concatenating (and
copying) the whole cache as transformers' DynamicLayer does. Rolling back
rejected draft positions is a length change; keeping the accepted branch of a
draft tree is one gather over the draft's positions.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

log = logging.getLogger(__name__)


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose storage is a pre-grown buffer; ``keys``/``values`` are views."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty((b, h, 256, d))
        self._v = value_states.new_empty((b, h, 256, value_states.shape[-1]))
        self.length = 0
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def _reserve(self, needed: int) -> None:
        cap = self._k.shape[2]
        if needed <= cap:
            return
        # Grow by half (not double): the budget counts reserved memory, and doubling would
        # leave up to half of every session's reservation idle.
        cap = max(needed, cap + cap // 2)
        cap = -(-cap // 256) * 256
        k = self._k.new_empty((*self._k.shape[:2], cap, self._k.shape[3]))
        v = self._v.new_empty((*self._v.shape[:2], cap, self._v.shape[3]))
        k[:, :, : self.length] = self._k[:, :, : self.length]
        v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._reserve(self.length + n)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.set_length(self.length + tokens_to_remove)

    def set_length(self, length: int) -> None:
        if self.is_initialized:
            self.length = max(0, min(length, self.length))
            self._refresh()

    def keep(self, prefix: int, extra: torch.Tensor) -> None:
        """Keep positions [0, prefix) followed by the positions listed in ``extra``."""
        n = extra.numel()
        if n:
            self._k[:, :, prefix : prefix + n] = self._k.index_select(2, extra)
            self._v[:, :, prefix : prefix + n] = self._v.index_select(2, extra)
        self.length = prefix + n
        self._refresh()

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which the model's forward takes a KV cache.

    transformers renamed ``past_key_values`` to ``cache`` within 5.x; a cache handed over under the
    other name lands in ``**kwargs`` unused, and the model silently builds a throwaway cache of its own.
    """
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes no KV cache (neither 'cache' nor 'past_key_values')")


def new_cache(num_layers: int) -> Cache:
    return Cache(layers=[GrowableLayer() for _ in range(num_layers)])


def cache_length(cache: Cache) -> int:
    return cache.layers[0].get_seq_length()


def set_cache_length(cache: Cache, length: int) -> None:
    for layer in cache.layers:
        layer.set_length(length)


def keep_positions(cache: Cache, prefix: int, extra: list[int]) -> None:
    """Keep the first ``prefix`` positions and then ``extra`` (absolute, ascending)."""
    if extra == list(range(prefix, prefix + len(extra))):
        set_cache_length(cache, prefix + len(extra))
        return
    device = cache.layers[0].device
    idx = torch.tensor(extra, dtype=torch.long, device=device)
    for layer in cache.layers:
        layer.keep(prefix, idx)


def cache_nbytes(cache: Cache) -> int:
    return sum(layer.nbytes() for layer in cache.layers)


@dataclass(slots=True)
class SessionKV:
    tokens: list[int] = field(default_factory=list)
    cache: Cache | None = None
    oracle: object | None = None    # the recorded response being followed (oracle-traces workers)


class SessionStore:
    """Session KV caches, least recently used evicted first when over budget.

    A session used within the last ``active_s`` seconds is not evicted even over budget:
    under overload, evicting sessions that are mid-request would make each of them
    re-prefill its whole history on its next step and evict another (a thrash). Memory
    then runs over the budget until requests finish, which the log reports.
    """

    def __init__(self, num_layers: int, budget_bytes: int, active_s: float = 10.0) -> None:
        self.num_layers = num_layers
        self.budget_bytes = budget_bytes
        self.active_s = active_s
        self._sessions: OrderedDict[str, SessionKV] = OrderedDict()
        self._used: dict[str, float] = {}
        self.evictions = 0
        self.over_budget_passes = 0
        self.held_bytes = 0  # as of the last enforce_budget (after every pass): read by Info without the lock

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: str) -> SessionKV | None:
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
            self._used[key] = time.monotonic()
        return session

    def create(self, key: str) -> SessionKV:
        session = SessionKV(cache=new_cache(self.num_layers))
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        self._used[key] = time.monotonic()
        return session

    def release(self, key: str) -> bool:
        self._used.pop(key, None)
        return self._sessions.pop(key, None) is not None

    def nbytes(self) -> int:
        return sum(cache_nbytes(s.cache) for s in self._sessions.values() if s.cache is not None)

    def enforce_budget(self, keep: str | set[str]) -> list[str]:
        """Evict idle sessions (never those in ``keep``) until the budget holds; returns the evicted keys."""
        keep = {keep} if isinstance(keep, str) else keep
        evicted = []
        total = self.nbytes()
        recent = time.monotonic() - self.active_s
        for key in list(self._sessions):
            if total <= self.budget_bytes:
                break
            if key in keep or self._used.get(key, 0.0) > recent:
                continue
            total -= cache_nbytes(self._sessions.pop(key).cache)
            self._used.pop(key, None)
            evicted.append(key)
        self.evictions += len(evicted)
        self.held_bytes = total
        if total > self.budget_bytes:
            self.over_budget_passes += 1
            if self.over_budget_passes % 100 == 1:
                log.warning("KV caches hold %.0f MB, over the %.0f MB budget: every session was active within "
                            "%g s (overload)", total / 2**20, self.budget_bytes / 2**20, self.active_s)
        return evicted
