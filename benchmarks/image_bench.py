"""Image request latency through our server against the same tiny pipeline called directly.

Both sides load the tiny offline SDXL pipeline with one torch thread. Requests alternate
(server, pipeline, engine, server, ...) so that the machine's noise hits all three alike: the
server answers ``POST /api/v1/images/generate`` (render, PNG, base64, JSON), the pipeline call
is diffusers alone (PIL image out), and ``DiffusersImageEngine.generate`` adds our engine's
thread hand-off and PNG encoding.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from process_cpu import cpu_times

PROMPT = "A lighthouse on a cliff at dusk, oil painting"
WIDTH = HEIGHT = 512
STEPS = 4
GUIDANCE = 7.5
SEED = 42


def request_body() -> dict[str, Any]:
    """The ``/api/v1/images/generate`` body."""
    return {
        "prompt": PROMPT,
        "width": WIDTH,
        "height": HEIGHT,
        "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE,
        "seed": SEED,
    }


async def measure(
    url: str, server_pid: int, repetitions: int, progress: Any = print
) -> dict[str, Any]:
    """Alternate server requests with direct pipeline and engine calls; return medians (ms).

    Also the CPU seconds each path costs: of the server process (``server_pid``) for a request,
    of this process for a pipeline or engine call (means over the repetitions, per image and
    per denoising step).
    """
    import torch

    from fictures_ai.config import Settings
    from fictures_ai.engines.base import ImageGenerationParams
    from fictures_ai.engines.diffusers_engine import DiffusersImageEngine
    from fictures_ai.services.engine_factory import image_engine_options

    torch.set_num_threads(1)
    settings = Settings(image_torch_threads=1)  # type: ignore[call-arg]
    engine = await DiffusersImageEngine.load(image_engine_options(settings))
    pipeline = engine._pipeline  # the very pipeline the engine renders with
    params = ImageGenerationParams(
        prompt=PROMPT,
        seed=SEED,
        width=WIDTH,
        height=HEIGHT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
    )

    def pipeline_call() -> None:
        generator = torch.Generator(device="cpu").manual_seed(SEED)
        pipeline(
            prompt=PROMPT,
            width=WIDTH,
            height=HEIGHT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=generator,
            output_type="pil",
        )

    times: dict[str, list[float]] = {"server": [], "pipeline": [], "engine": []}
    cpu: dict[str, list[float]] = {"server": [], "pipeline": [], "engine": []}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for repetition in range(repetitions + 1):  # the first round warms up
                started, before = time.perf_counter(), cpu_times(server_pid).own
                response = await client.post("/api/v1/images/generate", json=request_body())
                response.raise_for_status()
                server = time.perf_counter() - started
                server_cpu = cpu_times(server_pid).own - before
                started, before = time.perf_counter(), cpu_times().own
                pipeline_call()
                direct = time.perf_counter() - started
                direct_cpu = cpu_times().own - before
                started, before = time.perf_counter(), cpu_times().own
                await engine.generate(params)
                wrapped = time.perf_counter() - started
                wrapped_cpu = cpu_times().own - before
                if repetition:
                    times["server"].append(server)
                    times["pipeline"].append(direct)
                    times["engine"].append(wrapped)
                    cpu["server"].append(server_cpu)
                    cpu["pipeline"].append(direct_cpu)
                    cpu["engine"].append(wrapped_cpu)
                    progress(
                        f"  image {repetition}/{repetitions}: server {server * 1000:.0f} ms "
                        f"({server_cpu * 1000:.0f} ms CPU), pipeline {direct * 1000:.0f} ms "
                        f"({direct_cpu * 1000:.0f}), engine {wrapped * 1000:.0f} ms "
                        f"({wrapped_cpu * 1000:.0f})"
                    )
    finally:
        await engine.shutdown()
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_means = {name: statistics.fmean(values) for name, values in cpu.items()}
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "steps": STEPS,
        "torch_threads": 1,
        "repetitions": repetitions,
        "server_ms_p50": round(medians["server"] * 1000, 1),
        "pipeline_ms_p50": round(medians["pipeline"] * 1000, 1),
        "engine_ms_p50": round(medians["engine"] * 1000, 1),
        "overhead_vs_pipeline_pct": round((medians["server"] / medians["pipeline"] - 1) * 100, 2),
        "overhead_vs_engine_pct": round((medians["server"] / medians["engine"] - 1) * 100, 2),
        "samples_ms": {k: [round(v * 1000, 1) for v in vs] for k, vs in times.items()},
        # CPU seconds per image: the server process for a request, this process for a call.
        "cpu_s_per_image": {name: round(value, 4) for name, value in cpu_means.items()},
        "cpu_ms_per_step": {
            name: round(value * 1000 / STEPS, 1) for name, value in cpu_means.items()
        },
        "cpu_overhead_vs_pipeline_pct": round(
            (cpu_means["server"] / cpu_means["pipeline"] - 1) * 100, 2
        ),
        "cpu_samples_ms": {k: [round(v * 1000, 1) for v in vs] for k, vs in cpu.items()},
    }


def run(url: str, server_pid: int, repetitions: int) -> dict[str, Any]:
    """Synchronous wrapper of :func:`measure`."""
    return asyncio.run(measure(url, server_pid, repetitions))
