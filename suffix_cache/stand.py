"""STAND: stochastic adaptive n-gram drafting with the target's own probabilities.

An n-gram table per scope (tenant, tokenizer) keeps, for every context n-gram
(orders 1..4), a distribution over next tokens built from the target model's
probabilities at the positions it verified (the top-k log-probabilities the
worker returns with every verification; one-hot vectors when only the tokens are
known, as in oracle replay). Prompt tokens are learned one-hot too, since agents'
outputs copy from their prompts. Drafts are trees grown best first from the
longest known context at each node. Under sampling the children are drawn with
Gumbel-top-k from the stored distribution, so the tree's shape follows what the
target is likely to sample; the worker's acceptance (sample from the target,
descend if a child carries the sample) keeps the output distribution exactly the
target's whatever the tree.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from quickdraft.proto.sampling import is_greedy
from quickdraft.suffix_cache.base import Drafter, PositionStats, Scope, SessionKey
from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.ngram_session import NgramState


@dataclass(slots=True)
class StandParams:
    max_order: int = 4
    width: int = 8              # next tokens kept per context
    max_entries: int = 2_000_000
    max_depth: int = 12
    min_prob: float = 0.02
    branch: int = 4             # children per node at most
    learn_prompt: bool = True
    temperature: float = 0.0    # > 0: Gumbel-top-k children; a request's own temperature overrides it


class StandDrafter(Drafter):
    name = "stand"

    def __init__(self, params: StandParams | None = None) -> None:
        self.params = params or StandParams()
        self.state = NgramState(self.params.max_order, self.params.width, self.params.max_entries)
        self._rng = random.Random(0)
        self._temperature: dict[SessionKey, float] = {}

    def set_temperature(self, key: SessionKey, temperature: float) -> None:
        self._temperature[key] = temperature

    def begin_call(self, key: SessionKey, prompt: Sequence[int]) -> None:
        self.flush(key)
        session, new = self.state.begin(key, prompt)
        if self.params.learn_prompt and new:
            before = list(prompt[max(0, len(prompt) - len(new) - self.params.max_order): len(prompt) - len(new)])
            self.state.learn(key, before, new, None, 1.0)

    def propose(self, key: SessionKey, budget: int, min_chance: float = 0.0) -> DraftTree:
        session = self.state.sessions.get(key)
        table = self.state.tables.get(key.scope)
        if session is None or table is None or budget <= 0:
            return DraftTree()
        p = self.params
        temperature = self._temperature.get(key, p.temperature)
        if is_greedy(temperature):  # what the workers decode greedily is greedy for drafting too
            temperature = 0.0
        tokens, parents, probs = table.draft_stand(
            session.tail, budget, p.max_depth, p.min_prob, p.branch, temperature, self._rng.getrandbits(63),
        )
        return DraftTree(tokens, parents, probs)

    def accept(self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None) -> None:
        self.flush(key)
        session = self.state.sessions[key]
        self.state.learn(key, session.tail, tokens, stats, 1.0)
        self.state.advance(session, tokens)

    def follow(self, key: SessionKey, tokens: Sequence[int], stats: Sequence[PositionStats] | None = None) -> None:
        self.state.follow(key, tokens, stats)

    def flush(self, key: SessionKey) -> None:
        self.state.flush(key, 1.0)

    def end_call(self, key: SessionKey) -> None:
        self.flush(key)

    def drop_session(self, key: SessionKey) -> None:
        self.flush(key)
        self.state.sessions.pop(key, None)
        self._temperature.pop(key, None)

    def memory_bytes(self) -> int:
        return self.state.memory_bytes()

    def learn_response(self, scope: Scope, response: Sequence[int]) -> None:
        self.state.table(scope).observe_run([], list(response), [], [], 0, 1.0)
