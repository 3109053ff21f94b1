"""Aggregate streaming throughput through the server: 16 concurrent streams against one.

Starts ``fictures-ai serve`` on a free port (or uses ``--url``), warms the model up, then in
one run measures a single stream and then 16 concurrent streams of the same prompt through
``/api/v1/text/stream``, counting the tokens the server reports. Prints the figures and writes
them to ``benchmarks/results/text_concurrency.json``. Absolute numbers vary with the machine
and its load; the ratio is what this shows (continuous batching at work).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent))
from tests.support import free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "text_concurrency.json"
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


async def one_stream(client: httpx.AsyncClient, max_tokens: int) -> tuple[int, float]:
    """Return (tokens, seconds to first token) of one streamed request."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8}
    async with client.stream("POST", "/api/v1/text/stream", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None:
                first = time.perf_counter() - started
            tokens = json.loads(line[6:])["tokens_used"]
    return tokens, first or 0.0


async def run_level(
    client: httpx.AsyncClient, concurrency: int, max_tokens: int
) -> dict[str, float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, max_tokens) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    tokens = sum(tokens for tokens, _ in results)
    ttfts = sorted(ttft for _, ttft in results)
    return {
        "concurrency": concurrency,
        "tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
        "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3),
    }


async def measure(url: str, max_tokens: int, api_key: str | None) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(600.0), headers=headers
    ) as client:
        print("warming up (loads the model on first use)...", flush=True)
        await run_level(client, 2, 16)
        single = await run_level(client, 1, max_tokens)
        print(f"1 stream:    {single['tokens_per_s']:7.1f} tok/s", flush=True)
        batched = await run_level(client, 16, max_tokens)
        print(f"16 streams:  {batched['tokens_per_s']:7.1f} tok/s", flush=True)
    ratio = batched["tokens_per_s"] / single["tokens_per_s"]
    print(f"ratio 16/1:  {ratio:7.2f}x", flush=True)
    return {
        "single": single,
        "concurrent_16": batched,
        "throughput_ratio": round(ratio, 2),
        "max_tokens": max_tokens,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }


def start_server(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``fictures-ai serve`` on a free port and wait until it answers."""
    port = free_port()
    env = {
        **os.environ,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    cli = Path(sys.executable).with_name("fictures-ai")
    process = subprocess.Popen([str(cli), "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def measure_and_write(
    url: str | None, measure: Callable[[str], Awaitable[dict[str, Any]]], results: Path
) -> None:
    """Run ``measure`` against ``url``, or against a private server on loopback started for it
    (no keys, so that the figures are the engine's), and write what it returns to ``results``."""
    process = None
    if url is None:
        process, url = start_server({"REQUIRE_API_KEY": "false"})
    try:
        result = asyncio.run(measure(url))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Measure a running server instead of starting one.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--api-key", default=os.environ.get("FICTURES_API_KEY"))
    args = parser.parse_args()
    measure_and_write(args.url, lambda url: measure(url, args.max_tokens, args.api_key), RESULTS)


if __name__ == "__main__":
    main()
