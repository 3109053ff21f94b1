"""Do long prompts stall other streams? One stream's token gaps, alone and beside long prompts.

Starts ``fictures-ai serve`` on a free port (or uses ``--url``) and, in one run, streams the
same request three times through ``/api/v1/text/stream`` while measuring the gaps between its
events:

- ``alone``: nothing else runs (the reference);
- ``beside 50k-character prompts``: another client keeps sending 50,000-character prompts
  (the contract's largest), back to back. The bundled model's context is 8,192 tokens, so each
  is tokenised (~12,000 tokens) and refused with 400: the stream sees only what tokenising
  costs the server;
- ``beside 20k-character prompts``: another client keeps sending 20,000-character prompts (the
  web app's usual size, ~4,500 tokens) that run with ``max_tokens: 1``: the stream sees
  tokenising and the engine's prefill of each prompt, which shares the engine with it.

Prints p50/p99/max gaps and their ratios to ``alone``, and writes them to
``benchmarks/results/long_prompt.json``. The machine is shared and noisy: compare the
ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from loadgen import percentile  # noqa: E402
from text_concurrency import measure_and_write  # noqa: E402

RESULTS = HERE / "results" / "long_prompt.json"
STREAM = {"prompt": "Tell a long story about a lighthouse.", "max_tokens": 160,
          "temperature": 0.8, "min_tokens": 160}  # fmt: skip
SENTENCE = (
    "The keeper climbed the one hundred and twelve steps while the storm beat on the glass, "
    "counting each one aloud so that his daughter below could follow his voice. "
)


def prompt_of(characters: int, number: int) -> str:
    """English-like text of exactly ``characters`` characters, starting with ``number`` so that
    no two prompts share a prefix (vLLM's prefix cache would skip most of a repeated prefill)."""
    text = f"Draft {number}. " + SENTENCE * (characters // len(SENTENCE) + 1)
    return text[:characters]


async def stream_gaps(client: httpx.AsyncClient) -> list[float]:
    """The seconds between consecutive events of one stream (after its first)."""
    gaps: list[float] = []
    last: float | None = None
    async with client.stream("POST", "/api/v1/text/stream", json=STREAM) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
    return gaps


async def send_long_prompts(
    client: httpx.AsyncClient, characters: int, stop: asyncio.Event, counts: dict[str, int]
) -> None:
    while not stop.is_set():
        number = sum(counts.values())
        body = {"prompt": prompt_of(characters, number), "max_tokens": 1}
        response = await client.post("/api/v1/text/generate", json=body)
        counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1


async def scenario(
    client: httpx.AsyncClient, characters: int | None, senders: int
) -> dict[str, Any]:
    stop = asyncio.Event()
    counts: dict[str, int] = {}
    background = [
        asyncio.create_task(send_long_prompts(client, characters, stop, counts))
        for _ in range(senders if characters else 0)
    ]
    await asyncio.sleep(0.5 if background else 0)
    gaps = await stream_gaps(client)
    stop.set()
    await asyncio.gather(*background)
    return {
        "gap_p50_ms": round(percentile(gaps, 0.5) * 1000, 1),
        "gap_p99_ms": round(percentile(gaps, 0.99) * 1000, 1),
        "gap_max_ms": round(max(gaps) * 1000, 1),
        "long_prompt_answers": counts,
    }


async def measure(url: str, senders: int, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=600.0, headers=headers) as client:
        print("warming up (loads the model on first use)...", flush=True)
        await client.post("/api/v1/text/generate", json={"prompt": "hi", "max_tokens": 4})
        results: dict[str, Any] = {}
        for name, characters in (
            ("alone", None),
            ("beside_50k_character_prompts", 50_000),
            ("beside_20k_character_prompts", 20_000),
        ):
            results[name] = await scenario(client, characters, senders)
            print(f"{name:30} {results[name]}", flush=True)
    alone = results["alone"]
    for name in ("beside_50k_character_prompts", "beside_20k_character_prompts"):
        for figure in ("gap_p50_ms", "gap_p99_ms", "gap_max_ms"):
            results[name][f"{figure}_ratio"] = round(results[name][figure] / alone[figure], 2)
    return {
        **results,
        "senders": senders,
        "stream": STREAM,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Measure a running server instead of starting one.")
    parser.add_argument(
        "--senders", type=int, default=1, help="Clients sending long prompts, back to back."
    )
    parser.add_argument("--api-key", default=os.environ.get("FICTURES_API_KEY"))
    args = parser.parse_args()
    measure_and_write(args.url, lambda url: measure(url, args.senders, args.api_key), RESULTS)


if __name__ == "__main__":
    main()
