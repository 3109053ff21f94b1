"""Ray Serve (``serve --ray``): what a second image replica buys, and what the proxy costs.

``python benchmarks/ray_scaling.py [--rounds 4] [--quick]`` (about 5 minutes on 2 cores). One
local Ray (``ray.init(address="local")``, as ``serve --ray`` starts it) and one Serve HTTP
proxy on a free port serve ``build_application``'s application:

1. Images: ``GENERATION_MODE=image``, the bundled tiny pipeline (256×256, 12 steps, one torch
   thread, one logical CPU per replica), deployed twice side by side: ``RAY_MODEL_REPLICAS=1``
   as application ``images-1`` at ``/one`` and ``=2`` as ``images-2`` at ``/two`` (one
   deployment does not take the other's replicas, and an idle replica costs nothing), so that
   their samples alternate seconds apart (1, 2, 2, 1, 1, 2, ...) rather than a redeployment
   apart. Four clients post ``/api/v1/images/generate`` in a closed loop: images per second,
   latency, how many requests each replica served (the ``X-Fictures-Replica`` header), and
   the CPU the image replicas got (the cores they kept busy: on a shared machine, what a
   second replica can add is the CPU nobody else takes).
2. The HTTP ceiling: the instant text engine (``instant_engine.py``: no model, no cost per
   token) in one model replica behind the ingress, reached by deployment handle, against the
   same app (``create_app`` over the same settings and the same engine, loaded in-process)
   served by uvicorn alone, alternated per round. SSE streams of ``/api/v1/text/stream``
   (64 tokens each) at 16 and 64 concurrent streams (``loadgen.count_events``: events counted,
   not parsed), and one stream at a time (``loadgen.run_level``: time to first token). Also
   the CPU seconds the serving processes spent per 1000 tokens: for Ray, its proxy, the
   ingress replica, the model replica and the rest (GCS, raylet, controller), by process.

The load generator runs in this process (Ray's driver, idle while it measures) for both sides.
Each sample also records the cores the rest of the machine kept busy meanwhile (``other work``:
the machine's busy CPU time less this process tree's), which tells a slow sample from a busy
machine.
Prints each sample and the ratios (2 replicas / 1, Ray / direct, medians of the rounds), and
writes ``benchmarks/results/ray_scaling.json``. Serve and Ray are shut down at the end, on
error too, and any process of ours still alive then is killed (and named in the results).

The instant engine's loader must reach the model replica: it is this module's
:func:`load_instant_engine`, pickled by value (this module is ``__main__``) and referring to
``instant_engine.InstantTextEngine`` by name, which Ray's workers import because Ray puts the
driver script's directory (``benchmarks/``) on their ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the other benchmarks, and tests.support
from tests.support import free_port  # noqa: E402

from instant_engine import InstantTextEngine  # noqa: E402
from loadgen import count_events, percentile, run_level  # noqa: E402
from support import describe_machine, stop  # noqa: E402

if TYPE_CHECKING:
    from fictures_ai.config import Settings
    from fictures_ai.engines.base import TextEngine
    from fictures_ai.engines.options import DiffusersEngineOptions, VllmEngineOptions
    from fictures_ai.services.engine_factory import ImageLoader, TextLoader
    from fictures_ai.services.models.spec import ModelSpec

RESULTS = HERE / "results" / "ray_scaling.json"
APP_NAME = "fictures"
LOGICAL_CPUS = 4
"""Ray's scheduling slots: three image replicas of one CPU each and two ingresses' halves."""

IMAGE_PATH = "/api/v1/images/generate"
IMAGE_BODY = {
    "prompt": "A lighthouse on a cliff at dusk, oil painting",
    "width": 256,
    "height": 256,
    "num_inference_steps": 12,
    "guidance_scale": 7.5,
    "seed": 42,
}
IMAGE_CONCURRENCY = 4
IMAGE_APPS = {1: ("images-1", "/one"), 2: ("images-2", "/two")}
"""Image replicas -> the application that has them and its route prefix."""

TEXT_PATH = "/api/v1/text/stream"
TEXT_TOKENS = 64
TEXT_BODY = json.dumps({"prompt": "Tell me a story.", "max_tokens": TEXT_TOKENS}).encode()
TEXT_LEVELS = (16, 64)
MEASURED_PACKAGES = ("ray", "torch", "diffusers", "fastapi", "uvicorn", "fictures-ai")
COALESCED_PREFIX = "/coalesced"
PER_TOKEN_PREFIX = "/per-token"
"""The two text applications deployed side by side: the default settings at
``COALESCED_PREFIX`` and ``RAY_STREAM_INTERVAL_MS=0`` (one Ray message per token) at
``PER_TOKEN_PREFIX``. The prefix goes in the request path: ``loadgen`` connects to a URL's
host and port only."""
SINGLE_STREAMS = 40
"""Streams sent one at a time per target and round, for the time to first token."""

STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress line with the elapsed time."""
    elapsed = int(time.monotonic() - STARTED)
    print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


# --- the instant engine as a model replica's engine --------------------------------------


async def load_instant_engine() -> TextEngine:
    """The text loader the model replica runs (and the direct server): an instant engine."""
    return InstantTextEngine()


class InstantEngines:
    """``EngineLoaders`` whose text models are instant engines; no image model."""

    remote = False

    def text(self, spec: ModelSpec, options: VllmEngineOptions) -> TextLoader:
        return functools.partial(load_instant_engine)

    def image(self, spec: ModelSpec, options: DiffusersEngineOptions) -> ImageLoader:
        raise RuntimeError("the HTTP-ceiling benchmark serves no images")

    def replicas(self, spec: ModelSpec) -> int:
        return 1


def image_settings(replicas: int) -> Settings:
    from fictures_ai.config import Settings

    return Settings(
        _env_file=None,
        generation_mode="image",
        require_api_key=False,
        log_level="WARNING",
        image_torch_threads=1,
        ray_model_replicas=replicas,
    )


def text_settings(**overrides: Any) -> Settings:
    from fictures_ai.config import Settings

    values: dict[str, Any] = {
        "generation_mode": "text",
        "require_api_key": False,
        "log_level": "WARNING",
        "ray_model_replicas": 1,
        **overrides,
    }
    return Settings(_env_file=None, **values)


def serve_direct(port: int) -> None:
    """The direct side of the ceiling (run in its own process): the same app over the same
    engine, loaded in-process, under uvicorn with http_ceiling_server.py's options."""
    import uvicorn

    from fictures_ai.api.app import create_app

    logging.basicConfig(level=logging.WARNING)
    app = create_app(text_settings(), engines=InstantEngines())
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False)


# --- Ray -----------------------------------------------------------------------------------


def deploy(
    settings: Settings, engines: Any = None, *, name: str = APP_NAME, route_prefix: str = "/"
) -> None:
    """Deploy (or replace) the application as ``serve --ray`` does (by default under its
    name, at ``/``); returns once it runs."""
    from ray import serve

    from fictures_ai.cluster.application import build_application

    serve.run(build_application(settings, engines), name=name, route_prefix=route_prefix)


def wait_port(port: int, process: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server on port {port} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {timeout_s} s")


REPLICA_TITLE = re.compile(r"ServeReplica:([^:\s]+):(\S+)")


def process_role(process: psutil.Process) -> str:
    """Which part of Ray ``process`` is, from the title Ray gives its workers: ``proxy``,
    ``ingress`` or ``model replica`` (of another application than ``fictures``: its name
    first), else ``ray other`` (GCS, raylet, Serve's controller, idle workers)."""
    try:
        command = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if "ProxyActor" in command:
        return "proxy"
    replica = REPLICA_TITLE.search(command)
    if replica is None:
        return "ray other"
    app, deployment = replica.groups()
    role = "ingress" if deployment.startswith("ingress") else "model replica"
    return role if app == APP_NAME else f"{app} {role}"


def descendants(exclude: set[int]) -> list[psutil.Process]:
    """This process's live descendants (Ray's GCS and raylet, and their workers), less
    ``exclude`` and theirs."""
    left = []
    for process in psutil.Process().children(recursive=True):
        try:
            parents = {process.pid} | {parent.pid for parent in process.parents()}
        except psutil.NoSuchProcess:
            continue
        if not parents & exclude:
            left.append(process)
    return left


def cpu_snapshot(
    processes: list[psutil.Process], role: str | None = None
) -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system seconds so far); the role from the process title unless
    given."""
    snapshot = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        snapshot[process.pid] = (role or process_role(process), times.user + times.system)
    return snapshot


def cpu_spent(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds per role between two snapshots (processes present in both)."""
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        if pid in before:
            spent[role] = spent.get(role, 0.0) + seconds - before[pid][1]
    return {role: round(seconds, 3) for role, seconds in sorted(spent.items())}


class OtherWork:
    """How much CPU the rest of the machine took during a sample: all busy CPU time (user,
    nice, system, interrupts) less that of this process and its descendants, in cores. On a
    shared machine it says how much of the two cores a sample had to give away."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._machine, self._ours = self._counters()

    @staticmethod
    def _counters() -> tuple[float, float]:
        times = psutil.cpu_times()
        machine = times.user + times.nice + times.system
        machine += getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
        me = psutil.Process()
        own = me.cpu_times()
        ours = own.user + own.system
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child_times = child.cpu_times()
                ours += child_times.user + child_times.system
        return machine, ours

    def cores(self) -> float:
        """Cores the rest of the machine kept busy since this object was made."""
        machine, ours = self._counters()
        seconds = time.perf_counter() - self._started
        return round(max(0.0, (machine - self._machine) - (ours - self._ours)) / seconds, 2)


# --- part 1: images --------------------------------------------------------------------------


async def post_images(url: str, count: int, concurrency: int) -> dict[str, Any]:
    """``count`` image requests from ``concurrency`` closed-loop clients."""
    numbers = iter(range(count))
    latencies: list[float] = []
    replicas: Counter[str] = Counter()

    async def client_loop(client: httpx.AsyncClient) -> None:
        for _ in numbers:
            started = time.perf_counter()
            response = await client.post(IMAGE_PATH, json=IMAGE_BODY)
            if response.status_code != 200:
                raise SystemExit(f"{IMAGE_PATH}: {response.status_code} {response.text[:300]}")
            latencies.append(time.perf_counter() - started)
            replicas[response.headers.get("x-fictures-replica", "(no header)")] += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {
        "images": count,
        "seconds": round(seconds, 3),
        "images_per_s": round(count / seconds, 4),
        "latency_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "per_replica": {short_replica(name): n for name, n in sorted(replicas.items())},
    }


def short_replica(name: str) -> str:
    """``model-x#abc pid=1 node=ip`` -> ``#abc pid=1``."""
    deployment, _, rest = name.partition("#")
    return "#" + rest.split(" node=")[0] if rest else deployment


def image_part(url: str, rounds: int, images: int) -> dict[str, Any]:
    """Both deployments side by side (one application each, at its own route prefix), so
    that their samples alternate seconds apart, not a redeployment apart."""
    from ray import serve

    for replicas, (name, prefix) in IMAGE_APPS.items():
        say(f"images: deploying {name} ({replicas} image replica(s)) at {prefix}")
        deploy(image_settings(replicas), name=name, route_prefix=prefix)
    for _, prefix in IMAGE_APPS.values():
        # Warm up: the ingress connects to the deployment, each replica renders once.
        asyncio.run(post_images(url + prefix, IMAGE_CONCURRENCY, IMAGE_CONCURRENCY))
    samples: dict[int, list[dict[str, Any]]] = {n: [] for n in IMAGE_APPS}
    for number in range(1, rounds + 1):
        order = list(IMAGE_APPS) if number % 2 else list(reversed(IMAGE_APPS))
        for replicas in order:
            name, prefix = IMAGE_APPS[replicas]
            before = cpu_snapshot(descendants(exclude=set()))
            others = OtherWork()
            sample = asyncio.run(post_images(url + prefix, images, IMAGE_CONCURRENCY))
            spent = cpu_spent(before, cpu_snapshot(descendants(exclude=set())))
            replica_cpu = spent.get(f"{name} model replica", 0.0)
            sample["replicas_cpu_s"] = round(replica_cpu, 3)
            sample["replicas_cores_busy"] = round(replica_cpu / sample["seconds"], 3)
            sample["replica_cpu_s_per_image"] = round(replica_cpu / images, 3)
            sample["other_work_cores"] = others.cores()
            sample["load_average_1m"] = round(os.getloadavg()[0], 2)
            samples[replicas].append(sample)
            say(
                f"images round {number}/{rounds}: {replicas} replica(s) "
                f"{sample['images_per_s']:.3f} images/s, p50 {sample['latency_p50_ms']:.0f} ms, "
                f"replicas busy {sample['replicas_cores_busy']:.2f} cores "
                f"({sample['replica_cpu_s_per_image']:.2f} CPU s/image), "
                f"other work {sample['other_work_cores']:.2f} cores, "
                f"per replica {sample['per_replica']}"
            )
    for name, _ in IMAGE_APPS.values():
        serve.delete(name)
    medians = {
        n: {
            key: round(statistics.median(s[key] for s in samples[n]), 3)
            for key in (
                "images_per_s",
                "latency_p50_ms",
                "replicas_cores_busy",
                "replica_cpu_s_per_image",
                "other_work_cores",
            )
        }
        for n in samples
    }
    spread: dict[int, Counter[str]] = {n: Counter() for n in samples}
    for n, runs in samples.items():
        for run in runs:
            spread[n].update(run["per_replica"])
    return {
        "request": IMAGE_BODY,
        "concurrency": IMAGE_CONCURRENCY,
        "images_per_sample": images,
        "torch_threads_per_replica": 1,
        "logical_cpus_per_replica": 1,
        "applications": {
            str(n): {"name": a, "route_prefix": p} for n, (a, p) in IMAGE_APPS.items()
        },
        "samples": {str(n): s for n, s in samples.items()},
        "medians": {str(n): m for n, m in medians.items()},
        "requests_per_replica": {str(n): dict(sorted(c.items())) for n, c in spread.items()},
        "ratio_2_over_1": round(medians[2]["images_per_s"] / medians[1]["images_per_s"], 3),
        "ratio_2_over_1_per_round": [
            round(two["images_per_s"] / one["images_per_s"], 3)
            for one, two in zip(samples[1], samples[2], strict=True)
        ],
    }


# --- part 2: the HTTP ceiling ------------------------------------------------------------------


def single_streams(url: str, prefix: str) -> dict[str, Any]:
    """Streams one at a time: time to first token and whole-stream time."""
    level = asyncio.run(
        run_level(url, prefix + TEXT_PATH, [TEXT_BODY], concurrency=1, requests=SINGLE_STREAMS)
    )
    if min(r.content_events for r in level.results) < 1:
        raise SystemExit(f"{url}: a stream carried no text")
    totals = [r.total_s for r in level.results]
    summary = level.summary()
    return {
        "streams": SINGLE_STREAMS,
        "ttft_p50_ms": summary["ttft_p50_ms"],
        "ttft_p99_ms": summary["ttft_p99_ms"],
        "stream_p50_ms": round(percentile(totals, 0.5) * 1000, 2),
        "itl_p50_ms": summary["itl_p50_ms"],
    }


def ceiling_level(
    url: str, prefix: str, concurrency: int, seconds: float, cpu_of: Any
) -> dict[str, Any]:
    """``concurrency`` streams kept busy for ``seconds`` (after one second of warm-up)."""
    path = prefix + TEXT_PATH
    asyncio.run(count_events(url, path, TEXT_BODY, concurrency=concurrency, seconds=1))
    before = cpu_of()
    others = OtherWork()
    result = asyncio.run(
        count_events(url, path, TEXT_BODY, concurrency=concurrency, seconds=seconds)
    )
    spent = cpu_spent(before, cpu_of())
    other_cores = others.cores()
    # Every stream runs to max_tokens (the instant engine); an event may carry several.
    tokens = int(result["requests"]) * TEXT_TOKENS
    total_cpu = sum(spent.values())
    return {
        "concurrency": concurrency,
        "seconds": result["seconds"],
        "streams": result["requests"],
        "streams_per_s": round(result["requests"] / result["seconds"], 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / result["seconds"], 1),
        "events_per_token": round(result["events"] / tokens, 3) if tokens else 0.0,
        "server_cpu_s": spent,
        "server_cpu_ms_per_1k_tokens": round(total_cpu * 1e6 / tokens, 2) if tokens else 0.0,
        "server_cores_busy": round(total_cpu / result["seconds"], 3),
        "other_work_cores": other_cores,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def ceiling_part(
    ray_url: str, direct: subprocess.Popen[bytes], direct_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    direct_process = psutil.Process(direct.pid)

    def ray_cpu() -> dict[int, tuple[str, float]]:
        return cpu_snapshot(descendants(exclude={direct.pid}))

    def direct_cpu() -> dict[int, tuple[str, float]]:
        return cpu_snapshot([direct_process], role="uvicorn")

    targets = {
        "ray": (ray_url, COALESCED_PREFIX, ray_cpu),
        "ray_per_token": (ray_url, PER_TOKEN_PREFIX, ray_cpu),
        "direct": (direct_url, "", direct_cpu),
    }
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in targets}
    for number in range(1, args.rounds + 1):
        for name, (url, prefix, cpu_of) in targets.items():
            single = single_streams(url, prefix)
            samples[name].setdefault("1", []).append(single)
            say(
                f"ceiling round {number}/{args.rounds}: {name:6} 1 stream   TTFT p50 "
                f"{single['ttft_p50_ms']:6.2f} ms, whole stream p50 "
                f"{single['stream_p50_ms']:6.2f} ms"
            )
            for concurrency in TEXT_LEVELS:
                level = ceiling_level(url, prefix, concurrency, args.ceiling_seconds, cpu_of)
                samples[name].setdefault(str(concurrency), []).append(level)
                say(
                    f"ceiling round {number}/{args.rounds}: {name:6} {concurrency:>2} streams "
                    f"{level['streams_per_s']:8.1f} streams/s {level['tokens_per_s']:9.0f} "
                    f"tok/s, server CPU {level['server_cpu_ms_per_1k_tokens']:7.1f} ms/1k tok "
                    f"({level['server_cores_busy']:.2f} cores; other work "
                    f"{level['other_work_cores']:.2f}) {level['server_cpu_s']}"
                )
    summary: dict[str, Any] = {"single_stream": {}, "levels": []}
    for name in targets:
        runs = samples[name]["1"]
        summary["single_stream"][name] = {
            key: round(statistics.median(run[key] for run in runs), 2)
            for key in ("ttft_p50_ms", "stream_p50_ms", "itl_p50_ms")
        }
    single = summary["single_stream"]
    for name in ("ray", "ray_per_token"):
        single[f"{name}_over_direct"] = {
            key: round(single[name][key] / single["direct"][key], 1)
            for key in ("ttft_p50_ms", "stream_p50_ms")
        }
    for concurrency in TEXT_LEVELS:
        row: dict[str, Any] = {"concurrency": concurrency}
        for name in targets:
            runs = samples[name][str(concurrency)]
            for key in (
                "streams_per_s",
                "tokens_per_s",
                "server_cpu_ms_per_1k_tokens",
                "server_cores_busy",
                "other_work_cores",
                "events_per_token",
            ):
                row[f"{name}_{key}"] = round(statistics.median(run[key] for run in runs), 2)
        for name in ("ray", "ray_per_token"):
            row[f"ratio_{name}_over_direct"] = round(
                row[f"{name}_tokens_per_s"] / row["direct_tokens_per_s"], 4
            )
            row[f"cpu_ratio_{name}_over_direct"] = round(
                row[f"{name}_server_cpu_ms_per_1k_tokens"]
                / row["direct_server_cpu_ms_per_1k_tokens"],
                2,
            )
        summary["levels"].append(row)
    return {
        "route": TEXT_PATH,
        "tokens_per_stream": TEXT_TOKENS,
        "seconds_per_sample": args.ceiling_seconds,
        "load_generator": "loadgen.py count_events (levels) and run_level (one stream), "
        "in the Ray driver process",
        "summary": summary,
        "samples": samples,
    }


# --- the run ---------------------------------------------------------------------------------


def reap_leftovers(started: list[psutil.Process]) -> list[str]:
    """Wait up to 10 s for ``started`` (taken before Ray was shut down: once the raylet is
    gone its agents are no longer our descendants) and whatever else this process started,
    then kill (by pid) what is still alive; name each one."""
    processes = {p.pid: p for p in [*started, *psutil.Process().children(recursive=True)]}
    _, left = psutil.wait_procs(list(processes.values()), timeout=10)
    named = []
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            named.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            process.kill()
    return named


def exit_on_sigterm() -> None:
    """SIGTERM ends the run through the ``finally`` blocks, as Ctrl-C does (Ray's core
    installs its own handler in ``ray.init``, which ends the process where it stands)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    results: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": describe_machine(
            ("ray", "torch", "diffusers", "fastapi", "uvicorn", "fictures-ai")
        ),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "ray": {"logical_cpus": LOGICAL_CPUS, "address": "local", "dashboard": False},
    }
    direct: subprocess.Popen[bytes] | None = None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        say(f"starting a local Ray ({LOGICAL_CPUS} logical CPUs) and Serve's proxy on {port}")
        ray.init(
            address="local",
            num_cpus=LOGICAL_CPUS,
            include_dashboard=False,
            log_to_driver=False,
        )
        exit_on_sigterm()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if "images" not in args.skip:
            results["images"] = image_part(url, args.rounds, args.images)
            image = results["images"]
            say(
                f"images/s, median: 1 replica {image['medians']['1']['images_per_s']:.3f}, "
                f"2 replicas {image['medians']['2']['images_per_s']:.3f}: "
                f"x{image['ratio_2_over_1']:.2f}"
            )
        if "ceiling" not in args.skip:
            say("ceiling: deploying the instant text engine behind the ingress")
            deploy(text_settings(), InstantEngines(), route_prefix=COALESCED_PREFIX)
            deploy(
                text_settings(ray_stream_interval_ms=0),
                InstantEngines(),
                name="per-token",
                route_prefix=PER_TOKEN_PREFIX,
            )
            direct_port = free_port()
            direct = subprocess.Popen(
                [sys.executable, __file__, "--serve-direct", str(direct_port)],
                stderr=subprocess.DEVNULL,
            )
            wait_port(direct_port, direct, 60)
            results["ceiling"] = ceiling_part(url, direct, f"http://127.0.0.1:{direct_port}", args)
            for row in results["ceiling"]["summary"]["levels"]:
                say(
                    f"ceiling c={row['concurrency']}: Ray {row['ray_tokens_per_s']:.0f} tok/s, "
                    f"Ray one message per token {row['ray_per_token_tokens_per_s']:.0f} tok/s, "
                    f"direct {row['direct_tokens_per_s']:.0f} tok/s: "
                    f"x{row['ratio_ray_over_direct']:.3f} "
                    f"(per token x{row['ratio_ray_per_token_over_direct']:.3f}); server CPU per "
                    f"token x{row['cpu_ratio_ray_over_direct']:.1f} "
                    f"(per token x{row['cpu_ratio_ray_per_token_over_direct']:.1f})"
                )
    finally:
        started = psutil.Process().children(recursive=True)
        if direct is not None:
            stop(direct)
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        leftovers = reap_leftovers(started)
        results["leftover_processes_killed"] = leftovers
        if leftovers:
            say(f"killed processes left behind: {leftovers}")
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["total_seconds"] = round(time.monotonic() - STARTED, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="Alternated rounds per part.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round, short samples: a smoke test (results in the temp dir unless --output).",
    )
    parser.add_argument("--skip", default="", help="Comma list of images,ceiling.")
    parser.add_argument("--output", type=Path, help="Default: results/ray_scaling.json.")
    parser.add_argument("--serve-direct", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_direct is not None:
        serve_direct(args.serve_direct)
        return
    args.images = 12
    args.ceiling_seconds = 5.0
    if args.quick:
        args.rounds, args.images, args.ceiling_seconds = 1, 8, 2.0
    args.skip = set(filter(None, args.skip.split(",")))
    quick_output = Path(tempfile.gettempdir()) / "ray_scaling_quick.json"
    output = args.output or (quick_output if args.quick else RESULTS)
    exit_on_sigterm()
    results = run(args)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    say(f"results written to {output}")


if __name__ == "__main__":
    main()
