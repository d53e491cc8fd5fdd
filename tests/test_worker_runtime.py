"""The worker runtime on the real SmolLM2 model: losslessness, KV reuse, resync, eviction."""

import json

import pytest
from conftest import trace_files

from quickdraft.verifiers.runtime import ModelRuntime, VerifyError, VerifyInput

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def runtime():
    import torch

    from quickdraft.verifiers.model_loader import load_model

    torch.set_num_threads(1)
    return ModelRuntime(load_model("smollm2-135m"), kv_budget_bytes=1 << 30)


def plain_greedy(rt, key, prompt, n):
    known, hist, out = 0, list(prompt), []
    while len(out) < n:
        r = rt.verify(VerifyInput(key, known, hist[max(0, known - 16):known], hist[known:]))
        known = r.cached_len
        hist += r.tokens
        out += r.tokens
    return out[:n]


def speculative_greedy(rt, key, prompt, n, reference):
    """Drafts mix right and wrong branches taken from the reference output."""
    known, hist, out, steps = 0, list(prompt), [], 0
    while len(out) < n:
        right = reference[len(out):len(out) + 5]
        tokens, parents = [], []
        if right:
            tokens.append((right[0] + 3) % 49152)  # a wrong first sibling
            parents.append(-1)
            for j, tok in enumerate(right[: 2 + steps % 4]):
                tokens.append(tok)
                parents.append(-1 if j == 0 else len(tokens) - 2)
            tokens.append((right[-1] + 11) % 49152)  # a wrong leaf under the right path's first node
            parents.append(1)
        r = rt.verify(VerifyInput(key, known, hist[max(0, known - 16):known], hist[known:], tokens, parents))
        known = r.cached_len
        hist += r.tokens
        out += r.tokens
        steps += 1
    return out[:n], steps


def prompts(rt):
    data = json.loads(trace_files(1)[0].read_text())
    task = data["messages"][1]["content"][:1500]
    return [
        rt.tokenize([{"role": "user", "content": "Write a Python function that reverses a string."}]),
        rt.tokenize([{"role": "system", "content": data["messages"][0]["content"][:1200]},
                     {"role": "user", "content": task}]),
        rt.tokenize([{"role": "user", "content": "Count from 1 to 30, separated by commas."}]),
    ]


def test_tree_verification_is_token_for_token_plain_greedy(runtime):
    for i, prompt in enumerate(prompts(runtime)):
        ref = plain_greedy(runtime, f"plain{i}", prompt, 40)
        spec, steps = speculative_greedy(runtime, f"spec{i}", prompt, 40, ref)
        assert spec == ref
        assert steps < 40  # drafts were accepted


def test_session_reuse_prefills_only_new_tokens(runtime):
    prompt = prompts(runtime)[0]
    first = runtime.verify(VerifyInput("reuse", 0, [], prompt))
    assert first.computed_tokens == len(prompt)
    history = prompt + first.tokens
    more = [198, 1, 4093]  # a few new tokens after the cached history
    second = runtime.verify(VerifyInput("reuse", first.cached_len, history[first.cached_len - 16:first.cached_len],
                                        history[first.cached_len:] + more))
    assert second.computed_tokens == len(history) - first.cached_len + len(more)
    assert second.cached_len == len(history) + len(more)


def test_diverged_or_unknown_sessions_ask_for_resync(runtime):
    prompt = prompts(runtime)[0]
    r = runtime.verify(VerifyInput("resync", 0, [], prompt))
    # Wrong anchor: the proxy's history does not match what the worker holds.
    bad = runtime.verify(VerifyInput("resync", r.cached_len, [7] * 16, [5]))
    assert bad.resync_required
    # A session the worker never saw.
    assert runtime.verify(VerifyInput("never-seen", 10, [1], [5])).resync_required


def test_eviction_keeps_memory_under_budget_and_forces_resync(runtime):
    prompt = prompts(runtime)[1]
    per_token = runtime.kv_bytes_per_token
    old_budget, old_active = runtime.sessions.budget_bytes, runtime.sessions.active_s
    runtime.sessions.budget_bytes = per_token * (len(prompt) + 600)
    try:
        # A session used moments ago is spared even over budget (evicting it mid-request would thrash) ...
        a = runtime.verify(VerifyInput("evict-a", 0, [], prompt))
        runtime.verify(VerifyInput("evict-b", 0, [], prompt))
        assert runtime.sessions.get("evict-a") is not None
        assert runtime.sessions.nbytes() > runtime.sessions.budget_bytes
        # ... and once it is idle, the least recently used goes first and memory is back under budget.
        runtime.sessions.active_s = 0.0
        runtime.verify(VerifyInput("evict-c", 0, [], prompt))
        assert runtime.sessions.nbytes() <= runtime.sessions.budget_bytes
        again = runtime.verify(VerifyInput("evict-a", a.cached_len, prompt[a.cached_len - 16:a.cached_len], [5]))
        assert again.resync_required
    finally:
        runtime.sessions.budget_bytes, runtime.sessions.active_s = old_budget, old_active


def test_malformed_drafts_are_rejected(runtime):
    prompt = prompts(runtime)[0]
    with pytest.raises(VerifyError, match="parents must precede"):
        runtime.verify(VerifyInput("bad", 0, [], prompt, [1, 2], [-1, 5]))
    with pytest.raises(VerifyError, match="outside the vocabulary"):
        runtime.verify(VerifyInput("bad", 0, [], prompt, [10**7], [-1]))
    with pytest.raises(VerifyError, match="nothing to verify"):
        runtime.verify(VerifyInput("bad", 0, [], []))


def test_batched_steps_of_several_sessions_equal_sequential_decoding(runtime):
    """Sessions of different lengths and draft trees share forward passes; one joins late and
    a malformed request in the same batch fails alone."""
    ps = prompts(runtime)
    refs = [plain_greedy(runtime, f"batch-ref{i}", p, 24) for i, p in enumerate(ps)]
    state = {i: {"known": 0, "hist": list(p), "out": []} for i, p in enumerate(ps)}
    sizes = []
    for step in range(40):
        live = [i for i in state if len(state[i]["out"]) < 24 and (i != 2 or step >= 3)]  # session 2 joins late
        if not live:
            break
        reqs = []
        for i in live:
            st = state[i]
            right = refs[i][len(st["out"]):len(st["out"]) + 3]
            tokens = [(right[0] + 5) % 49152, *right]
            parents = [-1, -1, *range(1, len(right))]
            known = st["known"]
            reqs.append(VerifyInput(f"batch{i}", known, st["hist"][max(0, known - 16):known], st["hist"][known:],
                                    tokens, parents))
        reqs.append(VerifyInput("batch-bad", 0, [], [1, 2, 3], [5], [3]))  # a parent after its child
        results = runtime.verify_batch(reqs)
        assert isinstance(results[-1], VerifyError)
        for i, r in zip(live, results[:-1], strict=True):
            st = state[i]
            st["known"] = r.cached_len
            st["hist"] += r.tokens
            st["out"] += r.tokens
            sizes.append(r.batch_size)
    for i in state:
        assert state[i]["out"][:24] == refs[i]
    assert {2, 3} <= set(sizes)  # passes were shared (the last session may finish alone)


def test_the_cache_goes_under_the_keyword_the_model_takes():
    """transformers renamed the forward's ``past_key_values`` to ``cache`` within 5.x; a cache passed under
    the other name would be ignored and every pass would run without the session's KV."""
    import torch

    from quickdraft.verifiers.kv_cache import cache_keyword

    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            return input_ids

    class Newer(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            return input_ids

    assert cache_keyword(Older()) == "past_key_values"
    assert cache_keyword(Newer()) == "cache"
    with pytest.raises(TypeError, match="takes no KV cache"):
        cache_keyword(torch.nn.Linear(2, 2))


def test_forward_cost_growing_series_extends_the_session(runtime):
    """`bench forward`'s second series decodes as a session does: every pass lengthens the cache."""
    from quickdraft.bench.forward_cost import measure_growing

    points = measure_growing(runtime, contexts=(64,), drafts=(0, 3), steps=3)
    assert [(p["series"], p["context"], p["scored"]) for p in points] == [("growing", 64, 1), ("growing", 64, 4)]
    # Each pass keeps at least the token it fed: after 3 + 3 passes the session is 6 or more longer.
    assert points[0]["end_context"] >= 64 + 3 and points[1]["end_context"] >= points[0]["end_context"] + 3
    assert all(p["median_ms"] > 0 for p in points)


def test_a_pass_that_fails_part_way_leaves_no_stale_cache(runtime):
    """The layers write a step's keys and values before the logits exist; a pass that fails after
    them (out of memory in the head, say) must not leave them for the retry to attend to."""
    prompt = prompts(runtime)[0]
    ref = plain_greedy(runtime, "fail-ref", prompt, 12)
    first = runtime.verify(VerifyInput("fail", 0, [], prompt))
    known, hist = first.cached_len, prompt + first.tokens
    failed = []

    def out_of_memory(module, args, output):
        if not failed:
            failed.append(True)
            raise RuntimeError("out of memory (injected)")

    hook = runtime.model.lm_head.register_forward_hook(out_of_memory)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            runtime.verify(VerifyInput("fail", known, hist[known - 16:known], hist[known:], [ref[1]], [-1]))
    finally:
        hook.remove()
    assert failed
    # The proxy retries the step as it stood: the worker asks for the history instead of reusing it.
    assert runtime.verify(VerifyInput("fail", known, hist[known - 16:known], hist[known:])).resync_required
    assert plain_greedy(runtime, "fail", prompt, 12) == ref


async def test_the_worker_service_runs_every_pass_on_the_model_thread_it_is_given(runtime, monkeypatch):
    # A pass run on another thread than the one that loaded the model (the CLI loads it on this one)
    # brings a second OpenMP team into the process, which slows every pass (model_thread's docstring).
    import threading

    from quickdraft.verifiers.server import WorkerService, model_thread

    thread = model_thread()
    home = thread.submit(lambda: threading.current_thread().name).result()
    seen, verify_batch = [], runtime.verify_batch

    def recorded(requests):
        seen.append(threading.current_thread().name)
        return verify_batch(requests)

    monkeypatch.setattr(runtime, "verify_batch", recorded)
    service = WorkerService(runtime, thread=thread)
    out, _ = await service.batcher.submit(VerifyInput("model-thread", 0, [], runtime.tokenize(
        [{"role": "user", "content": "Hi."}])))
    assert len(out.tokens) == 1 and seen == [home]
    runtime.release("model-thread")
    thread.shutdown()
