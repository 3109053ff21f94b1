"""Prometheus metrics of one app, and the sliding window behind ``/health``'s request figures.

Every app owns a ``Metrics`` with its own ``CollectorRegistry`` (never the global one, which
vLLM uses for its own ``vllm:`` metrics), so tests can build many apps side by side.

Two kinds of figures:

- observed as things happen: HTTP requests and latency (the middleware), time to first
  token, inter-token latency and tokens (the text service's stream, which sees every chunk),
  queue wait and render seconds (the image service);
- read at scrape time from the services (``EngineSnapshot``): requests running and waiting,
  model state, load seconds, and GPU memory. Reading them then keeps the request path free
  of gauge bookkeeping and can never drift from the services' own counts. vLLM's own
  scheduler figures come the same way (``EngineSnapshot.engine_stats``) and are exported
  under vLLM's names with our prefix: ``vllm:kv_cache_usage_perc`` is
  ``fictures_vllm_kv_cache_usage_perc``, and so on (``VLLM_FAMILIES``).

Histogram buckets span CPU and GPU speeds alike: a 135M model on two cores and Gemma on an
H100 both land inside them. The full list of names is in ``docs/observability.md``.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from fictures_ai.observability.gpu import GpuMemory
from fictures_ai.shared import EngineStats

REQUEST_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 60.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.0,
)  # fmt: skip
RENDER_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
    180.0, 300.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
QUEUE_WAIT_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

TEXT_OUTCOMES = ("stop", "length", "abort", "error", "rejected")
"""``finish_reason`` of ``fictures_text_requests_total``: the engine's reasons, ``abort`` when
the client went away, ``error`` when generation failed, ``rejected`` for invalid requests."""
IMAGE_OUTCOMES = ("ok", "error", "cancelled")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class TextMetrics:
    """The text service's instruments, already labelled with its model."""

    time_to_first_token: Histogram
    inter_token_latency: BulkHistogramChild
    prompt_tokens: Counter
    generation_tokens: Counter
    queue_wait: Histogram
    finished: dict[str, Counter]
    """One counter per ``TEXT_OUTCOMES`` entry."""


@dataclass(frozen=True, slots=True)
class ImageMetrics:
    """The image service's instruments, already labelled with its model."""

    render_seconds: Histogram
    queue_wait: Histogram
    finished: dict[str, Counter]
    """One counter per ``IMAGE_OUTCOMES`` entry."""
    batch_size: Histogram
    """Images per pipeline call (``IMAGE_MAX_BATCH``)."""


@dataclass(frozen=True, slots=True)
class ResponseCacheMetrics:
    """One model's response-cache instruments, already labelled with its model and kind."""

    hits: Counter
    misses: Counter
    evictions: Counter
    bytes: Gauge


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """One engine's state at scrape time, as its service reports it.

    ``waiting`` is None where the service has no queue of its own (text: vLLM queues inside
    its scheduler, and those requests count as running here).
    """

    engine: str
    model: str
    state: str
    states: Sequence[str]
    running: int
    waiting: int | None
    waiting_for_load: int
    load_seconds: float | None
    load_failures: int
    memory_bytes: int | None = None
    """What the loaded engine costs (measured after its load); None when not loaded."""
    last_used: float | None = None
    """When a request last used the model (Unix time, seconds)."""
    engine_stats: EngineStats | None = None
    """What the engine's own scheduler reports (text engines on vLLM, once loaded)."""


VLLM_FAMILIES = {
    "fictures_vllm_num_requests_running": "vllm:num_requests_running",
    "fictures_vllm_num_requests_waiting": "vllm:num_requests_waiting",
    "fictures_vllm_kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "fictures_vllm_prefix_cache_queries": "vllm:prefix_cache_queries",
    "fictures_vllm_prefix_cache_hits": "vllm:prefix_cache_hits",
    "fictures_vllm_spec_decode_num_drafts": "vllm:spec_decode_num_drafts",
    "fictures_vllm_spec_decode_num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "fictures_vllm_spec_decode_num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}
"""Our name of each of vLLM's scheduler figures we export, and vLLM's own name for it (the two
counters gain ``_total`` in the exposition, in both)."""


class Metrics:
    """The app's Prometheus registry and instruments."""

    def __init__(self, *, version: str) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.http_requests = Counter(
            "fictures_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_request_duration = Histogram(
            "fictures_http_request_duration_seconds",
            "Time from receiving a request to the end of its response (whole streams included).",
            ["method", "route"],
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "fictures_time_to_first_token_seconds",
            "Time from handing a text request to the engine to its first token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = BulkHistogram(
            "fictures_inter_token_latency_seconds",
            "Time between tokens of one text stream (a chunk of several tokens counts its gap "
            "divided by its tokens, once per token).",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "fictures_prompt_tokens",
            "Prompt tokens of finished text requests.",
            ["model"],
            registry=registry,
        )
        self.generation_tokens = Counter(
            "fictures_generation_tokens",
            "Tokens generated by finished text requests (aborted ones included).",
            ["model"],
            registry=registry,
        )
        self.text_requests = Counter(
            "fictures_text_requests",
            "Text generations that ended, by finish reason (stop, length, abort, error, rejected).",
            ["model", "finish_reason"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "fictures_queue_wait_seconds",
            "Time a request waited before its engine started on it (model load, render slot).",
            ["engine", "model"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.image_render = Histogram(
            "fictures_image_render_seconds",
            "Time the image engine took to render one image (successful renders).",
            ["model"],
            buckets=RENDER_BUCKETS,
            registry=registry,
        )
        self.image_batch_size = Histogram(
            "fictures_image_batch_size",
            "Images rendered by one pipeline call (requests batched together, IMAGE_MAX_BATCH).",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.image_renders = Counter(
            "fictures_image_renders",
            "Image renders that ended, by outcome (ok, error, cancelled).",
            ["model", "outcome"],
            registry=registry,
        )
        self.engine_capacity = Gauge(
            "fictures_engine_capacity",
            "Requests an engine works on at once (text: TEXT_MAX_NUM_SEQS, image: "
            "IMAGE_MAX_CONCURRENCY, or the model's options); more running requests than this "
            "wait in a queue.",
            ["engine", "model"],
            registry=registry,
        )
        self.response_cache_hits = Counter(
            "fictures_response_cache_hits",
            "Deterministic requests (each generation or image of one) answered from the "
            "response cache.",
            ["model", "kind"],
            registry=registry,
        )
        self.response_cache_misses = Counter(
            "fictures_response_cache_misses",
            "Response-cache lookups that found nothing (the answer is stored once complete).",
            ["model", "kind"],
            registry=registry,
        )
        self.response_cache_evictions = Counter(
            "fictures_response_cache_evictions",
            "Response-cache entries evicted to stay within RESPONSE_CACHE_MAX_BYTES.",
            ["model", "kind"],
            registry=registry,
        )
        self.response_cache_bytes = Gauge(
            "fictures_response_cache_bytes",
            "Bytes the response cache of a model holds (payload plus a fixed overhead each).",
            ["model", "kind"],
            registry=registry,
        )
        Info("fictures_build", "Version of the server.", registry=registry).info(
            {"version": version}
        )

    def text(self, model: str) -> TextMetrics:
        """The text instruments for ``model``; its series appear (at zero) from now on."""
        return TextMetrics(
            time_to_first_token=self.time_to_first_token.labels(model),
            inter_token_latency=self.inter_token_latency.labels(model),
            prompt_tokens=self.prompt_tokens.labels(model),
            generation_tokens=self.generation_tokens.labels(model),
            queue_wait=self.queue_wait.labels("text", model),
            finished={reason: self.text_requests.labels(model, reason) for reason in TEXT_OUTCOMES},
        )

    def image(self, model: str) -> ImageMetrics:
        """The image instruments for ``model``; its series appear (at zero) from now on."""
        return ImageMetrics(
            render_seconds=self.image_render.labels(model),
            queue_wait=self.queue_wait.labels("image", model),
            finished={
                outcome: self.image_renders.labels(model, outcome) for outcome in IMAGE_OUTCOMES
            },
            batch_size=self.image_batch_size.labels(model),
        )

    def response_cache(self, model: str, kind: str) -> ResponseCacheMetrics:
        """The response-cache instruments of ``model`` (``kind``: text or image)."""
        return ResponseCacheMetrics(
            hits=self.response_cache_hits.labels(model, kind),
            misses=self.response_cache_misses.labels(model, kind),
            evictions=self.response_cache_evictions.labels(model, kind),
            bytes=self.response_cache_bytes.labels(model, kind),
        )

    def observe_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered HTTP request. Unusual methods are folded into ``OTHER``."""
        if method not in HTTP_METHODS:
            method = "OTHER"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_request_duration.labels(method, route).observe(seconds)

    def watch(
        self,
        *,
        engines: Callable[[], Iterable[EngineSnapshot]],
        gpus: Callable[[], list[GpuMemory] | None],
    ) -> None:
        """Read the engines' state and GPU memory at every scrape from these callables."""
        self.registry.register(_StateCollector(engines=engines, gpus=gpus))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper asks for (OpenMetrics or Prometheus text)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class HistogramTally:
    """Observations counted locally, for :meth:`BulkHistogramChild.add` to take in one go."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Count ``value`` ``times`` times: one ``bisect`` and two additions."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.total += value * times


class BulkHistogramChild:
    """One label set of a :class:`BulkHistogram`."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        self._lock = threading.Lock()

    def tally(self) -> HistogramTally:
        """An empty tally with this histogram's buckets."""
        return HistogramTally(self._bounds)

    def add(self, tally: HistogramTally) -> None:
        """Add every observation of ``tally``."""
        with self._lock:
            for index, count in enumerate(tally.counts):
                self._counts[index] += count
            self._sum += tally.total

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` buckets and the sum, as the exposition wants them."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, count in zip(self._bounds, counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), float(cumulative)))
        return buckets, total


class BulkHistogram:
    """A labelled Prometheus histogram that takes a whole stream's observations at once.

    ``prometheus_client``'s ``Histogram.observe`` takes a lock and walks the buckets for every
    value; per token, that was a tenth of a streaming server's time at its ceiling. A stream
    counts its values into a :class:`HistogramTally` instead and hands it over when it ends.
    The scrape shows an ordinary histogram (``_bucket``, ``_count``, ``_sum``).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._bounds = (*buckets, math.inf)
        self._children: dict[tuple[str, ...], BulkHistogramChild] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> BulkHistogramChild:
        """The child for these label values; its series appear (at zero) from now on."""
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
        with self._lock:
            child = self._children.get(values)
            if child is None:
                child = self._children[values] = BulkHistogramChild(self._bounds)
            return child

    def describe(self) -> Iterator[Metric]:
        """The family's name, so that the registry can refuse duplicates at registration."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        """Every child's buckets and sum."""
        family = self._family()
        with self._lock:
            children = list(self._children.items())
        for values, child in children:
            buckets, total = child.snapshot()
            family.add_metric(list(values), buckets, total)
        yield family

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)


class _StateCollector:
    """Gauges read from the services and the GPU when Prometheus scrapes."""

    def __init__(
        self,
        *,
        engines: Callable[[], Iterable[EngineSnapshot]],
        gpus: Callable[[], list[GpuMemory] | None],
    ) -> None:
        self._engines = engines
        self._gpus = gpus

    def describe(self) -> Iterator[Metric]:
        # Names only, so that the registry can refuse duplicates at registration.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        up, state, running, waiting, load_waiting, load_seconds, load_failures = families[:7]
        memory, last_used = families[7:9]
        vllm_running, vllm_waiting, kv_cache, prefix_queries, prefix_hits = families[12:17]
        drafts, draft_tokens, accepted_tokens = families[17:]
        for snapshot in self._engines():
            labels = [snapshot.engine, snapshot.model]
            up.add_metric(labels, 1.0 if snapshot.state == "loaded" else 0.0)
            for name in snapshot.states:
                state.add_metric([*labels, name], 1.0 if name == snapshot.state else 0.0)
            running.add_metric(labels, snapshot.running)
            if snapshot.waiting is not None:
                waiting.add_metric(labels, snapshot.waiting)
            load_waiting.add_metric(labels, snapshot.waiting_for_load)
            if snapshot.load_seconds is not None:
                load_seconds.add_metric(labels, snapshot.load_seconds)
            load_failures.add_metric(labels, snapshot.load_failures)
            if snapshot.memory_bytes is not None:
                memory.add_metric(labels, snapshot.memory_bytes)
            if snapshot.last_used is not None:
                last_used.add_metric(labels, snapshot.last_used)
            stats = snapshot.engine_stats
            if stats is not None:
                model = [snapshot.model]
                vllm_running.add_metric(model, stats.running)
                vllm_waiting.add_metric(model, stats.waiting)
                kv_cache.add_metric(model, stats.kv_cache_usage)
                prefix_queries.add_metric(model, stats.prefix_cache_queries)
                prefix_hits.add_metric(model, stats.prefix_cache_hits)
                drafts.add_metric(model, stats.spec_decode_num_drafts)
                draft_tokens.add_metric(model, stats.spec_decode_num_draft_tokens)
                accepted_tokens.add_metric(model, stats.spec_decode_num_accepted_tokens)
        used, total, allocated = families[9:12]
        for gpu in self._gpus() or ():
            device = str(gpu.index)
            used.add_metric([device, gpu.name], gpu.used_bytes)
            total.add_metric([device, gpu.name], gpu.total_bytes)
            allocated.add_metric([device, gpu.name], gpu.allocated_bytes)
        yield from families

    @staticmethod
    def _families() -> list[GaugeMetricFamily | CounterMetricFamily]:
        engine_model = ["engine", "model"]
        device = ["device", "name"]
        return [
            GaugeMetricFamily(
                "fictures_engine_up",
                "1 when the engine is loaded and serving, else 0 (not loaded, loading, "
                "unloading, failed).",
                labels=engine_model,
            ),
            GaugeMetricFamily(
                "fictures_engine_state",
                "1 for the engine's current load state (not_loaded, loading, loaded, "
                "unloading, failed).",
                labels=[*engine_model, "state"],
            ),
            GaugeMetricFamily(
                "fictures_requests_running",
                "Requests handed to the engine and not finished (text: includes the requests "
                "vLLM's scheduler holds waiting).",
                labels=engine_model,
            ),
            GaugeMetricFamily(
                "fictures_requests_waiting",
                "Requests queued in the server for an engine slot (image render queue).",
                labels=engine_model,
            ),
            GaugeMetricFamily(
                "fictures_requests_waiting_for_model_load",
                "Requests waiting for their model to finish loading.",
                labels=engine_model,
            ),
            GaugeMetricFamily(
                "fictures_model_load_seconds",
                "Duration of the engine's last successful model load.",
                labels=engine_model,
            ),
            CounterMetricFamily(
                "fictures_model_load_failures",
                "Model loads that failed (a later request retries).",
                labels=engine_model,
            ),
            GaugeMetricFamily(
                "fictures_model_memory_bytes",
                "What a loaded model costs: RAM (process tree) on a CPU, GPU memory on CUDA, "
                "measured across its load.",
                labels=engine_model,
            ),
            GaugeMetricFamily(
                "fictures_model_last_used_timestamp_seconds",
                "When a request last used the model (Unix time).",
                labels=engine_model,
            ),
            GaugeMetricFamily(
                "fictures_gpu_memory_used_bytes",
                "Device-wide GPU memory in use (all processes), when this process uses CUDA.",
                labels=device,
            ),
            GaugeMetricFamily(
                "fictures_gpu_memory_total_bytes",
                "Total GPU memory, when this process uses CUDA.",
                labels=device,
            ),
            GaugeMetricFamily(
                "fictures_gpu_memory_allocated_bytes",
                "GPU memory allocated by this process's torch tensors.",
                labels=device,
            ),
            # vLLM's scheduler, as vLLM's own PrometheusStatLogger describes it (VLLM_FAMILIES).
            GaugeMetricFamily(
                "fictures_vllm_num_requests_running",
                "Requests in vLLM's model execution batches (vllm:num_requests_running).",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "fictures_vllm_num_requests_waiting",
                "Requests waiting in vLLM's scheduler (vllm:num_requests_waiting).",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "fictures_vllm_kv_cache_usage_perc",
                "Share of vLLM's KV cache in use, 1 is all of it (vllm:kv_cache_usage_perc).",
                labels=["model"],
            ),
            CounterMetricFamily(
                "fictures_vllm_prefix_cache_queries",
                "Prompt tokens vLLM looked up in its prefix cache (vllm:prefix_cache_queries).",
                labels=["model"],
            ),
            CounterMetricFamily(
                "fictures_vllm_prefix_cache_hits",
                "Prompt tokens vLLM found in its prefix cache (vllm:prefix_cache_hits).",
                labels=["model"],
            ),
            CounterMetricFamily(
                "fictures_vllm_spec_decode_num_drafts",
                "Speculative proposals vLLM verified (vllm:spec_decode_num_drafts).",
                labels=["model"],
            ),
            CounterMetricFamily(
                "fictures_vllm_spec_decode_num_draft_tokens",
                "Tokens proposed in them (vllm:spec_decode_num_draft_tokens).",
                labels=["model"],
            ),
            CounterMetricFamily(
                "fictures_vllm_spec_decode_num_accepted_tokens",
                "Proposed tokens the model agreed with (vllm:spec_decode_num_accepted_tokens).",
                labels=["model"],
            ),
        ]


@dataclass(frozen=True, slots=True)
class WindowSummary:
    """Latency and error rate of the requests of the last ``window_s`` seconds."""

    window_s: float
    count: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    error_rate: float | None
    """Share of answers with a 5xx status; None without requests."""


class RequestWindow:
    """Recent request latencies and outcomes over a sliding time window.

    Bounded twice: by age (``window_s``) and by count (``max_requests``, the newest kept), so
    a burst cannot grow it without limit. ``record`` is O(1) amortised; ``summary`` sorts the
    window, which is meant for health probes, not per request.
    """

    def __init__(
        self,
        *,
        window_s: float,
        max_requests: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._entries: deque[tuple[float, float, bool]] = deque(maxlen=max_requests)

    def record(self, *, seconds: float, error: bool) -> None:
        """Add one answered request: its latency and whether it was a server error."""
        now = self._clock()
        self._entries.append((now, seconds, error))
        self._expire(now)

    def summary(self) -> WindowSummary:
        """p50/p95 latency (nearest rank) and 5xx share of the requests in the window."""
        self._expire(self._clock())
        entries = list(self._entries)
        if not entries:
            return WindowSummary(self.window_s, 0, None, None, None)
        latencies = sorted(seconds for _, seconds, _ in entries)
        errors = sum(1 for _, _, error in entries if error)
        return WindowSummary(
            window_s=self.window_s,
            count=len(entries),
            latency_p50_ms=round(_nearest_rank(latencies, 0.50) * 1000, 1),
            latency_p95_ms=round(_nearest_rank(latencies, 0.95) * 1000, 1),
            error_rate=round(errors / len(entries), 4),
        )

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        entries = self._entries
        while entries and entries[0][0] < horizon:
            entries.popleft()


def _nearest_rank(ordered: list[float], quantile: float) -> float:
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]
