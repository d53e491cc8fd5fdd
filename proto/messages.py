"""Chat messages as a model reads them, for the proxy and the replay alike (imports nothing of ours).

The chat templates here have no slot for an assistant's tool calls, so a call is written into the
turn's text; the proxy's HTTP endpoint and the trace replay write it the same way, so a replayed
agent's prompts are the prompts that agent would send through the endpoint.
"""

from __future__ import annotations

import json
from typing import Any


def tool_call_text(name: Any, arguments: Any) -> str:
    """One tool call in Hermes-style tags (the shape most open chat models are tuned on). Arguments
    sent as a JSON string, as OpenAI clients send them, are written as the object they hold."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # not JSON: kept as the string the agent wrote
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"
