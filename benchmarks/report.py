"""The markdown of ``docs/benchmarks.md``: tables and goal checks from the results.

Only the part between the result markers is rewritten; the prose around it (analysis,
profile findings) is kept as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

START = "<!-- bench:results:start (written by benchmarks/bench.py) -->"
END = "<!-- bench:results:end -->"
TEMPLATE = f"""# Benchmarks

`make bench` (`python benchmarks/bench.py`) measures the server against `vllm serve`, the raw
engine and a bare HTTP app. See `benchmarks/bench.py` for what runs and how.

{START}
{END}
"""


def _goal(met: bool) -> str:
    return "met" if met else "**not met**"


def tables(results: dict[str, Any]) -> str:
    """The results section: settings, text tables, HTTP ceiling, images and the goals."""
    machine = results["machine"]
    text = results["text"]
    settings = text["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines = [
        f"Measured {results['generated_at']} on {machine['cpus']} CPU cores "
        f"({machine['cpu']}), {machine['memory_gib']} GiB, no GPU; {machine['platform']}, "
        f"Python {machine['python']}.",
        f"Versions: {versions}.",
        "",
        f"Text engine settings, identical for all three: SmolLM2-135M-Instruct (bundled), "
        f"{settings['dtype']}, eager, max_model_len {settings['max_model_len']}, "
        f"max_num_seqs {settings['max_num_seqs']}, KV cache {settings['kv_cache_mb']} MiB. "
        f"Load: {settings['max_tokens']} output tokens per request (`ignore_eos`, checked "
        f"against the reported usage), closed loop, requests per level "
        f"{settings['requests_per_level']}, {settings['runs']} interleaved runs "
        "(fresh processes each), medians. TTFT and ITL in ms.",
        "",
        "![throughput and TTFT against concurrency](images/benchmark.png)",
        "",
        "### Text: fictures-ai serve against vllm serve",
        "",
        "| streams | ours tok/s | vllm serve tok/s | ratio | TTFT p50 ours / vllm | "
        "ratio | TTFT p99 ours / vllm | ITL p50 ours / vllm | ITL p99 ours / vllm "
        "| API CPU s per 1k tokens ours / vllm | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ours = text["targets"]["ours"]
    theirs = text["targets"]["vllm_serve"]
    raw = text["targets"]["raw_engine"]
    for mine, other, row in zip(ours, theirs, text["vs_vllm_serve"], strict=True):
        lines.append(
            f"| {mine['concurrency']} | {mine['tokens_per_s']:.1f} | {other['tokens_per_s']:.1f} "
            f"| {row['throughput_ratio']:.3f} | {mine['ttft_p50_ms']:.1f} / "
            f"{other['ttft_p50_ms']:.1f} | {row['ttft_p50_ratio']:.3f} | "
            f"{mine['ttft_p99_ms']:.1f} / {other['ttft_p99_ms']:.1f} | "
            f"{mine['itl_p50_ms']:.2f} / {other['itl_p50_ms']:.2f} | "
            f"{mine['itl_p99_ms']:.2f} / {other['itl_p99_ms']:.2f} | "
            f"{mine['api_cpu_s_per_1k_tokens']:.3f} / {other['api_cpu_s_per_1k_tokens']:.3f} "
            f"| {row['api_cpu_ratio']:.2f} |"
        )
    lines += [
        "",
        "### Text: fictures-ai serve against AsyncLLM in-process (no HTTP)",
        "",
        "| streams | ours tok/s | raw engine tok/s | throughput overhead | TTFT p50 ours / raw "
        "| ITL p50 ours / raw | front-end CPU s per 1k tokens ours / raw |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mine, other, row in zip(ours, raw, text["vs_raw_engine"], strict=True):
        lines.append(
            f"| {mine['concurrency']} | {mine['tokens_per_s']:.1f} | {other['tokens_per_s']:.1f} "
            f"| {row['overhead_pct']:+.1f}% | {mine['ttft_p50_ms']:.1f} / "
            f"{other['ttft_p50_ms']:.1f} | {mine['itl_p50_ms']:.2f} / {other['itl_p50_ms']:.2f} | "
            f"{mine['api_cpu_s_per_1k_tokens']:.3f} / {other['api_cpu_s_per_1k_tokens']:.3f} |"
        )
    ceiling = text.get("http_ceiling")
    if ceiling:
        lines += [
            "",
            "### HTTP-layer ceiling (instant engine, 64 concurrent streams)",
            "",
            f"{ceiling['tokens_per_request']} one-token chunks per request, "
            f"{ceiling['seconds_per_sample']} s per sample, median of the runs; load generator: "
            f"{ceiling['load_generator']}.",
            "",
            "| route | bare Starlette + uvicorn, same SSE bytes (tokens/s) "
            "| ours (tokens/s) | ours / bare | server CPU ms per 1k tokens bare / ours |",
            "|---|---:|---:|---:|---:|",
            f"| `/v1/chat/completions` | {ceiling['bare_tokens_per_s']:.0f} "
            f"| {ceiling['tokens_per_s']:.0f} | {ceiling['ratio_vs_bare'] * 100:.0f}% "
            f"| {_ceiling_cpu(ceiling, '/v1/chat/completions')} |",
            f"| `/api/v1/text/stream` | {ceiling['bare_fictures_stream_tokens_per_s']:.0f} "
            f"| {ceiling['fictures_stream_tokens_per_s']:.0f} "
            f"| {ceiling['fictures_stream_ratio_vs_bare'] * 100:.0f}% "
            f"| {_ceiling_cpu(ceiling, '/api/v1/text/stream')} |",
            "",
            "Throughput here is set by whichever of the server and the load generator runs out "
            "of CPU first on the shared cores (`server_cores_busy` in the results); the CPU per "
            "1000 tokens is the server's own cost, lower when a lagging client lets its writes "
            "coalesce, so compare the two apps within one run.",
        ]
    images = results.get("images")
    if images:
        lines += [
            "",
            f"### Images ({images['width']}×{images['height']}, {images['steps']} steps, "
            f"tiny pipeline, 1 torch thread, median of {images['repetitions']})",
            "",
            "| path | latency p50 (ms) | CPU per image (ms, mean) | CPU per step (ms) |",
            "|---|---:|---:|---:|",
            f"| diffusers pipeline call (PIL image) | {images['pipeline_ms_p50']:.1f} "
            f"| {_image_cpu(images, 'pipeline')} |",
            f"| `DiffusersImageEngine.generate` (PNG) | {images['engine_ms_p50']:.1f} "
            f"| {_image_cpu(images, 'engine')} |",
            f"| `POST /api/v1/images/generate` | {images['server_ms_p50']:.1f} "
            f"| {_image_cpu(images, 'server')} |",
            "",
            f"Request overhead: {images['overhead_vs_pipeline_pct']:+.1f}% against the pipeline "
            f"call, {images['overhead_vs_engine_pct']:+.1f}% against the engine; in CPU time "
            f"{images['cpu_overhead_vs_pipeline_pct']:+.1f}% against the pipeline call (the "
            "server process for a request, the benchmark process for a call).",
        ]
    lines += ["", "### Goals", "", *goal_lines(results)]
    return "\n".join(lines)


def _ceiling_cpu(ceiling: dict[str, Any], path: str) -> str:
    cpu = ceiling["api_cpu_s_per_1k_tokens"]
    return f"{cpu[f'bare {path}'] * 1000:.2f} / {cpu[f'fictures {path}'] * 1000:.2f}"


def _image_cpu(images: dict[str, Any], path: str) -> str:
    return f"{images['cpu_s_per_image'][path] * 1000:.0f} | {images['cpu_ms_per_step'][path]:.0f}"


def goal_lines(results: dict[str, Any]) -> list[str]:
    """One line per goal of issue 6, with the figure and whether it is met."""
    text = results["text"]
    rows = text["vs_vllm_serve"]
    worst_tp = min(rows, key=lambda r: r["throughput_ratio"])
    worst_ttft = max(rows, key=lambda r: r["ttft_p50_ratio"])
    worst_raw = max(text["vs_raw_engine"], key=lambda r: r["overhead_pct"])
    lines = [
        f"- Throughput ≥ 1.0× vllm serve at every concurrency: lowest "
        f"{worst_tp['throughput_ratio']:.3f} (c={worst_tp['concurrency']}) — "
        f"{_goal(worst_tp['throughput_ratio'] >= 1.0)}.",
        f"- TTFT p50 ≤ 1.1× vllm serve: highest {worst_ttft['ttft_p50_ratio']:.3f} "
        f"(c={worst_ttft['concurrency']}) — {_goal(worst_ttft['ttft_p50_ratio'] <= 1.1)}.",
        f"- Overhead against the raw engine ≤ 3%: highest {worst_raw['overhead_pct']:+.1f}% "
        f"(c={worst_raw['concurrency']}) — {_goal(worst_raw['overhead_pct'] <= 3.0)}.",
    ]
    ceiling = text.get("http_ceiling")
    if ceiling:
        lines.append(
            f"- Instant engine ≥ 20,000 tokens/s and ≥ 80% of the bare app: "
            f"{ceiling['tokens_per_s']:.0f} tokens/s, {ceiling['ratio_vs_bare'] * 100:.0f}% — "
            f"{_goal(ceiling['tokens_per_s'] >= 20000 and ceiling['ratio_vs_bare'] >= 0.8)}."
        )
    images = results.get("images")
    if images:
        overhead = images["overhead_vs_pipeline_pct"]
        lines.append(f"- Image request overhead ≤ 5%: {overhead:+.1f}% — {_goal(overhead <= 5.0)}.")
    return lines


def write(results: dict[str, Any], path: Path) -> None:
    """Replace the section between the markers of ``path`` (created when missing)."""
    document = path.read_text() if path.exists() else TEMPLATE
    if START not in document or END not in document:
        document = document.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = document.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{tables(results)}\n{END}{tail}")


def headline(results: dict[str, Any]) -> str:
    """A short plain-text summary for the terminal."""
    text = results.get("text", {})
    lines = ["", "Summary:"]
    for row in text.get("vs_vllm_serve", []):
        lines.append(
            f"  c={row['concurrency']:<3} vs vllm serve: throughput x{row['throughput_ratio']:.3f}"
            f", TTFT p50 x{row['ttft_p50_ratio']:.3f}"
            f", API CPU per token x{row['api_cpu_ratio']:.2f}"
        )
    for row in text.get("vs_raw_engine", []):
        lines.append(
            f"  c={row['concurrency']:<3} vs raw engine: overhead {row['overhead_pct']:+.1f}%"
        )
    ceiling = text.get("http_ceiling")
    if ceiling:
        lines.append(
            f"  HTTP ceiling: {ceiling['tokens_per_s']:.0f} tok/s, "
            f"{ceiling['ratio_vs_bare'] * 100:.0f}% of bare, CPU per token "
            f"x{ceiling['api_cpu_ratio_vs_bare']:.2f} of bare"
        )
    images = results.get("images")
    if images:
        lines.append(
            f"  images: overhead {images['overhead_vs_pipeline_pct']:+.1f}%, in CPU time "
            f"{images['cpu_overhead_vs_pipeline_pct']:+.1f}% "
            f"({images['cpu_s_per_image']['server'] * 1000:.0f} ms per image)"
        )
    return "\n".join(lines)
