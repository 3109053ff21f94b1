"""Load test: many concurrent streaming clients for a few minutes against the server.

Starts ``fictures-ai serve`` on a free port (or uses ``--url``), warms the model up, then keeps
``--clients`` streaming clients busy for ``--duration`` seconds, each sending one request after
another: Fictures streams and OpenAI chat streams alternately, and some clients hang up early
on purpose (``--drop-every``), the way browsers do. Reports errors (which must be 0), latency
percentiles, throughput, and the server's memory (all its processes) at the start and the end.
Prints the figures and writes them to ``benchmarks/results/load_test.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from text_concurrency import start_server  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "load_test.json"
PROMPTS = [
    "Write the opening of a mystery set in a lighthouse.",
    "Describe a dragon's library in three sentences.",
    "Give a villain a short, menacing monologue.",
    "Summarise a heist story in one paragraph.",
]


def memory_mib(pid: int) -> float:
    """Resident memory of a process and all its children, in MiB."""
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return round(total / (1 << 20), 1)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 3) if ordered else 0.0


async def one_request(
    client: httpx.AsyncClient, number: int, max_tokens: int, drop: bool
) -> tuple[float, float, int]:
    """(time to first token, total seconds, tokens) of one streamed request."""
    prompt = PROMPTS[number % len(PROMPTS)]
    if number % 2:
        path = "/v1/chat/completions"
        body: dict[str, object] = {
            "model": (await client.get("/v1/models")).json()["data"][0]["id"],
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": True,
        }
    else:
        path = "/api/v1/text/stream"
        body = {"prompt": prompt, "max_tokens": max_tokens}
    started = time.perf_counter()
    first = 0.0
    events = 0
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if '"error"' in line:
                raise RuntimeError(f"{path}: error event {line[:200]}")
            events += 1
            if events == 1:
                first = time.perf_counter() - started
            if drop and events == 3:
                break  # hang up mid-stream, as a closed browser tab does
    return first, time.perf_counter() - started, events


async def client_loop(
    client: httpx.AsyncClient, index: int, deadline: float, args: argparse.Namespace, stats: dict
) -> None:
    number = index
    while time.monotonic() < deadline:
        drop = args.drop_every > 0 and number % args.drop_every == 0
        try:
            ttft, total, events = await one_request(client, number, args.max_tokens, drop)
        except Exception as exc:  # counted and reported, never hidden
            stats["errors"].append(str(exc))
        else:
            stats["ttft"].append(ttft)
            stats["latency"].append(total)
            stats["events"] += events
            stats["dropped" if drop else "completed"] += 1
        number += args.clients


async def run(url: str, pid: int | None, args: argparse.Namespace) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients * 2)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=httpx.Timeout(600.0), limits=limits
    ) as client:
        print("warming up...", flush=True)
        await one_request(client, 0, 8, False)
        memory_start = memory_mib(pid) if pid else None
        stats: dict = {
            "ttft": [],
            "latency": [],
            "errors": [],
            "events": 0,
            "completed": 0,
            "dropped": 0,
        }
        deadline = time.monotonic() + args.duration
        started = time.monotonic()
        loops = [client_loop(client, i, deadline, args, stats) for i in range(args.clients)]
        reporter = asyncio.create_task(report_progress(stats, deadline))
        await asyncio.gather(*loops)
        reporter.cancel()
        elapsed = time.monotonic() - started
        ready = (await client.get("/health/ready")).status_code
        memory_end = memory_mib(pid) if pid else None
    return {
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "requests_completed": stats["completed"],
        "requests_dropped_on_purpose": stats["dropped"],
        "errors": len(stats["errors"]),
        "error_samples": stats["errors"][:5],
        "stream_events_per_s": round(stats["events"] / elapsed, 1),
        "ttft_s": {
            "p50": percentile(stats["ttft"], 0.5),
            "p95": percentile(stats["ttft"], 0.95),
            "p99": percentile(stats["ttft"], 0.99),
        },
        "request_s": {
            "p50": percentile(stats["latency"], 0.5),
            "p95": percentile(stats["latency"], 0.95),
            "p99": percentile(stats["latency"], 0.99),
        },
        "server_memory_mib": {"start": memory_start, "end": memory_end},
        "ready_after": ready,
    }


async def report_progress(stats: dict, deadline: float) -> None:
    while True:
        await asyncio.sleep(15)
        left = max(0, int(deadline - time.monotonic()))
        print(
            f"  {stats['completed']} done, {stats['dropped']} dropped, "
            f"{len(stats['errors'])} errors, {left} s left",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Load a running server instead of starting one.")
    parser.add_argument("--pid", type=int, help="The running server's pid, for its memory.")
    parser.add_argument("--api-key", default=os.environ.get("FICTURES_API_KEY"))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--drop-every", type=int, default=7)
    args = parser.parse_args()
    process: subprocess.Popen[bytes] | None = None
    url, pid = args.url, args.pid
    if url is None:
        process, url = start_server({"REQUIRE_API_KEY": "false"})
        pid = process.pid
    try:
        result = asyncio.run(run(url, pid, args))
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {RESULTS}")
    if result["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
