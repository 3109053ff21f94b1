"""Batched images: a scene's panels sent at once, with batching on against one at a time.

Two ``fictures-ai serve`` processes (image half only, tiny offline SDXL pipeline, no keys)
run side by side: one with ``IMAGE_MAX_BATCH=8`` (concurrent requests of one size share a
pipeline call) and one with ``IMAGE_MAX_BATCH=1`` (one render after another). Each round
sends the same burst to both, in alternating order: ``concurrent`` requests at once, as the
web app sends a scene's comic panels (each its own prompt and seed, one size, the web app's
guidance 1 and 4 steps). Per server: images per second over each burst (images / wall
time from the first request sent to the last image received), per-image latency p50/p95,
and the batch sizes the server's ``/metrics`` counted. The ratio of the medians is
``speedup_vs_one_at_a_time``.

The profile behind the figures: the same pipeline in this process, at batch 1 and at batch
``concurrent``, timed per stage (text encoders, UNet, VAE decode, PNG) per image.

``measure()`` returns the ``"images"`` part of ``fictures_workload.json``; run as a script it
prints the figures and writes ``benchmarks/results/image_batching.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the other benchmarks, and tests.support
from tests.support import free_port  # noqa: E402

from support import describe_machine, stop  # noqa: E402

RESULTS = HERE / "results" / "image_batching.json"
WIDTH, HEIGHT = 512, 288  # a 16:9 panel, small: the tiny VAE at 1344x756 is slow on a CPU
STEPS = 4
GUIDANCE = 1.0
CONCURRENT = 8
PANEL = "Panel {index} of the scene: the knight Aldric at the gate of Castle Morrow, dusk"


def panel_bodies(round_number: int, *, concurrent: int, width: int, height: int) -> list[Any]:
    """The ``/api/v1/images/generate`` bodies of one scene: one size, a prompt and seed each."""
    return [
        {
            "prompt": PANEL.format(index=index + 1),
            "width": width,
            "height": height,
            "num_inference_steps": STEPS,
            "guidance_scale": GUIDANCE,
            "seed": 1000 * round_number + index + 1,
        }
        for index in range(concurrent)
    ]


def start_image_server(
    max_batch: int, torch_threads: int | None, batch_wait_ms: float = 0.0
) -> tuple[Any, str]:
    """``fictures-ai serve`` with only the image half, preloaded, on a free port."""
    port = free_port()
    env = {
        **os.environ,
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "GENERATION_MODE": "image",
        "REQUIRE_API_KEY": "false",
        "PRELOAD_MODELS": "true",
        "IMAGE_MAX_BATCH": str(max_batch),
        "IMAGE_BATCH_WAIT_MS": str(batch_wait_ms),
        "IMAGE_MAX_QUEUE": "64",
    }
    if torch_threads is not None:
        env["IMAGE_TORCH_THREADS"] = str(torch_threads)
    cli = Path(sys.executable).with_name("fictures-ai")
    process = subprocess.Popen([str(cli), "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {process.returncode}")
        try:
            health = httpx.get(f"{url}/health", timeout=1).json()
            if health["models"]["image"]["initialized"]:
                return process, url
        except (httpx.TransportError, KeyError, TypeError, ValueError):
            pass
        time.sleep(0.3)
    stop(process)
    raise SystemExit(f"{url}: the image model did not load in time")


async def burst(client: httpx.AsyncClient, bodies: list[Any]) -> tuple[float, list[float]]:
    """Send ``bodies`` at once; the burst's wall time and each request's latency (s)."""

    async def one(body: Any) -> float:
        sent = time.perf_counter()
        response = await client.post("/api/v1/images/generate", json=body)
        response.raise_for_status()
        return time.perf_counter() - sent

    started = time.perf_counter()
    latencies = await asyncio.gather(*(one(body) for body in bodies))
    return time.perf_counter() - started, list(latencies)


def batch_sizes(url: str) -> dict[str, float]:
    """Calls and images counted by the server's ``fictures_image_batch_size`` histogram."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    count = re.search(r"^fictures_image_batch_size_count\{[^}]*\} (\S+)$", text, re.M)
    total = re.search(r"^fictures_image_batch_size_sum\{[^}]*\} (\S+)$", text, re.M)
    calls = float(count.group(1)) if count else 0.0
    images = float(total.group(1)) if total else 0.0
    return {"calls": calls, "images": images}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def profile_pipeline(
    *, concurrent: int, width: int, height: int, torch_threads: int | None
) -> dict[str, Any]:
    """Seconds per image of each stage of the tiny pipeline at batch 1 and ``concurrent``."""
    import torch

    from fictures_ai.config import Settings
    from fictures_ai.engines.diffusers_engine import resolve_image_model
    from fictures_ai.services.engine_factory import image_engine_options

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    from diffusers import AutoPipelineForText2Image, DPMSolverMultistepScheduler

    options = image_engine_options(Settings(_env_file=None))  # type: ignore[call-arg]
    source = resolve_image_model(options).source
    pipeline = AutoPipelineForText2Image.from_pretrained(source, dtype=torch.float32)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    stages: dict[str, float] = {}

    def timed(module: Any, name: str, attribute: str = "forward") -> None:
        original = getattr(module, attribute)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - started

        setattr(module, attribute, wrapper)

    timed(pipeline.text_encoder, "text_encoders")
    timed(pipeline.text_encoder_2, "text_encoders")
    timed(pipeline.unet, "unet")
    timed(pipeline.vae, "vae_decode", "decode")

    def run(size: int) -> dict[str, float]:
        stages.clear()
        started = time.perf_counter()
        images = pipeline(
            prompt=[PANEL.format(index=index) for index in range(size)],
            width=width,
            height=height,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator("cpu").manual_seed(index) for index in range(size)],
        ).images
        call = time.perf_counter() - started
        started = time.perf_counter()
        for image in images:
            image.save(io.BytesIO(), format="PNG")
        png = time.perf_counter() - started
        figures = {name: seconds / size for name, seconds in stages.items()}
        figures["other"] = call / size - sum(figures.values())
        figures["png"] = png / size
        figures["total"] = call / size + png / size
        return {name: round(seconds * 1000, 1) for name, seconds in figures.items()}

    run(1)  # warm-up
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    for size in (1, concurrent):
        samples = [run(size) for _ in range(3)]
        result[f"batch_{size}_ms_per_image"] = min(samples, key=lambda sample: sample["total"])
    return result


async def measure(
    *,
    rounds: int = 5,
    concurrent: int = CONCURRENT,
    max_batch: int = CONCURRENT,
    width: int = WIDTH,
    height: int = HEIGHT,
    torch_threads: int | None = None,
    batch_wait_ms: float = 0.0,
    profile: bool = True,
    progress: Callable[[str], None] = lambda line: print(line, flush=True),
) -> dict[str, Any]:
    """Compare batching on (``IMAGE_MAX_BATCH=max_batch``) and off through two real servers,
    rounds interleaved; return the ``"images"`` figures (see the module)."""
    modes = {"batched": max_batch, "one_at_a_time": 1}
    servers = {
        name: start_image_server(batch, torch_threads, batch_wait_ms if batch > 1 else 0.0)
        for name, batch in modes.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in modes}
    latencies: dict[str, list[float]] = {name: [] for name in modes}
    try:
        clients = {
            name: httpx.AsyncClient(base_url=url, timeout=600) for name, (_, url) in servers.items()
        }
        for client in clients.values():  # warm-up: first render and a first burst
            await burst(client, panel_bodies(0, concurrent=concurrent, width=width, height=height))
        before = {name: batch_sizes(url) for name, (_, url) in servers.items()}
        for number in range(1, rounds + 1):
            order = list(modes) if number % 2 else list(reversed(modes))
            for name in order:
                bodies = panel_bodies(number, concurrent=concurrent, width=width, height=height)
                wall, each = await burst(clients[name], bodies)
                rates[name].append(concurrent / wall)
                latencies[name].extend(each)
                progress(
                    f"  round {number}/{rounds} {name}: {concurrent / wall:.2f} images/s "
                    f"(burst {wall:.2f} s, slowest image {max(each):.2f} s)"
                )
        after = {name: batch_sizes(url) for name, (_, url) in servers.items()}
        for client in clients.values():
            await client.aclose()
    finally:
        for process, _ in servers.values():
            stop(process)
    figures: dict[str, Any] = {}
    for name in modes:
        calls = after[name]["calls"] - before[name]["calls"]
        images = after[name]["images"] - before[name]["images"]
        figures[name] = {
            "image_max_batch": modes[name],
            "images_per_s": round(statistics.median(rates[name]), 3),
            "images_per_s_rounds": [round(rate, 3) for rate in rates[name]],
            "latency_p50_s": round(percentile(latencies[name], 0.5), 3),
            "latency_p95_s": round(percentile(latencies[name], 0.95), 3),
            "mean_images_per_call": round(images / calls, 2) if calls else None,
        }
    per_round = [
        batched / alone
        for batched, alone in zip(rates["batched"], rates["one_at_a_time"], strict=True)
    ]
    result: dict[str, Any] = {
        "concurrent": concurrent,
        "speedup_vs_one_at_a_time": round(
            figures["batched"]["images_per_s"] / figures["one_at_a_time"]["images_per_s"], 2
        ),
        "speedup_rounds": [round(ratio, 2) for ratio in per_round],
        "goal": 2.0,
        "width": width,
        "height": height,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "rounds": rounds,
        "torch_threads": torch_threads,
        "batch_wait_ms": batch_wait_ms,
        "model": "tiny-sdxl-random (CPU)",
        **figures,
    }
    if profile:
        progress("  profile: the pipeline in this process, per stage")
        result["profile"] = await asyncio.to_thread(
            profile_pipeline,
            concurrent=concurrent,
            width=width,
            height=height,
            torch_threads=torch_threads,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=CONCURRENT)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--height", type=int, default=HEIGHT)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="IMAGE_TORCH_THREADS of both servers (default 0: unset, torch's own, one per core)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="IMAGE_BATCH_WAIT_MS of the batching server",
    )
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(
        measure(
            rounds=args.rounds,
            concurrent=args.concurrent,
            width=args.width,
            height=args.height,
            torch_threads=args.torch_threads or None,
            batch_wait_ms=args.batch_wait_ms,
            profile=not args.no_profile,
        )
    )
    result["machine"] = describe_machine(["torch", "diffusers", "fictures-ai"])
    for name in ("batched", "one_at_a_time"):
        figures = result[name]
        print(
            f"{name:>14}: {figures['images_per_s']:.2f} images/s, latency p50 "
            f"{figures['latency_p50_s']:.2f} s p95 {figures['latency_p95_s']:.2f} s, "
            f"{figures['mean_images_per_call']} images per call"
        )
    print(f"speedup at {result['concurrent']} concurrent: {result['speedup_vs_one_at_a_time']}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
