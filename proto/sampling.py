"""What the API's sampling fields mean, for the proxy and the workers alike (imports nothing of ours)."""

# A temperature below this decodes greedily: dividing logits by it would overflow fp32 (vLLM draws the
# same line). The proxy's drafters and the workers' verification must agree on it.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW
