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
the joined tree, so the chain is long where the model is sure and the copy where it is not.
Past the chain's first wrong guess its chances are the teacher-forced ones (after its own wrong
token the model's would differ); those nodes are never accepted, only counted by the budget::

    python -m quickdraft.bench.model_draft_bound ../shared/traces/swebench-dev --limit 8 --json out.json

The chain's cost (a model pass per drafted token) is not counted: this bounds what
such a drafter could yield, it is not one. Depth 0 is the plain oracle replay's loop, with the
same figures as ``quickdraft replay --oracle`` on the same trajectory files. Joined, the model's
chances are its raw probabilities beside the suffix drafter's calibrated ones: a model sure of
wrong guesses would push the copy out (the tests show it), which SmolLM2 on agent text does not.
"""

from __future__ import annotations

import argparse
import hashlib
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
    """One assistant message of a trajectory, tokenized as the oracle replay sees it."""

    file: str          # the trajectory's path: its session ends with the file, as in the replay
    session_id: str
    prompt: list[int]
    response: list[int]


@dataclass(slots=True, frozen=True)
class Guesses:
    """The model's greedy next token at each response position, and its probability (a call's
    later positions may have none: past the model's context)."""

    tokens: list[int]
    probs: list[float]


@dataclass(slots=True)
class BoundRow:
    chain: int                 # depth of the model's greedy chain offered at every step
    drafter_budget: float      # the drafter's mean budget (joint: the one budget of both)
    tokens_per_step: float
    drafted_per_step: float
    # Shares of steps where the chain alone would accept more than the drafter's tree, and the
    # reverse. Beside: the drafter's tree as sent. Joint: as the drafter proposed it under the
    # budget's threshold, before the chain competes for the room (so the modes' shares differ).
    chain_longer: float
    drafter_longer: float
    joint: bool = False


def load_calls(paths: Sequence[str | pathlib.Path], tokenizer_name: str, limit: int = 0) -> list[Call]:
    files = trajectory_files(paths)
    files = files[:limit] if limit else files
    tok = load_tokenizer(tokenizer_name)
    tok_id = tokenizer_id(tok)
    return [Call(str(f), sid, list(prompt), list(response))
            for f in files for sid, prompt, response in tokenized_calls(f, tok, tok_id)]


def _context(call: Call, window: int) -> list[int]:
    """The prompt tokens the model reads before the response."""
    return call.prompt[max(0, len(call.prompt) - window):]


def greedy_guesses(calls: Sequence[Call], model_name: str, window: int = 1024,
                   progress: bool = True) -> list[Guesses]:
    """The model's greedy next token at every response position of every call, teacher-forced
    after the prompt's last ``window`` tokens."""
    if window < 1:
        raise ValueError("the model needs at least one prompt token before the response (window >= 1)")
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import AutoModelForCausalLM

    from quickdraft.verifiers.model_loader import checkpoint_path, pick_device

    device = pick_device()
    model = AutoModelForCausalLM.from_pretrained(checkpoint_path(model_name), dtype=torch.float32).to(device).eval()
    max_positions = getattr(model.config, "max_position_embeddings", 8192)
    if window >= max_positions:
        raise ValueError(f"a window of {window} tokens leaves no room in {model_name}'s {max_positions} positions")
    guesses: list[Guesses] = []
    columns = (TextColumn(f"teacher-forcing [bold]{model_name}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with torch.inference_mode(), Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("calls", total=len(calls))
        for call in calls:
            context = _context(call, window)
            # Positions past the model's context get no guess (the chain accepts nothing there).
            response = call.response[: max_positions - len(context)]
            ids = torch.tensor([context + response], device=device)
            # Only the rows that predict response tokens (the last one predicts past the response).
            logits = model(input_ids=ids, logits_to_keep=len(response) + 1).logits[0, :-1]
            top = logits.softmax(-1).max(-1)
            guesses.append(Guesses(top.indices.tolist(), top.values.tolist()))
            bar.update(task, advance=1)
    return guesses


def _fingerprint(calls: Sequence[Call], model_name: str, window: int) -> str:
    """What the guesses were computed from: the model, the window, and every call's tokens."""
    h = hashlib.sha256(f"{model_name}|{window}".encode())
    for call in calls:
        h.update(repr((_context(call, window), call.response)).encode())
    return h.hexdigest()


def load_or_compute_guesses(calls: Sequence[Call], model_name: str, window: int,
                            path: pathlib.Path | None = None, progress: bool = True) -> list[Guesses]:
    """The model's guesses, read from ``path`` if it holds them for these calls, model and window;
    otherwise computed (and kept in ``path``, if given)."""
    if path is None:
        return greedy_guesses(calls, model_name, window, progress)
    fingerprint = _fingerprint(calls, model_name, window)
    if path.exists():
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict) or stored.get("fingerprint") != fingerprint:
            raise ValueError(f"{path} holds guesses for other calls, another model or another window: "
                             "remove it or pass the same traces and options")
        return [Guesses(tokens, probs) for tokens, probs in stored["guesses"]]
    guesses = greedy_guesses(calls, model_name, window, progress)
    path.write_text(json.dumps({"fingerprint": fingerprint, "guesses": [[g.tokens, g.probs] for g in guesses]}))
    return guesses


def _chain_tree(guess: Guesses, done: int, depth: int) -> tuple[list[int], list[int], list[float]]:
    """The chain from response position ``done`` as a one-branch tree (tokens, parents, chances),
    each node's chance the product of the model's probabilities down to it."""
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


def check_depth(chain: int, budget: int, joint: bool) -> None:
    if chain < 0 or (not joint and chain >= budget):
        raise ValueError(f"a chain of {chain} tokens beside the drafter leaves it no room in a budget of "
                         f"{budget} nodes per step (use a shorter chain, or join it)")


def replay_with_chain(calls: Sequence[Call], guesses: Sequence[Guesses], chain: int, budget: int = 8,
                      drafter_name: str = "suffix", tokenizer_name: str = "smollm2-135m",
                      tenant: str = "default", joint: bool = False) -> BoundRow:
    """The oracle replay's loop (``bench/oracle_replay.py``), each step also offered the chain:
    beside the drafter's tree under a budget of its own, or (``joint``) inside it, by chance.
    Beside, the chain counts ``chain`` nodes every step; joined, the nodes sent (a chain is
    shorter near a response's end)."""
    check_depth(chain, budget, joint)
    scope = Scope(tenant, tokenizer_id(load_tokenizer(tokenizer_name)))
    drafter = make_drafter(drafter_name)
    allot = MeanBudget(mean=budget if joint else budget - chain)
    steps = out = drafted = chain_longer = drafter_longer = 0
    previous: Call | None = None
    for call, guess in zip(calls, guesses, strict=True):
        if previous is not None and previous.file != call.file:
            drafter.drop_session(SessionKey(scope, trajectory_name(pathlib.Path(previous.file))))
        previous = call
        key = SessionKey(scope, call.session_id)
        response = call.response
        drafter.begin_call(key, call.prompt)
        done = 0
        while done < len(response):
            tree = drafter.propose(key, allot.cap, min_chance=allot.threshold)
            run = _run(guess, response, done, chain)
            rest = response[done:]
            if joint and chain:
                tokens, parents, chances, _ = _core.merge_trees(
                    [(tree.token_ids, tree.parents, list(tree.probs)), _chain_tree(guess, done, chain)],
                    [1.0, 1.0], allot.cap)
                sent = allot.cut(DraftTree(tokens, parents, chances))
                allot.spent(len(sent))
                accepted = len(sent.longest_accepted(rest))
                own = len(tree.longest_accepted(rest))
                drafted += len(sent)
            else:
                tree = allot.cut(tree)
                allot.spent(len(tree))
                own = len(tree.longest_accepted(rest))
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


def _depths(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("::")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--model", default="smollm2-135m",
                    help="the model whose greedy chain is offered (its tokenizer too)")
    ap.add_argument("--drafter", default="suffix")
    ap.add_argument("--limit", type=int, default=8, help="only the first N trajectories (0: all)")
    ap.add_argument("--window", type=int, default=1024, help="prompt tokens the model reads before each response")
    ap.add_argument("--chains", default="0,2,4,6", help="chain depths to offer beside the drafter, comma-separated")
    ap.add_argument("--joint", default="8,16",
                    help="chain depths to join into the drafter's tree by chance under one budget ('' for none)")
    ap.add_argument("--budget", type=int, default=8, help="nodes per step, as a mean, drafter and chain together")
    ap.add_argument("--guesses", type=pathlib.Path,
                    help="keep the model's guesses in this file, and read them from it when it holds these calls'")
    ap.add_argument("--json", dest="json_out", type=pathlib.Path)
    args = ap.parse_args()
    beside, joined = _depths(args.chains), _depths(args.joint)
    try:  # before the model's pass, which takes minutes
        for d in beside:
            check_depth(d, args.budget, joint=False)
        for d in joined:
            check_depth(d, args.budget, joint=True)
        calls = load_calls(args.paths, args.model, args.limit)
        guesses = load_or_compute_guesses(calls, args.model, args.window, args.guesses)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    rows = [asdict(replay_with_chain(calls, guesses, d, args.budget, args.drafter, args.model)) for d in beside]
    rows += [asdict(replay_with_chain(calls, guesses, d, args.budget, args.drafter, args.model, joint=True))
             for d in joined]
    result = {"model": args.model, "drafter": args.drafter, "calls": len(calls), "window": args.window, "rows": rows}
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
