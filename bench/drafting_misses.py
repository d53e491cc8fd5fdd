"""Where a drafter's steps are lost: the oracle replay's steps split by kind of text and by context
match, with, for the steps that accept nothing, whether the true next token was among the roots
the drafter offered at all (before the mean budget's cut). A root that was offered but not sent
is a ranking miss; a token no root offered is one no ranking of these candidates could reach::

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

from quickdraft.bench.traces import tokenized_calls, trajectory_files
from quickdraft.catalog import load_tokenizer, tokenizer_id
from quickdraft.suffix_cache.base import Scope, SessionKey
from quickdraft.suffix_cache.budget import MeanBudget
from quickdraft.suffix_cache.registry import make_drafter

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


def measure(paths: Sequence[str | pathlib.Path], drafter_name: str = "suffix", limit: int = 0, budget: int = 8,
            tokenizer_name: str = "smollm2-135m", examples: int = 20, seed: int = 0) -> Misses:
    files = trajectory_files(paths)
    files = files[:limit] if limit else files
    tok = load_tokenizer(tokenizer_name)
    tok_id = tokenizer_id(tok)
    scope = Scope("default", tok_id)
    drafter = make_drafter(drafter_name)
    allot = MeanBudget(mean=budget)
    out = Misses(drafter_name, len(files))
    fence_tokens: dict[int, int] = {}  # token id -> the number of ``` it holds
    pool: list[dict[str, object]] = []
    for file in files:
        for session_id, prompt, response in tokenized_calls(file, tok, tok_id):
            key = SessionKey(scope, session_id)
            drafter.begin_call(key, prompt)
            done = fences = 0
            while done < len(response):
                offered = drafter.propose(key, allot.cap)
                tree = allot.cut(offered)
                allot.spent(len(tree))
                accepted = len(tree.longest_accepted(response[done:]))
                truth = response[done]
                in_offer = any(p < 0 and t == truth for t, p in zip(offered.token_ids, offered.parents, strict=True))
                new = response[done : done + accepted + 1]
                for tally in (out.all, out.by_text["code" if fences % 2 else "prose"],
                              out.by_match[_band(offered.match_len)]):
                    tally.add(accepted, len(new), in_offer)
                if accepted == 0 and examples:
                    context = (list(prompt) + list(response[:done]))[-6:]
                    pool.append({"context": tok.decode(context), "next": tok.decode([truth]),
                                 "match": offered.match_len, "offered": in_offer})
                for t in new:
                    if t not in fence_tokens:
                        fence_tokens[t] = tok.decode([t]).count("```")
                    fences += fence_tokens[t]
                drafter.accept(key, new)
                done += len(new)
            drafter.end_call(key)
    if pool:
        out.examples = random.Random(seed).sample(pool, min(examples, len(pool)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("::")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--drafter", default="suffix")
    ap.add_argument("--limit", type=int, default=0, help="only the first N trajectories (0: all)")
    ap.add_argument("--tokenizer", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=20, help="steps that accepted nothing, sampled for the report")
    ap.add_argument("--json", dest="json_out", type=pathlib.Path)
    a = ap.parse_args()
    result = measure(a.paths, a.drafter, a.limit, tokenizer_name=a.tokenizer, examples=a.examples).to_dict()
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if a.json_out:
        a.json_out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
