"""A worker started with --oracle-traces answers with the recorded agent responses."""

from __future__ import annotations

import pytest
from conftest import trace_files
from test_worker_failover import worker_with_proxy

from quickdraft.bench.traces import trajectory_calls
from quickdraft.catalog import chat_prompt_ids, load_tokenizer
from quickdraft.client import QuickDraftClient


def short_calls(file, limit: int, count: int):
    tok = load_tokenizer("smollm2-135m")
    out = []
    for call in trajectory_calls(file):
        if len(chat_prompt_ids(tok, call.messages)) <= limit:
            out.append((call, tok.encode(call.response, add_special_tokens=False)))
        if len(out) == count:
            break
    assert out, f"no call of {file.name} has a prompt under {limit} tokens"
    return out


@pytest.mark.parametrize("mode", ["model", "fixed-cost"])
def test_oracle_worker_emits_the_recorded_responses(tmp_path, mode):
    file = trace_files(1)[0]
    extra = ["--oracle-traces", str(file)] + (["--pass-cost-ms", "2"] if mode == "fixed-cost" else [])
    with worker_with_proxy(tmp_path, *extra) as (_, proxy_addr, _procs):
        # The real model runs every pass in "model" mode: keep it to one short call there.
        calls = short_calls(file, 4000, 1 if mode == "model" else 3)
        with QuickDraftClient(proxy_addr) as qd:
            for call, recorded in calls:
                budget = 48 if mode == "model" else len(recorded) + 8
                spec = qd.generate(call.messages, max_tokens=budget, session_id=f"{call.trajectory}/spec")
                plain = qd.generate(call.messages, max_tokens=budget, speculate=False,
                                    session_id=f"{call.trajectory}/plain")
                assert spec.token_ids == recorded[:budget] == plain.token_ids
                assert spec.usage.verification_steps < plain.usage.verification_steps
                if mode == "fixed-cost":
                    assert spec.finish_reason == "stop"  # the recording ends with the end of the turn
