"""A target whose choices are recorded agent responses (`quickdraft worker --oracle-traces`).

A 135M model's own greedy text on agent prompts loops or stops early, so live
figures on it say little about agent workloads. With oracle traces the worker
still runs its real forward pass over exactly the tokens it would score (time,
KV memory and batching stay real) but takes each next token from the response
that the agent's own model recorded for the same prompt, ending it with the
end-of-turn token. Prompts it has no recording for fall back to the model's
choice. ``--pass-cost-ms`` replaces the model with a fixed cost per pass, for
quick checks only.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


def _digest(tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(array("i", tokens).tobytes(), digest_size=16).digest()


@dataclass(slots=True)
class OracleCursor:
    """Where a session stands in the recorded response it is following."""

    prompt_len: int
    response: list[int]


class OracleTarget:
    def __init__(self, responses: dict[bytes, list[int]]) -> None:
        self.responses = responses

    @classmethod
    def from_traces(cls, paths: Sequence[str | pathlib.Path], tokenizer, tok_id: str, end_token: int,
                    max_prompt_tokens: int | None = None) -> OracleTarget:
        """Index every call of the trajectories by its prompt's tokens (tokenization is cached on disk)."""
        from quickdraft.bench.traces import tokenized_calls, trajectory_files

        responses: dict[bytes, list[int]] = {}
        for file in trajectory_files(paths):
            for _, prompt, response in tokenized_calls(file, tokenizer, tok_id):
                if max_prompt_tokens is None or len(prompt) <= max_prompt_tokens:
                    responses[_digest(prompt)] = [*response, end_token]
        log.info("oracle target: %d recorded responses", len(responses))
        return cls(responses)

    def follow(self, history: Sequence[int], cursor: OracleCursor | None) -> OracleCursor | None:
        """The recording this history is inside (the current one if it still agrees, else a new prompt's)."""
        if cursor is not None and len(history) >= cursor.prompt_len:
            done = len(history) - cursor.prompt_len
            if done <= len(cursor.response) and list(history[cursor.prompt_len:]) == cursor.response[:done]:
                return cursor
        response = self.responses.get(_digest(history))
        return OracleCursor(len(history), response) if response is not None else None

    @staticmethod
    def walk(cursor: OracleCursor, history_len: int, draft_tokens: Sequence[int],
             draft_parents: Sequence[int]) -> tuple[list[int], list[int]]:
        """(emitted tokens, accepted node indices): the longest branch equal to the recording, plus the next."""
        target = cursor.response[history_len - cursor.prompt_len:]
        children: dict[int, dict[int, int]] = {}
        for i, (tok, parent) in enumerate(zip(draft_tokens, draft_parents, strict=True)):
            children.setdefault(parent, {}).setdefault(int(tok), i)
        emitted: list[int] = []
        accepted: list[int] = []
        node = -1
        for tok in target:
            emitted.append(tok)
            nxt = children.get(node, {}).get(tok)
            if nxt is None:
                break
            accepted.append(nxt)
            node = nxt
        return emitted, accepted
