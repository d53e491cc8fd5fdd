"""The OpenAI-compatible endpoint, driven by the official `openai` client and by plain HTTP."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

HELLO = [{"role": "user", "content": "Name three primary colours."}]


@pytest.fixture(scope="module")
def oa(http_base):
    return openai.OpenAI(base_url=http_base, api_key="unused", max_retries=0)


def test_openai_client_completion_matches_grpc_and_carries_quickdraft_figures(oa, client):
    reply = oa.chat.completions.create(model="auto", messages=HELLO, max_tokens=24, temperature=0,
                                       extra_headers={"X-Session-Id": "http-plain"})
    grpc_reply = client.generate(HELLO, max_tokens=24, session_id="http-grpc")
    assert reply.choices[0].message.content == grpc_reply.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage.model_dump()
    assert usage["completion_tokens"] == len(grpc_reply.token_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["route"] == "smollm2-135m" and usage["fallbacks"] == 0
    assert 1 <= usage["verification_steps"] <= usage["completion_tokens"]
    assert usage["accepted_draft_tokens"] >= 0
    assert reply.model == "smollm2-135m"


def test_openai_client_streaming(oa):
    stream = oa.chat.completions.create(model="smollm2-135m", messages=HELLO, max_tokens=24, stream=True,
                                        stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    whole = oa.chat.completions.create(model="smollm2-135m", messages=HELLO, max_tokens=24)
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0
    assert len([p for p in pieces if p]) > 1  # it really streamed


def test_openai_client_lists_models(oa):
    ids = {m.id for m in oa.models.list()}
    assert {"auto", "smollm2-135m"} <= ids


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "gpt-17", "messages": HELLO}, 400, "unknown model"),
    ({"model": "auto", "messages": []}, 400, "messages must not be empty"),
    ({"model": "auto", "messages": HELLO, "max_tokens": -3}, 400, "max_tokens must be positive"),
    ({"model": "auto", "messages": HELLO, "max_tokens": 10_000_000}, 400, "cap"),
    ({"model": "auto", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "auto"}, 400, "messages"),
    ({"model": "auto", "messages": HELLO, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    # Numbers that do not fit the protobuf fields they travel in: a 400 naming the field, not a 500.
    ({"model": "auto", "messages": HELLO, "seed": -1}, 400, "seed"),
    ({"model": "auto", "messages": HELLO, "seed": 2**64}, 400, "seed"),
    ({"model": "auto", "messages": HELLO, "top_k": 2**31}, 400, "top_k"),
    ({"model": "auto", "messages": HELLO, "max_tokens": 2**31}, 400, "max_tokens"),
    ({"model": "auto", "messages": HELLO, "max_draft_tokens": 2**32}, 400, "max_draft_tokens"),
    ({"model": "auto", "messages": HELLO, "temperature": 1e39}, 400, "temperature must be a finite number"),
    # Options that would change the answer: refused with the reason, never silently ignored.
    ({"model": "auto", "messages": HELLO, "tools": [{"type": "function", "function": {"name": "ls"}}]}, 400,
     "tools are not supported yet"),
    ({"model": "auto", "messages": HELLO, "logprobs": True}, 400, "logprobs"),
    ({"model": "auto", "messages": HELLO, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "auto", "messages": HELLO, "logit_bias": {"42": 5}}, 400, "logit_bias"),
])
def test_bad_requests_get_openai_style_errors(http_base, body, status, needle):
    r = httpx.post(f"{http_base}/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_openai_client_raises_its_own_error_types(oa):
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model="gpt-17", messages=HELLO, max_tokens=4)
    assert "valid models" in info.value.message


def test_metrics_endpoint_counts_what_was_served(http_base, client):
    client.generate(HELLO, max_tokens=8, session_id="metrics")
    with pytest.raises(grpc.RpcError):
        client.generate(HELLO, max_tokens=8, model="gpt-17")
    text = httpx.get(http_base.removesuffix("/v1") + "/metrics", timeout=30).text
    samples = [(sample.name, sample.labels, sample.value)
               for family in text_string_to_metric_families(text) for sample in family.samples]

    def total(name, **labels):
        return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))

    assert total("quickdraft_requests_total", model="smollm2-135m", outcome="ok") >= 1
    # A model name no worker serves is counted, but not as a label of its own: a client could mint them.
    assert total("quickdraft_requests_total", model="unknown", outcome="invalid_argument") >= 1
    assert not any(lab.get("model") == "gpt-17" for _, lab, _ in samples)
    assert total("quickdraft_completion_tokens_total") >= 8
    assert total("quickdraft_verification_steps_total") >= 1
    assert total("quickdraft_time_to_first_token_seconds_count") >= 1
    assert total("quickdraft_tokens_per_step_count") >= 1
    assert total("quickdraft_shared_state_up") == 1.0
    assert total("quickdraft_requests_in_flight") == 0.0
    # Per worker (refreshed by the health round every 2 s): up, queue depth, batch size.
    assert total("quickdraft_worker_up", model="smollm2-135m") >= 1
    assert {"quickdraft_worker_queue_depth", "quickdraft_worker_batch_size"} <= {n for n, _, _ in samples}
    assert total("quickdraft_records_up") == 1.0
    # Memory, for soaks and dashboards: the proxy process's own and each worker's (RSS, KV caches).
    assert total("process_resident_memory_bytes") > 10 * 2**20
    assert total("quickdraft_worker_resident_memory_bytes") > 100 * 2**20
    assert total("quickdraft_worker_kv_cache_bytes") > 0 and total("quickdraft_worker_sessions") >= 1


def test_what_openai_clients_also_send_is_understood(oa):
    """The developer role (the system role's newer name), tools the client says not to use, and the
    single-model lookup."""
    reply = oa.chat.completions.create(
        model="auto", max_tokens=8, temperature=0,
        messages=[{"role": "developer", "content": "Answer briefly."}, *HELLO],
        tools=[{"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}],
        tool_choice="none")
    assert reply.choices[0].message.content and reply.usage.prompt_tokens > 0
    assert oa.models.retrieve("smollm2-135m").id == "smollm2-135m"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-17")


def test_unknown_paths_get_the_same_error_shape(http_base):
    r = httpx.get(f"{http_base}/completions", timeout=30)
    assert r.status_code in (404, 405)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{http_base}/chat/completions", json={"messages": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_every_streamed_chunk_names_the_model_and_the_session_comes_first(http_base):
    body = {"model": "auto", "messages": HELLO, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", f"{http_base}/chat/completions", json=body, timeout=60,
                      headers={"X-Session-Id": "http-stream-named"}) as r:
        assert r.headers["x-session-id"] == "http-stream-named"
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert len(events) > 2 and {e["model"] for e in events} == {"smollm2-135m"}


def test_a_client_that_gives_up_stops_its_generation(http_base):
    """A non-streaming request whose client times out is cancelled in the proxy, so the session and
    the admission slot are free for the client's retry."""
    # SmolLM2 answers this at length (past 800 tokens, greedy, fp32 and bf16 kernels alike), so 3,000
    # tokens take the 2-core CPU tens of seconds even with speculation. (It stops counting at 20.)
    essay = {"role": "user", "content": "Write a long, detailed essay of at least 1500 words about the history "
                                        "of lighthouses."}
    body = {"model": "auto", "messages": [essay], "max_tokens": 3000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{http_base}/chat/completions", json=body, timeout=httpx.Timeout(60, read=3),
                   headers={"X-Session-Id": "http-gives-up"})
    metrics = http_base.removesuffix("/v1") + "/metrics"

    def in_flight() -> float:
        text = httpx.get(metrics, timeout=30).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "quickdraft_requests_in_flight")

    deadline = time.monotonic() + 10
    while in_flight() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert in_flight() == 0


def test_earlier_tool_calls_in_the_history_reach_the_model_as_text():
    """An agent's history holds assistant turns that only called a tool (content null) and the tool's
    results; the model must see the call, not an empty turn before a result from nowhere."""
    from quickdraft.proxy.errors import InvalidRequest
    from quickdraft.proxy.http_api import ChatCompletionRequest, to_grpc

    call = {"id": "call_1", "type": "function",
            "function": {"name": "bash", "arguments": json.dumps({"command": "ls é"})}}
    body = ChatCompletionRequest(model="auto", tool_choice="none", messages=[
        {"role": "user", "content": "List the files."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.py\nb.py"},
        {"role": "assistant", "content": "Reading it now.", "tool_calls": [
            {**call, "function": {"name": "read", "arguments": "not json"}}]},
    ])
    messages = to_grpc(body, "s").messages
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1].content == '<tool_call>\n{"name": "bash", "arguments": {"command": "ls é"}}\n</tool_call>'
    assert messages[2].content == "a.py\nb.py"
    assert messages[3].content == ('Reading it now.\n<tool_call>\n{"name": "read", "arguments": "not json"}\n'
                                   "</tool_call>")
    broken = ChatCompletionRequest(model="auto", messages=[{"role": "assistant", "tool_calls": [{"id": "x"}]}])
    with pytest.raises(InvalidRequest, match="function.name"):
        to_grpc(broken, "s")
