"""Request ids, access log, HTTP metrics and the request span: one pure ASGI middleware.

Pure ASGI (not Starlette's ``BaseHTTPMiddleware``) so that streaming responses pass through
untouched and the measurement spans the whole stream, up to its last byte. For every HTTP
request it:

- takes the client's ``X-Request-ID`` if it looks sane, else makes one, binds it for the
  logs and the services (``observability.context``) and returns it on the response, errors
  and streams included;
- opens the request's server span when tracing is on (continuing a W3C ``traceparent``);
- at the end, counts the request by route template and status, records its latency, feeds
  ``/health``'s window, and writes one access line (with the request's token usage, if any);
  then runs the request's ``on_finish`` callbacks (charging those tokens to the rate limit).

It must be the outermost layer (``FicturesApp`` puts it outside Starlette's error
middleware), so even an unhandled exception's 500 carries the request id and is counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fictures_ai.observability import Observability
from fictures_ai.observability.context import (
    REQUEST_ID_HEADER,
    RequestContext,
    accept_request_id,
    bind_request,
    unbind_request,
)

access_logger = logging.getLogger("fictures_ai.access")
"""A logger of its own (like ``uvicorn.access``), so that operators can route or mute it."""

UNMATCHED_ROUTE = "unmatched"
"""The route label of requests no route matched: raw paths would explode the label space."""
CLIENT_CLOSED_REQUEST = 499
"""Status recorded for a request whose client went away before any answer (nginx's code)."""
WINDOW_EXCLUDED_ROUTES = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})
"""Probes and scrapes stay out of /health's latency window: they would dilute it."""

_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")
_PROPAGATOR = TraceContextTextMapPropagator()


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/api/v1/text/generate``), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


class ObservabilityMiddleware:
    """The pure ASGI middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, *, observability: Observability) -> None:
        self.app = app
        self.observability = observability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        observability = self.observability
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        request = RequestContext(
            request_id=accept_request_id(_header(headers, _REQUEST_ID_KEY)),
            tracer=observability.tracer,
            log_prompts=observability.log_prompts,
        )
        id_header = (_REQUEST_ID_KEY, request.request_id.encode("latin-1"))
        status = 0

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [
                    (name.lower().encode("latin-1"), value.encode("latin-1"))
                    for name, value in request.response_headers.items()
                ]
                message = {**message, "headers": [*message.get("headers", ()), id_header, *extra]}
            await send(message)

        token = bind_request(request)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            if request.tracer is None:
                await self.app(scope, receive, send_with_request_id)
            else:
                await self._traced(scope, receive, send_with_request_id, request)
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = time.perf_counter() - started
            if status == 0:  # nothing was answered
                status = 500 if isinstance(error, Exception) else CLIENT_CLOSED_REQUEST
            self._record(scope, request, status, seconds)
            try:
                for callback in request.on_finish:
                    await callback(request)
            finally:
                unbind_request(token)

    async def _traced(
        self, scope: Scope, receive: Receive, send: Send, request: RequestContext
    ) -> None:
        assert request.tracer is not None
        method: str = scope["method"]
        carrier = {
            key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
        }
        parent = _PROPAGATOR.extract(carrier)
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # The name gets its route once routing has happened (low cardinality, as OTel's HTTP
        # conventions ask); until then it is the method alone.
        with request.tracer.start_as_current_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                "fictures.request_id": request.request_id,
            },
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            except asyncio.CancelledError:
                span.set_attribute("fictures.cancelled", True)
                raise
            finally:
                route = route_template(scope)
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                if status:
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))

    def _record(self, scope: Scope, request: RequestContext, status: int, seconds: float) -> None:
        route = route_template(scope)
        method: str = scope["method"]
        self.observability.metrics.observe_request(
            method=method, route=route, status=status, seconds=seconds
        )
        if route not in WINDOW_EXCLUDED_ROUTES:
            self.observability.window.record(seconds=seconds, error=status >= 500)
        latency_ms = round(seconds * 1000, 1)
        fields: dict[str, Any] = {
            "event": "request",
            "method": method,
            "route": route,
            "path": scope["path"],
            "status": status,
            "latency_ms": latency_ms,
            "client": request.client,
            **request.fields,
        }
        if request.usage is not None:
            fields["prompt_tokens"] = request.usage.prompt_tokens
            fields["completion_tokens"] = request.usage.completion_tokens
        access_logger.info(
            "%s %s %d %.1f ms", method, scope["path"], status, latency_ms, extra=fields
        )
