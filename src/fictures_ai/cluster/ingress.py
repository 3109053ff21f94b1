"""The ingress deployment of ``serve --ray``: the FastAPI app (auth, limits, routing, SSE) in
each of its replicas, with the models' deployment handles as its engines."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from fictures_ai.engines.options import DiffusersEngineOptions, VllmEngineOptions
from fictures_ai.engines.ray_engine import RayImageEngine, RayTextEngine
from fictures_ai.observability.context import REQUEST_ID_HEADER
from fictures_ai.observability.logs import configure_logging
from fictures_ai.services.engine_factory import ImageLoader, TextLoader
from fictures_ai.services.models.spec import ModelSpec

logger = logging.getLogger(__name__)


class RayEngines:
    """``EngineLoaders`` of the ingress: each base model's engine is its deployment's handle."""

    remote = True

    def __init__(self, handles: Mapping[str, Any], replicas: Mapping[str, int]) -> None:
        """``handles``: model name → ``DeploymentHandle``; ``replicas``: the most replicas of
        each (what the ingress lets run at once is that many engines' worth)."""
        self._handles = handles
        self._replicas = replicas

    def text(self, spec: ModelSpec, options: VllmEngineOptions) -> TextLoader:
        return functools.partial(
            RayTextEngine.connect,
            self._handles[spec.name],
            tool_call_parser=options.tool_call_parser,
        )

    def image(self, spec: ModelSpec, options: DiffusersEngineOptions) -> ImageLoader:
        return functools.partial(RayImageEngine.connect, self._handles[spec.name])

    def replicas(self, spec: ModelSpec) -> int:
        return self._replicas[spec.name]


@serve.ingress()
class Ingress:
    """One replica of the HTTP app. With ``RAY_METRICS_PORT`` it also serves its own
    ``/metrics`` on that port plus its replica rank, for Prometheus to scrape each replica
    (through Ray's proxy, ``/metrics`` answers from whichever replica the request reached)."""

    def __init__(
        self, settings: Settings, handles: dict[str, Any], replicas: dict[str, int]
    ) -> None:
        configure_logging(level=settings.log_level, log_format=settings.log_format)
        self._app = create_app(settings, engines=RayEngines(handles, replicas))
        if settings.ray_metrics_port is not None:
            from prometheus_client import start_http_server

            rank = serve.get_replica_context().rank.rank
            port = settings.ray_metrics_port + rank
            registry = self._app.state.observability.metrics.registry
            start_http_server(port, registry=registry)
            logger.info("Ingress replica %d serves its metrics on port %d", rank, port)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return _without_echoed_request_id(self._app)


_REQUEST_ID = REQUEST_ID_HEADER.lower().encode("latin-1")


def _without_echoed_request_id(app: ASGIApp) -> ASGIApp:
    """``app`` without its ``X-Request-ID`` response header when it repeats the request's:
    Ray Serve's proxy gives every request an id and adds it to the response itself. (An id
    the app replaced, not being sane, is still sent: the response then has both.)"""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(_REQUEST_ID)

        async def send_once(message: Message) -> None:
            if message["type"] == "http.response.start" and incoming is not None:
                message["headers"] = [
                    (key, value)
                    for key, value in message["headers"]
                    if key.lower() != _REQUEST_ID or value != incoming
                ]
            await send(message)

        await app(scope, receive, send_once)

    return wrapped
