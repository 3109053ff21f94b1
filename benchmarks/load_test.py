"""Load test: many concurrent streaming clients for a few minutes against the server.

Starts ``fictures-ai serve`` on a free port (or uses ``--url``), warms the model up, then keeps
``--clients`` streaming clients busy for ``--duration`` seconds, each sending one request after
another: Fictures streams and OpenAI chat streams alternately, and some clients hang up early
on purpose (``--drop-every``), the way browsers do. Reports errors (which must be 0), latency
percentiles, throughput, and the memory of each of the server's processes (the API server,
vLLM's engine core and its worker, any other child), found as the server's descendants and
named by role. Memory is sampled every ``--sample-every`` seconds as RSS, PSS and USS (from
``/proc/PID/smaps``: PSS adds up across processes, as shared libraries are split between them;
USS is what a process holds alone, so it shows a process's own growth); growth is counted from
the minute after ``--warm-up`` seconds of load to the last minute (medians of the samples).
Prints the figures and writes them, with every sample, to ``benchmarks/results/load_test.json``
(or ``--results``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import percentile  # noqa: E402
from text_concurrency import start_server  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "load_test.json"
PROMPTS = [
    "Write the opening of a mystery set in a lighthouse.",
    "Describe a dragon's library in three sentences.",
    "Give a villain a short, menacing monologue.",
    "Summarise a heist story in one paragraph.",
]


MIB = 1 << 20


def process_role(process: psutil.Process, server_pid: int) -> str:
    """Name a server process by what it does, from its name and command line."""
    if process.pid == server_pid:
        return "api_server"
    try:
        name = process.name()
        cmdline = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {process.pid}"
    if "EngineCor" in name or "EngineCore" in cmdline:
        return "vllm_engine_core"
    if "Worker" in name or "worker" in name.lower():
        return "vllm_worker"
    if "resource_tracker" in cmdline:
        return "multiprocessing_resource_tracker"
    return name or f"pid {process.pid}"


def process_memory(process: psutil.Process) -> dict[str, float]:
    """RSS, PSS and USS of one process in MiB (PSS and USS where the platform has them)."""
    try:
        info = process.memory_full_info()
    except psutil.AccessDenied:
        info = process.memory_info()
    figures = {"rss": info.rss}
    for field in ("pss", "uss"):
        if hasattr(info, field):
            figures[field] = getattr(info, field)
    return {field: round(value / MIB, 1) for field, value in figures.items()}


def memory_sample(pid: int) -> dict[str, dict[str, float]]:
    """Memory of the server process and each of its descendants, keyed by role."""
    server = psutil.Process(pid)
    sample: dict[str, dict[str, float]] = {}
    for process in [server, *server.children(recursive=True)]:
        try:
            role = process_role(process, pid)
            figures = {"pid": process.pid, **process_memory(process)}
        except psutil.NoSuchProcess:
            continue
        key = role if role not in sample else f"{role} ({process.pid})"
        sample[key] = figures
    sample["total"] = {
        field: round(sum(figures.get(field, 0.0) for figures in sample.values()), 1)
        for field in ("rss", "pss", "uss")
    }
    return sample


async def sample_memory(
    pid: int, started: float, every: float, samples: list[dict[str, Any]]
) -> None:
    """Append a memory sample every ``every`` seconds (taken in a thread: smaps is slow)."""
    while True:
        try:
            processes = await asyncio.to_thread(memory_sample, pid)
        except psutil.NoSuchProcess:
            return
        t_s = round(time.monotonic() - started, 1)
        samples.append({"t_s": t_s, "processes": processes})
        shown = ", ".join(
            f"{role} {figures.get('uss', figures['rss']):.0f}"
            for role, figures in processes.items()
        )
        print(f"  memory at {t_s:.0f} s (USS, MiB): {shown}", flush=True)
        await asyncio.sleep(every)


def memory_summary(
    samples: list[dict[str, Any]], warm_up: float, window: float = 60.0
) -> dict[str, Any]:
    """Per process: memory at the start, after warm-up and at the end, and the growth from
    warm-up to the end.

    "After warm-up" is the median of the samples in the ``window`` seconds from ``warm_up``
    on, "end" the median of the samples in the last ``window`` seconds: a worker's memory
    swings by tens of MiB from one engine step to the next, and one sample may catch a swing.
    """
    if not samples:
        return {}
    last_t = samples[-1]["t_s"]
    after = [s for s in samples if warm_up <= s["t_s"] < warm_up + window] or samples[-1:]
    final = [s for s in samples if s["t_s"] > last_t - window]
    summary: dict[str, Any] = {
        "warm_up_window_s": [after[0]["t_s"], after[-1]["t_s"]],
        "end_window_s": [final[0]["t_s"], final[-1]["t_s"]],
    }
    for role in samples[-1]["processes"]:
        start = samples[0]["processes"].get(role)
        warm = _median_figures(after, role)
        end = _median_figures(final, role)
        entry: dict[str, Any] = {"start": start, "after_warm_up": warm, "end": end}
        if warm:
            entry["growth_after_warm_up"] = {
                field: {
                    "mib": round(end[field] - warm[field], 1),
                    "percent": round(100 * (end[field] - warm[field]) / warm[field], 2),
                }
                for field in ("rss", "pss", "uss")
                if field in end and warm.get(field)
            }
        summary[role] = entry
    return summary


def _median_figures(samples: list[dict[str, Any]], role: str) -> dict[str, float]:
    """Median RSS, PSS and USS of one process over some samples (those that have it)."""
    present = [s["processes"][role] for s in samples if role in s["processes"]]
    return {
        field: round(statistics.median(figures[field] for figures in present), 1)
        for field in ("rss", "pss", "uss")
        if present and all(field in figures for figures in present)
    }


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of ``values`` in seconds (0.0 for none), to the millisecond."""
    return {f"p{q}": round(percentile(values, q / 100), 3) for q in (50, 95, 99)}


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
            # A final error event has an "error" key on both surfaces; the text a model
            # writes may contain the word itself (it did: a delta of "error").
            if line != "data: [DONE]" and "error" in json.loads(line[6:]):
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
        samples: list[dict[str, Any]] = []
        sampler = (
            asyncio.create_task(sample_memory(pid, started, args.sample_every, samples))
            if pid
            else None
        )
        loops = [client_loop(client, i, deadline, args, stats) for i in range(args.clients)]
        reporter = asyncio.create_task(report_progress(stats, deadline))
        await asyncio.gather(*loops)
        reporter.cancel()
        elapsed = time.monotonic() - started
        ready = (await client.get("/health/ready")).status_code
        if sampler is not None:
            sampler.cancel()
            processes = await asyncio.to_thread(memory_sample, pid)
            samples.append({"t_s": round(time.monotonic() - started, 1), "processes": processes})
    return {
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "requests_completed": stats["completed"],
        "requests_dropped_on_purpose": stats["dropped"],
        "errors": len(stats["errors"]),
        "error_samples": stats["errors"][:5],
        "stream_events_per_s": round(stats["events"] / elapsed, 1),
        "ttft_s": percentiles(stats["ttft"]),
        "request_s": percentiles(stats["latency"]),
        "ready_after": ready,
        "server_memory_mib": {
            "note": (
                "per process, in MiB: rss (resident, counts shared pages in every process), "
                "pss (shared pages split between the processes sharing them, so the figures "
                "add up: the footprint), uss (pages only this process holds: what it grew "
                "itself; pss also moves when other programs map the same libraries). Growth "
                "is from the median of the minute after the warm-up to that of the last minute."
            ),
            "warm_up_s": args.warm_up,
            "sample_every_s": args.sample_every,
            "summary": memory_summary(samples, args.warm_up),
            "samples": samples,
        },
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
    parser.add_argument(
        "--sample-every", type=float, default=15.0, help="Seconds between memory samples."
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=120.0,
        help="Seconds of load after which memory growth is counted.",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="Where to write the JSON.")
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
    print(json.dumps({k: v for k, v in result.items() if k != "server_memory_mib"}, indent=2))
    print(json.dumps(result["server_memory_mib"]["summary"], indent=2))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.results}")
    if result["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
