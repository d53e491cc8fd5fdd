"""What a model's draft would add to copying: the oracle replay, with each step's tree joined by
the greedy chain a language model would draft there.

Model-free drafters copy earlier text; the agent's own prose is mostly new text, which only a
model predicts. This measures how far a model-based candidate source would go, to size that
option against the drafting target: the model reads every call teacher-forced (the prompt's last
``window`` tokens, then the recorded response), which gives its greedy next token at every
response position in one pass. Along the path the replay accepts, that is exactly the chain the
model would draft step by step, so a step's chain of depth D accepts as many tokens as the
model's greedy guesses match the response in a row, up to D. Each step then accepts the longer of
the drafter's branch and the chain (a tree holding both accepts exactly that), and the drafter
keeps a mean budget of ``budget - D`` nodes, so the step still sends ``budget`` on average.
With ``--joint`` the chain's nodes instead join the drafter's tree ranked by the model's own
chance for them (the product of its top probabilities along the chain), and one mean budget cuts
the joined tree, so the chain is long where the model is sure and the copy where it is not::

    python -m quickdraft.bench.model_draft_bound ../shared/traces/swebench-dev --limit 8 --json out.json

The chain's cost (a model pass per step on the drafting side) is not counted: this bounds what
such a drafter could yield, it is not one. Depth 0 is the plain oracle replay's loop, with the
same figures as ``quickdraft replay --oracle``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from quickdraft.bench.traces import tokenized_calls, trajectory_files, trajectory_name
from quickdraft.catalog import load_tokenizer, tokenizer_id
from quickdraft.suffix_cache import _core
from quickdraft.suffix_cache.base import Scope, SessionKey
from quickdraft.suffix_cache.budget import MeanBudget
from quickdraft.suffix_cache.draft import DraftTree
from quickdraft.suffix_cache.registry import make_drafter


@dataclass(slots=True, frozen=True)
class Call:
    trajectory: str
    session_id: str
    prompt: list[int]
    response: list[int]


@dataclass(slots=True)
class BoundRow:
    chain: int                 # depth of the model's greedy chain joined to every step's tree
    drafter_budget: float      # the drafter's mean budget beside it
    tokens_per_step: float
    drafted_per_step: float
    # Shares of steps where the chain alone would accept more than the drafter's tree, and the
    # reverse (joint: the drafter's tree before the budget's cut).
    chain_longer: float
    drafter_longer: float
    joint: bool = False


def load_calls(paths: Sequence[str | pathlib.Path], tokenizer_name: str, limit: int = 0) -> list[Call]:
    files = trajectory_files(paths)
    files = files[:limit] if limit else files
    tok = load_tokenizer(tokenizer_name)
    tok_id = tokenizer_id(tok)
    return [Call(trajectory_name(f), sid, list(prompt), list(response))
            for f in files for sid, prompt, response in tokenized_calls(f, tok, tok_id)]


@dataclass(slots=True, frozen=True)
class Guesses:
    """The model's greedy next token at each response position, and its probability."""

    tokens: list[int]
    probs: list[float]


def greedy_guesses(calls: Sequence[Call], model_name: str, window: int = 1024,
                   progress: bool = True) -> list[Guesses]:
    """The model's greedy next token at every response position of every call, teacher-forced."""
    import torch
    from transformers import AutoModelForCausalLM

    from quickdraft.verifiers.model_loader import checkpoint_path, pick_device

    device = pick_device()
    model = AutoModelForCausalLM.from_pretrained(checkpoint_path(model_name), dtype=torch.float32).to(device).eval()
    # Positions past the model's context get no guess (the chain then accepts nothing there).
    room = getattr(model.config, "max_position_embeddings", 8192) - window
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    guesses: list[Guesses] = []
    columns = (TextColumn(f"teacher-forcing [bold]{model_name}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with torch.inference_mode(), Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("calls", total=len(calls))
        for call in calls:
            context = call.prompt[-window:]
            response = call.response[:room]
            ids = torch.tensor([context + response], device=device)
            logits = model(input_ids=ids).logits[0, len(context) - 1 : len(context) + len(response) - 1]
            top = logits.float().softmax(-1).max(-1)
            guesses.append(Guesses(top.indices.tolist(), top.values.tolist()))
            bar.update(task, advance=1)
    return guesses


def _chain_tree(guess: Guesses, done: int, depth: int) -> tuple[list[int], list[int], list[float]]:
    tokens = guess.tokens[done : done + depth]
    chances, chance = [], 1.0
    for p in guess.probs[done : done + len(tokens)]:
        chance *= p
        chances.append(chance)
    return tokens, list(range(-1, len(tokens) - 1)), chances


def _run(guess: Guesses, response: Sequence[int], done: int, depth: int) -> int:
    """How many of the chain's tokens from ``done`` on match the response, up to ``depth``."""
    n, reach = 0, min(depth, len(guess.tokens) - done)
    while n < reach and guess.tokens[done + n] == response[done + n]:
        n += 1
    return n


def replay_with_chain(calls: Sequence[Call], guesses: Sequence[Guesses], chain: int, budget: int = 8,
                      drafter_name: str = "suffix", tokenizer_name: str = "smollm2-135m",
                      tenant: str = "default", joint: bool = False) -> BoundRow:
    """The oracle replay's loop (``bench/oracle_replay.py``), each step also offered the chain:
    beside the drafter's tree under a budget of its own, or (``joint``) inside it, by chance."""
    if not 0 <= chain < budget and not joint:
        raise ValueError(f"a chain of {chain} tokens leaves no room in a budget of {budget} nodes per step")
    scope = Scope(tenant, tokenizer_id(load_tokenizer(tokenizer_name)))
    drafter = make_drafter(drafter_name)
    allot = MeanBudget(mean=budget if joint else budget - chain)
    steps = out = drafted = chain_longer = drafter_longer = 0
    previous = None
    for call, guess in zip(calls, guesses, strict=True):
        if previous is not None and previous != call.trajectory:
            drafter.drop_session(SessionKey(scope, previous))
        previous = call.trajectory
        key = SessionKey(scope, call.session_id)
        response = call.response
        drafter.begin_call(key, call.prompt)
        done = 0
        while done < len(response):
            tree = drafter.propose(key, allot.cap, min_chance=allot.threshold)
            run = _run(guess, response, done, chain)
            if joint and chain:
                tokens, parents, chances, _ = _core.merge_trees(
                    [(tree.token_ids, tree.parents, list(tree.probs)), _chain_tree(guess, done, chain)],
                    [1.0, 1.0], allot.cap)
                sent = allot.cut(DraftTree(tokens, parents, chances))
                allot.spent(len(sent))
                accepted = len(sent.longest_accepted(response[done:]))
                own = len(tree.longest_accepted(response[done:]))  # the drafter's offer, before the cut
                drafted += len(sent)
            else:
                tree = allot.cut(tree)
                allot.spent(len(tree))
                own = len(tree.longest_accepted(response[done:]))
                accepted = max(own, run)
                drafted += len(tree) + chain
            chain_longer += run > own
            drafter_longer += own > run
            new = response[done : done + accepted + 1]
            drafter.accept(key, new)
            done += len(new)
            steps += 1
            out += len(new)
        drafter.end_call(key)
    n = max(steps, 1)
    return BoundRow(chain, budget if joint else budget - chain, round(out / n, 4), round(drafted / n, 3),
                    round(chain_longer / n, 4), round(drafter_longer / n, 4), joint)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("::")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--model", default="smollm2-135m",
                    help="the model whose greedy chain is joined (its tokenizer too)")
    ap.add_argument("--drafter", default="suffix")
    ap.add_argument("--limit", type=int, default=8, help="only the first N trajectories (0: all)")
    ap.add_argument("--window", type=int, default=1024, help="prompt tokens the model reads before each response")
    ap.add_argument("--chains", default="0,2,4,6", help="chain depths to try, comma-separated")
    ap.add_argument("--joint", default="8,16",
                    help="chain depths to join into the drafter's tree by chance under one budget ('' for none)")
    ap.add_argument("--budget", type=int, default=8, help="nodes per step, as a mean, drafter and chain together")
    ap.add_argument("--guesses", type=pathlib.Path,
                    help="keep the model's guesses in this file, and read them from it when it exists")
    ap.add_argument("--json", dest="json_out", type=pathlib.Path)
    a = ap.parse_args()
    calls = load_calls(a.paths, a.model, a.limit)
    if a.guesses and a.guesses.exists():
        guesses = [Guesses(*g) for g in json.loads(a.guesses.read_text())]
        if len(guesses) != len(calls) or any(len(g.tokens) > len(c.response)
                                             for c, g in zip(calls, guesses, strict=True)):
            raise SystemExit(f"{a.guesses} holds guesses for other calls: remove it or pass the same traces")
    else:
        guesses = greedy_guesses(calls, a.model, a.window)
        if a.guesses:
            a.guesses.write_text(json.dumps([[g.tokens, g.probs] for g in guesses]))
    rows = [asdict(replay_with_chain(calls, guesses, int(d), a.budget, a.drafter, a.model))
            for d in a.chains.split(",") if d]
    rows += [asdict(replay_with_chain(calls, guesses, int(d), a.budget, a.drafter, a.model, joint=True))
             for d in a.joint.split(",") if d]
    result = {"model": a.model, "drafter": a.drafter, "calls": len(calls), "window": a.window, "rows": rows}
    text = json.dumps(result, indent=2)
    if a.json_out:
        a.json_out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
