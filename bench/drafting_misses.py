"""Where a drafter's steps are lost: the oracle replay's steps split by kind of text and by context
match, with, for the steps that accept nothing, whether the true next token was a root of the
tree the drafter offered (its best nodes up to the step cap, 4 × the mean budget, before the
budget's cut). A root offered but not sent is a ranking miss; a token that is no root of the
offer is one no ranking within it could reach::

    python -m quickdraft.bench.drafting_misses ../shared/traces/swebench-dev --limit 12 --json out.json

"Code" is text inside a Markdown code fence of the response so far (the agent's commands and the
file bodies it writes); the rest is "prose".
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from quickdraft.bench.oracle_replay import OracleStep, replay_oracle
from quickdraft.bench.traces import trajectory_files
from quickdraft.catalog import load_tokenizer

MATCH_BANDS = ("0", "1", "2", "3", "4-7", "8+")


def _band(match_len: int) -> str:
    return MATCH_BANDS[min(match_len, 4) if match_len < 8 else 5]


@dataclass(slots=True)
class Tally:
    steps: int = 0
    tokens: int = 0
    accepted_nothing: int = 0
    true_token_offered: int = 0  # of the steps that accepted nothing (offered, so not sent: cut by the budget)

    def add(self, accepted: int, emitted: int, offered: bool) -> None:
        self.steps += 1
        self.tokens += emitted  # accepted + the bonus token, which the response's last step may lack
        if accepted == 0:
            self.accepted_nothing += 1
            self.true_token_offered += offered

    def summary(self, all_steps: int) -> dict[str, float]:
        nothing = max(self.accepted_nothing, 1)
        return {"share_of_steps": round(self.steps / max(all_steps, 1), 4),
                "tokens_per_step": round(self.tokens / max(self.steps, 1), 4),
                "accepted_nothing": round(self.accepted_nothing / max(self.steps, 1), 4),
                "true_token_offered_when_nothing_accepted": round(self.true_token_offered / nothing, 4)}


@dataclass(slots=True)
class Misses:
    drafter: str
    trajectories: int
    all: Tally = field(default_factory=Tally)
    by_text: dict[str, Tally] = field(default_factory=lambda: {"prose": Tally(), "code": Tally()})
    by_match: dict[str, Tally] = field(default_factory=lambda: {b: Tally() for b in MATCH_BANDS})
    examples: list[dict[str, object]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        n = self.all.steps
        return {"drafter": self.drafter, "trajectories": self.trajectories, "steps": n,
                "all": self.all.summary(n),
                "by_text": {k: t.summary(n) for k, t in self.by_text.items()},
                "by_context_match": {k: t.summary(n) for k, t in self.by_match.items()},
                "examples": self.examples}


class _Observer:
    """Tallies each replay step; tracks code fences in the response so far, and keeps a uniform
    sample (reservoir) of the steps that accepted nothing."""

    def __init__(self, out: Misses, tokenizer, examples: int, seed: int) -> None:
        self.out, self.tok, self.examples = out, tokenizer, examples
        self.rng = random.Random(seed)
        self.missed = 0
        self.fences = 0
        self.tail = ""  # the response's last characters, so a fence split across tokens counts
        self.pieces: dict[int, str] = {}

    def __call__(self, step: OracleStep) -> None:
        if step.done == 0:
            self.fences, self.tail = 0, ""
        truth = step.response[step.done]
        offered = step.offered
        in_offer = any(p < 0 and t == truth for t, p in zip(offered.token_ids, offered.parents, strict=True))
        for tally in (self.out.all, self.out.by_text["code" if self.fences % 2 else "prose"],
                      self.out.by_match[_band(offered.match_len)]):
            tally.add(step.accepted, step.emitted, in_offer)
        if step.accepted == 0 and self.examples:
            self._sample(step, truth, in_offer)
        for t in step.response[step.done : step.done + step.emitted]:
            piece = self.pieces.get(t)
            if piece is None:
                piece = self.pieces[t] = self.tok.decode([t])
            text = self.tail + piece
            self.fences += text.count("```") - self.tail.count("```")
            self.tail = text[-2:]

    def _sample(self, step: OracleStep, truth: int, in_offer: bool) -> None:
        self.missed += 1
        slot = len(self.out.examples) if len(self.out.examples) < self.examples else self.rng.randrange(self.missed)
        if slot >= self.examples:
            return
        context = (step.prompt[-6:] + step.response[max(0, step.done - 6) : step.done])[-6:]
        example = {"context": self.tok.decode(context), "next": self.tok.decode([truth]),
                   "match": step.offered.match_len, "offered": in_offer}
        if slot == len(self.out.examples):
            self.out.examples.append(example)
        else:
            self.out.examples[slot] = example


def measure(paths: Sequence[str | pathlib.Path], drafter_name: str = "suffix", limit: int = 0, budget: int = 8,
            tokenizer_name: str = "smollm2-135m", examples: int = 20, seed: int = 0,
            prior_text: str = "stdlib") -> Misses:
    files = trajectory_files(paths)
    files = files[:limit] if limit else files
    out = Misses(drafter_name, len(files))
    observer = _Observer(out, load_tokenizer(tokenizer_name), examples, seed)
    replay_oracle(files, drafter_name, tokenizer_name, budget=budget, progress=False, on_step=observer,
                  prior_text=prior_text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("::")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--drafter", default="suffix")
    ap.add_argument("--limit", type=int, default=0, help="only the first N trajectories (0: all)")
    ap.add_argument("--tokenizer", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=8, help="draft tree nodes per step, as a mean over the run")
    ap.add_argument("--seed", type=int, default=0, help="for the sample of missed steps")
    ap.add_argument("--examples", type=int, default=20, help="steps that accepted nothing, sampled for the report")
    ap.add_argument("--prior-text", default="stdlib", help="public text drafts may also copy from (none: off)")
    ap.add_argument("--json", dest="json_out", type=pathlib.Path)
    a = ap.parse_args()
    result = measure(a.paths, a.drafter, a.limit, a.budget, a.tokenizer, a.examples, a.seed, a.prior_text).to_dict()
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if a.json_out:
        a.json_out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
