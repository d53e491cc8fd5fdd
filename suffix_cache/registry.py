"""Drafters by name: the names requests, replay and settings use."""

from __future__ import annotations

from collections.abc import Callable

from quickdraft.suffix_cache.aded import AdedDrafter
from quickdraft.suffix_cache.base import Drafter
from quickdraft.suffix_cache.hybrid import HybridDrafter
from quickdraft.suffix_cache.pld import PromptLookupDrafter
from quickdraft.suffix_cache.stand import StandDrafter
from quickdraft.suffix_cache.suffix import SuffixDrafter

DRAFTERS: dict[str, Callable[[], Drafter]] = {
    "suffix": SuffixDrafter,
    "stand": StandDrafter,
    "aded": AdedDrafter,
    "pld": PromptLookupDrafter,
    "hybrid": HybridDrafter,
}


class UnknownDrafterError(ValueError):
    pass


def make_drafter(name: str) -> Drafter:
    factory = DRAFTERS.get(name)
    if factory is None:
        raise UnknownDrafterError(f"unknown drafter {name!r}: use one of {sorted(DRAFTERS)}")
    return factory()


def make_drafters() -> dict[str, Drafter]:
    """One of each drafter, as a proxy holds them. The hybrid's members are the suffix, STAND and
    ADED drafters registered beside it, not copies: each tenant's learned state (a response index
    of up to millions of tokens, n-gram tables) is then held, and taught each response, once."""
    singles = {name: factory() for name, factory in DRAFTERS.items() if factory is not HybridDrafter}
    drafters = dict(singles)
    drafters["hybrid"] = HybridDrafter([singles["suffix"], singles["stand"], singles["aded"]])
    return drafters


def singles(drafters: dict[str, Drafter]) -> dict[str, Drafter]:
    """The drafters that are made of themselves alone (not composites of others), by name."""
    return {name: d for name, d in drafters.items() if d.parts() == (d,)}


def learners(drafters: dict[str, Drafter]) -> list[Drafter]:
    """Every drafter whose state learns from responses, once each, however many composites hold it."""
    unique: dict[int, Drafter] = {}
    for drafter in drafters.values():
        for part in drafter.parts():
            unique.setdefault(id(part), part)
    return list(unique.values())
