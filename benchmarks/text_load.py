"""The text load shared by every target: prompts, sampling and request counts.

Every request asks for exactly ``max_tokens`` output tokens (``ignore_eos``), streamed, with
usage in the last chunk so that the count can be checked.
"""

from __future__ import annotations

import json

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "Write the opening of a mystery set in a lighthouse.",
    "Describe a dragon's library in three sentences.",
    "Give a villain a short, menacing monologue.",
    "Summarise a heist story in one paragraph.",
]
TEMPERATURE = 0.8
TOP_P = 0.95


def requests_for(concurrency: int) -> int:
    """Requests per level: enough for a steady state at each concurrency."""
    return max(8, 2 * concurrency)


def chat_bodies(max_tokens: int) -> list[bytes]:
    """The ``/v1/chat/completions`` request bodies, one per prompt."""
    return [
        json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": TEMPERATURE,
                "top_p": TOP_P,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        for prompt in PROMPTS
    ]
