"""The large model: Gemma 3 270M (GGUF from its PyPI packages), with local-attention layers.

Its sliding-window layers see only the last 512 positions. The worker keeps every
position in its cache and gives those layers a windowed tree mask; these tests
check the result against the model's own forward pass (no cache, transformers'
masks) on a context longer than the window, and that tree verification stays
token-for-token plain greedy.
"""

import pytest
import torch
from conftest import trace_files
from test_worker_runtime import plain_greedy

from quickdraft.verifiers.runtime import ModelRuntime, VerifyInput

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def gemma():
    from quickdraft.verifiers.model_loader import load_model

    torch.set_num_threads(1)
    return ModelRuntime(load_model("gemma3-270m"), kv_budget_bytes=1 << 30)


def long_prompt(rt) -> list[int]:
    import json

    data = json.loads(trace_files(1)[0].read_text())
    messages = [{"role": m["role"], "content": m["content"][:700]} for m in data["messages"][:8]]
    ids = rt.tokenize(messages)
    assert len(ids) > rt.sliding_window + 100, len(ids)
    return ids


def test_gemma_renders_turns_and_knows_its_window(gemma):
    ids = gemma.tokenize([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    text = gemma.tokenizer.decode(ids)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.sliding_window == 512
    assert gemma.turn_end_token() == gemma.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert gemma.turn_end_token() in gemma.info().eos_token_ids
    assert gemma.info().context_length >= 32768


def test_gemma_cached_decoding_matches_the_models_own_forward(gemma):
    prompt = long_prompt(gemma)
    ours = plain_greedy(gemma, "gemma-plain", prompt, 8)
    # One uncached forward over the prompt and our tokens: a causal model's logits at a position
    # see only what precedes it, so each of our tokens must be the argmax there (the same check
    # as eight forwards, one per token, at an eighth of the cost).
    with torch.inference_mode():
        logits = gemma.model(input_ids=torch.tensor([prompt + ours[:-1]]), logits_to_keep=len(ours)).logits[0]
    assert ours == logits.argmax(-1).tolist()


def test_gemma_tree_verification_is_plain_greedy(gemma):
    prompt = long_prompt(gemma)
    ref = plain_greedy(gemma, "gemma-ref", prompt, 24)
    known, hist, out, steps = 0, list(prompt), [], 0
    while len(out) < 24:
        right = ref[len(out):len(out) + 4]
        tokens = [(right[0] + 7) % gemma.vocab_size, *right]
        parents = [-1, -1, *range(1, len(right))]
        r = gemma.verify(VerifyInput("gemma-spec", known, hist[max(0, known - 16):known], hist[known:],
                                     tokens, parents))
        known = r.cached_len
        hist += r.tokens
        out += r.tokens
        steps += 1
    assert out[:24] == ref
    assert steps <= 24 // 4 + 1
