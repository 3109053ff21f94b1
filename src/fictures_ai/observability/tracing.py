"""OpenTelemetry tracing: the app's tracer provider, and child spans of the current request.

Tracing is off unless an OTLP endpoint is configured (``OTLP_ENDPOINT``, or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). Off means no
tracer at all: the request context carries ``tracer=None`` and every helper here returns
at once, so requests pay nothing for it.

The SDK (provider, batch processor, OTLP/HTTP exporter) is imported and built only in
``build_tracer_provider``, at app start-up; the rest of the code uses the API alone. The
provider belongs to one app and is passed to it explicitly, never installed globally, so
several apps (tests) can trace side by side.

Spans of a request::

    POST /api/v1/images/generate        (SERVER, the middleware)
    ├── queue.model_load                 waiting for the model to load (only while it loads)
    ├── queue.image_slot                 waiting for a free render slot
    ├── image.render                     the engine renders
    └── image.encode                     PNG bytes to a base64 data URL

    POST /api/v1/text/stream            (SERVER)
    ├── queue.model_load
    └── text.generate                    the engine generates (first token to last)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry.trace import Span, Status, StatusCode, TracerProvider
from opentelemetry.util.types import AttributeValue

from fictures_ai.observability.context import current_request
from fictures_ai.redaction import mask_url

logger = logging.getLogger(__name__)

TRACER_NAME = "fictures_ai"
_OTLP_ENV_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_traces_endpoint(otlp_endpoint: str | None) -> str | None:
    """Where traces go: ``otlp_endpoint`` (the ``OTLP_ENDPOINT`` setting, a base URL;
    ``/v1/traces`` is appended), else the OTel environment variables (resolved by the exporter
    itself), else None: no tracing."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if otlp_endpoint:
        base = otlp_endpoint.rstrip("/")
        return base if base.endswith("/v1/traces") else base + "/v1/traces"
    for name in _OTLP_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def build_tracer_provider(otlp_endpoint: str | None) -> TracerProvider | None:
    """An SDK tracer provider exporting over OTLP/HTTP in batches, or None when not configured.

    The service name comes from ``OTEL_SERVICE_NAME`` if set (the SDK's resource detection),
    else ``fictures-ai``. Call ``shutdown()`` on the result at app shut-down to flush spans.
    """
    endpoint = otlp_traces_endpoint(otlp_endpoint)
    if endpoint is None:
        return None
    # Imported here: without tracing the SDK and the exporter are never loaded.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "fictures-ai"}
    provider = SdkTracerProvider(resource=Resource.create(attributes))
    # An explicit endpoint from our setting; None lets the exporter read the OTel variables
    # (it appends /v1/traces to OTEL_EXPORTER_OTLP_ENDPOINT itself).
    explicit = endpoint if otlp_endpoint else None
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=explicit)))
    # The endpoint may carry a password or a token (ours or the OTel variables').
    logger.info("Tracing on: spans go to %s over OTLP/HTTP", mask_url(endpoint))
    return provider


def start_child_span(
    name: str, attributes: Mapping[str, AttributeValue] | None = None
) -> Span | None:
    """Start a span under the current request's span; None when the request is not traced.

    The span is not made current (no context is attached), so it may be started in one task
    and ended in another, as a streaming generator is; end it with ``end_span``.
    """
    request = current_request()
    if request is None or request.tracer is None:
        return None
    return request.tracer.start_span(name, attributes=attributes)


def end_span(span: Span | None, error: BaseException | None = None) -> None:
    """End a span from ``start_child_span``, marking it failed when ``error`` is an Exception.

    Cancellation (a client that went away) is recorded as an attribute, not as an error.
    """
    if span is None:
        return
    if isinstance(error, Exception):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    elif error is not None:
        span.set_attribute("fictures.cancelled", True)
    span.end()


@contextmanager
def child_span(
    name: str, attributes: Mapping[str, AttributeValue] | None = None
) -> Iterator[Span | None]:
    """``start_child_span`` as a context manager: the span ends when the block does."""
    span = start_child_span(name, attributes)
    try:
        yield span
    except BaseException as exc:
        end_span(span, exc)
        raise
    end_span(span)
