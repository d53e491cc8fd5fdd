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
