"""Metrics, logs and traces of the server; no HTTP here (the middleware lives in ``api/``).

- ``context``: the request being handled (id, tracer, access-log fields), in a context variable
- ``metrics``: the app's Prometheus registry and instruments; the window behind ``/health``
- ``logs``: JSON / text log formatting with the request id on every line
- ``tracing``: the OpenTelemetry tracer provider (optional) and child spans
- ``gpu``: GPU memory readings that never initialise CUDA

``Observability`` bundles what one app observes with; ``create_app`` builds it.
"""

from __future__ import annotations

from opentelemetry.trace import Tracer, TracerProvider

from fictures_ai.observability.metrics import Metrics, RequestWindow
from fictures_ai.observability.tracing import TRACER_NAME


class Observability:
    """One app's metrics, recent-request window and (optional) tracer provider."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        window: RequestWindow,
        tracer_provider: TracerProvider | None = None,
        log_prompts: bool = False,
    ) -> None:
        self.metrics = metrics
        self.window = window
        self.tracer_provider = tracer_provider
        self.log_prompts = log_prompts
        # One tracer for the app's life: None when tracing is off, so requests skip it.
        self.tracer: Tracer | None = (
            tracer_provider.get_tracer(TRACER_NAME) if tracer_provider is not None else None
        )


__all__ = ["Observability"]
