"""The benchmark plot: throughput and TTFT against concurrency, ours and ``vllm serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SERIES = [
    ("ours", "fictures-ai serve", "tab:blue", "o"),
    ("vllm_serve", "vllm serve", "tab:orange", "s"),
    ("raw_engine", "AsyncLLM in-process", "tab:gray", "^"),
]


def plot(results: dict[str, Any], output: Path) -> None:
    """Write a two-panel PNG (Agg backend) from ``results["text"]["targets"]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = results["text"]["targets"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for key, label, colour, marker in SERIES:
        rows = targets.get(key)
        if not rows:
            continue
        levels = [row["concurrency"] for row in rows]
        style = {"color": colour, "marker": marker, "label": label}
        if key == "raw_engine":
            style["linestyle"] = "--"
        left.plot(levels, [row["tokens_per_s"] for row in rows], **style)
        right.plot(levels, [row["ttft_p50_ms"] for row in rows], **style)
    settings = results["text"]["settings"]
    for axis, title, unit in (
        (left, "Output throughput", "tokens/s"),
        (right, "Time to first token, p50", "ms"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xticks(settings["levels"], [str(level) for level in settings["levels"]])
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    right.set_yscale("log")
    machine = results["machine"]
    figure.suptitle(
        f"SmolLM2-135M-Instruct, {settings['max_tokens']} output tokens/request, bf16 eager, "
        f"{machine['cpus']} CPU cores; median of {settings['runs']} runs",
        fontsize=10,
    )
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    plt.close(figure)
