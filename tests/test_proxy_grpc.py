"""The proxy over a real gRPC channel, in front of a real worker holding SmolLM2."""

import json

import grpc
import pytest
from conftest import trace_files
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quickdraft.proto import quickdraft_pb2 as pb
from quickdraft.proto import quickdraft_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model


def trace_prompts(n_calls: int):
    """Early calls of a real agent trajectory (each prompt cut to fit the small model)."""
    data = json.loads(trace_files(1)[0].read_text())
    msgs = [{"role": m["role"], "content": m["content"][:2500]} for m in data["messages"]]
    out = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and i > 0:
            out.append(msgs[:i])
        if len(out) == n_calls:
            break
    return out


PROMPTS = [
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "user", "content": "List the first twelve months of the year, one per line."}],
    *trace_prompts(2),
]


@pytest.mark.parametrize("idx", range(len(PROMPTS)))
def test_speculative_greedy_equals_plain_greedy(client, idx):
    messages = PROMPTS[idx]
    spec = client.generate(messages, max_tokens=48, speculate=True, session_id=f"eq-spec-{idx}")
    plain = client.generate(messages, max_tokens=48, speculate=False, session_id=f"eq-plain-{idx}")
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text
    # One token per step without speculation (the end-of-turn token takes a step too).
    assert plain.usage.verification_steps == plain.usage.completion_tokens + (plain.finish_reason == "stop")
    assert spec.usage.completion_tokens == len(spec.token_ids) > 0
    assert spec.usage.drafter == "hybrid" and plain.usage.drafter == "none"  # the default


def test_pld_drafter_is_lossless_too(client):
    messages = PROMPTS[1]
    spec = client.generate(messages, max_tokens=40, drafter="pld", session_id="pld-spec")
    plain = client.generate(messages, max_tokens=40, speculate=False, session_id="pld-plain")
    assert spec.token_ids == plain.token_ids
    assert spec.usage.drafter == "pld"


def test_usage_figures_and_session_reuse(client):
    messages = [{"role": "user", "content": "Count from 1 to 25, separated by commas."}]
    first = client.generate(messages, max_tokens=64, session_id="usage")
    u = first.usage
    assert u.prompt_tokens > 0 and u.completion_tokens == len(first.token_ids)
    assert u.verification_steps <= u.completion_tokens
    assert u.accepted_draft_tokens == u.completion_tokens - u.verification_steps + (first.finish_reason == "stop")
    assert u.route == "smollm2-135m" and u.time_to_first_token_ms > 0 and u.total_ms >= u.time_to_first_token_ms
    # The agent's next call extends the conversation: the worker reuses the cached prefix.
    follow = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Now backwards."}]
    second = client.generate(follow, max_tokens=8, session_id="usage")
    assert second.usage.reused_prompt_tokens >= u.prompt_tokens
    assert second.session_id == "usage"
    # Counted tokens: the first call prefilled its whole prompt, the second only what is new
    # (then one token per later step, the previous step's bonus).
    assert u.prefilled_tokens == u.prompt_tokens + u.verification_steps - 1
    v = second.usage
    assert v.prefilled_tokens == v.prompt_tokens - v.reused_prompt_tokens + v.verification_steps - 1
    assert v.prefilled_tokens < v.prompt_tokens - u.prompt_tokens + v.verification_steps


def test_calls_without_session_id_join_the_session_they_extend(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    first = client.generate(messages, max_tokens=12)
    assert first.session_id
    follow = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Three more."}]
    second = client.generate(follow, max_tokens=8)
    assert second.session_id == first.session_id
    unrelated = client.generate([{"role": "user", "content": "What is 2 + 2?"}], max_tokens=4)
    assert unrelated.session_id != first.session_id


def test_streaming_returns_text_in_chunks(client):
    chunks = list(client.stream([{"role": "user", "content": "Count from 1 to 10."}], max_tokens=30))
    assert len(chunks) >= 2
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
    assert chunks[-1].finish_reason in ("stop", "length")


def test_stop_strings_end_the_completion(client):
    r = client.generate([{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
                        max_tokens=60, stop=["5"], session_id="stop")
    assert "5" not in r.text and r.finish_reason == "stop"


def test_list_models(client):
    listing = client.list_models()
    assert [m.name for m in listing.models] == ["smollm2-135m"]
    assert listing.models[0].context_length == 8192
    assert set(listing.drafters) == {"suffix", "stand", "aded", "pld", "hybrid"}


def expect_status(client, code, fragment, messages=None, **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        client.generate(messages if messages is not None else [{"role": "user", "content": "hi"}], **kwargs)
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()


def test_bad_requests_get_invalid_argument_with_a_reason(client, proxy_address):
    inv = grpc.StatusCode.INVALID_ARGUMENT
    expect_status(client, inv, "messages must not be empty", messages=[])
    expect_status(client, inv, "valid models: auto, smollm2-135m", model="gpt-9")
    expect_status(client, inv, "max_tokens must be positive", max_tokens=0)
    expect_status(client, inv, "max_tokens must be positive", max_tokens=-5)
    expect_status(client, inv, "above this server's cap of 4096", max_tokens=5000)
    expect_status(client, inv, "unknown drafter 'nope'", drafter="nope")
    expect_status(client, inv, "temperature must be a finite number >= 0", temperature=-1.0)
    expect_status(client, inv, "temperature must be a finite number >= 0", temperature=float("nan"))
    expect_status(client, inv, "role is 'wizard'", messages=[{"role": "wizard", "content": "x"}])
    long = [{"role": "user", "content": "word " * 9000}]
    expect_status(client, inv, "has a context of 8192 tokens", messages=long, max_tokens=16)
    # Bytes that are not a GenerateRequest at all.
    with grpc.insecure_channel(proxy_address) as channel:
        raw = channel.unary_unary("/quickdraft.v1.DecodeProxy/Generate")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff garbage", timeout=10)
        assert err.value.code() == inv and "not a valid quickdraft.v1.GenerateRequest" in err.value.details()
    # ... and the server still serves.
    assert client.generate([{"role": "user", "content": "hi"}], max_tokens=2).usage.completion_tokens > 0


def test_shared_state_health_reports_redis(proxy_address):
    with grpc.insecure_channel(proxy_address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="quickdraft.v1.SharedState"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_responses_reach_the_shared_log(client, redis_prefix):
    import redis

    client.generate([{"role": "user", "content": "Say hello in French."}], max_tokens=8, session_id="log")
    keys = [k.decode() for k in redis.Redis.from_url("redis://127.0.0.1:6379/0").scan_iter(match=f"{redis_prefix}:*")]
    assert any(k.startswith(f"{redis_prefix}:{{default|") and k.endswith("}:log") for k in keys)


def test_health_and_reflection(proxy_address, worker_address):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for address, service in ((proxy_address, "quickdraft.v1.DecodeProxy"), (worker_address, "quickdraft.v1.Worker")):
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            names = {s.name for s in answers[0].list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names


def test_seeded_sampling_gives_the_same_tokens_with_and_without_speculation(client):
    # Each position's random draw depends only on (seed, position), so speculation cannot
    # change a seeded sample: the strongest form of "the output distribution is the target's".
    messages = [{"role": "user", "content": "List the first twelve months of the year, one per line."}]
    spec_steps = plain_steps = 0
    for seed in (7, 8, 9):
        kw = dict(max_tokens=40, temperature=0.6, top_p=0.95, seed=seed)
        a = client.generate(messages, speculate=True, session_id=f"samp-spec-{seed}", **kw)
        b = client.generate(messages, speculate=False, session_id=f"samp-plain-{seed}", **kw)
        assert a.token_ids == b.token_ids and len(a.token_ids) > 0
        spec_steps += a.usage.verification_steps
        plain_steps += b.usage.verification_steps
    assert spec_steps < plain_steps  # drafts were accepted under sampling


def test_worker_stub_rejects_bad_trees(worker_address):
    with grpc.insecure_channel(worker_address) as channel:
        stub = pb_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Verify(pb.VerifyRequest(session_key="t", new_tokens=[1, 2],
                                         draft=pb.DraftTree(token_ids=[3], parents=[4])), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
