"""The text load of the benchmark through vLLM's ``AsyncLLM`` in-process, without HTTP.

``python benchmarks/raw_engine.py --levels 1,4 --max-tokens 64`` builds the engine from the
same settings as the server (``build_engine_args``, and the server's stat logger; the engine
settings come from the same environment variables), sends the same chat prompts (rendered
with the model's chat template once, up front), the same sampling parameters and the same
closed-loop load as the HTTP load generator, and prints one JSON line per level on stdout
(prefixed ``RESULT ``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from fictures_ai.config import Settings  # noqa: E402
from fictures_ai.engines.vllm_engine import (  # noqa: E402
    SchedulerTally,
    build_engine_args,
    resolve_text_model,
    stat_logger_for,
)
from fictures_ai.services.engine_factory import text_engine_options  # noqa: E402
from loadgen import StreamResult, run_workers  # noqa: E402
from process_cpu import cpu_times, per_1k  # noqa: E402
from text_load import PROMPTS, TEMPERATURE, TOP_P, requests_for  # noqa: E402


async def measure(levels: list[int], max_tokens: int, warmup: int) -> list[dict[str, Any]]:
    """Start the engine, warm it up, run each level; return the level summaries."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    options = text_engine_options(Settings())
    llm = AsyncLLM.from_engine_args(
        build_engine_args(options, resolve_text_model(options)),
        stat_loggers=[stat_logger_for(SchedulerTally())],
    )
    engine = [llm]  # the closures hold this list, so that the last reference can be dropped
    try:
        tokenizer = llm.get_tokenizer()
        prompts = [
            TokensPrompt(
                prompt_token_ids=tokenizer.encode(
                    tokenizer.apply_chat_template(
                        [{"role": "user", "content": text}],
                        tokenize=False,
                        add_generation_prompt=True,
                    ),
                    add_special_tokens=False,
                )
            )
            for text in PROMPTS
        ]
        ids = itertools.count()

        async def one(number: int, _state: None, tokens: int = max_tokens) -> StreamResult:
            params = SamplingParams(
                max_tokens=tokens,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                ignore_eos=True,
                output_kind=RequestOutputKind.DELTA,
            )
            started = time.perf_counter()
            stamps: list[float] = []
            produced = 0
            async for output in engine[0].generate(
                prompts[number % len(prompts)], params, request_id=f"raw-{next(ids)}"
            ):
                new = len(output.outputs[0].token_ids)
                if new:
                    produced += new
                    stamps.append(time.perf_counter())
            return StreamResult(
                ttft_s=stamps[0] - started,
                itl_s=[b - a for a, b in itertools.pairwise(stamps)],
                total_s=time.perf_counter() - started,
                content_events=len(stamps),
                completion_tokens=produced,
            )

        async def nothing(_state: None) -> None:
            return None

        async def warm(number: int, state: None) -> StreamResult:
            return await one(number, state, tokens=warmup)

        await run_workers(4, 4, warm, lambda: None, nothing)
        summaries = []
        for concurrency in levels:
            before = cpu_times()
            level = await run_workers(
                concurrency, requests_for(concurrency), one, lambda: None, nothing
            )
            spent = cpu_times() - before
            summary = level.summary()
            tokens = summary["output_tokens"]
            summary |= {  # this process is the front end (AsyncLLM and the load): the "API"
                "api_cpu_s": round(spent.own, 3),
                "engine_cpu_s": round(spent.children, 3),
                "api_cpu_s_per_1k_tokens": per_1k(spent.own, tokens),
                "engine_cpu_s_per_1k_tokens": per_1k(spent.children, tokens),
            }
            summaries.append(summary)
            print("RESULT " + json.dumps(summaries[-1]), flush=True)
        return summaries
    finally:
        llm.shutdown()
        engine.clear()
        del llm  # AsyncLLM.__del__ would shut down again at exit, when vLLM's globals are gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup-tokens", type=int, default=16)
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    asyncio.run(measure(levels, args.max_tokens, args.warmup_tokens))


if __name__ == "__main__":
    main()
