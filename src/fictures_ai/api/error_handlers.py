"""The app's exception handlers: each error answered in the shape of the surface its path
belongs to (``/v1/...`` and vLLM's tokenizer routes: OpenAI's; everything else: Fictures').

What an error says and its status come from ``api.errors.error_reply``; this module only picks
the surface.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fictures_ai.api.disconnect import CLIENT_CLOSED_REQUEST, ClientDisconnectedError
from fictures_ai.api.errors import (
    ErrorReply,
    error_reply,
    is_openai_path,
    log_error,
    unserved_route_message,
)
from fictures_ai.api.fictures.errors import fictures_error, fictures_validation_error
from fictures_ai.api.openai.errors import error_body, openai_error, openai_validation_error
from fictures_ai.errors import FicturesError

logger = logging.getLogger(__name__)


FASTAPI_UNPARSABLE_BODY = "There was an error parsing the body"
UNPARSABLE_BODY = (
    "The body could not be parsed as JSON (not UTF-8, or nested too deeply); send one JSON "
    "object, UTF-8 encoded, with Content-Type: application/json."
)


def reply_for_path(path: str, reply: ErrorReply) -> JSONResponse:
    """``reply`` as a response in the shape of the surface ``path`` belongs to."""
    return openai_error(reply) if is_openai_path(path) else fictures_error(reply)


class InternalErrorMiddleware:
    """A JSON 500 in the surface's shape for an exception no handler maps, answered in place.

    Starlette's outermost error middleware would answer plain text and re-raise, after which
    Uvicorn closes the connection: the client's next request on it is reset. Here the
    exception is logged and answered, and the connection stays usable. An exception after the
    response started is re-raised (the response cannot be finished honestly).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:
                raise
            path: str = scope["path"]
            logger.error("%s %s failed", scope["method"], path, exc_info=exc)
            response = reply_for_path(path, error_reply(exc))
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn our exceptions and validation errors into responses
    (the app adds ``InternalErrorMiddleware`` for every other exception)."""

    @app.exception_handler(FicturesError)
    async def _handle_fictures_error(request: Request, exc: FicturesError) -> JSONResponse:
        reply = error_reply(exc)
        log_error(request, exc, reply.status)
        return reply_for_path(request.url.path, reply)

    @app.exception_handler(ClientDisconnectedError)
    async def _handle_client_left(request: Request, exc: ClientDisconnectedError) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def _handle_validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        if is_openai_path(request.url.path):
            return openai_validation_error(exc)
        return fictures_validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _handle_http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        # Framework errors (unparsable body, unknown route, wrong method) in the surface's shape.
        if exc.status_code == 404:
            mode = request.app.state.services.settings.generation_mode
            message = unserved_route_message(request.url.path, mode)
            if message is not None:
                exc = StarletteHTTPException(404, message)
        elif exc.status_code == 405:
            # Starlette names only the first route of the path in Allow; a path several
            # routers serve (GET /api/v1/models lists, POST registers) has more methods.
            exc = StarletteHTTPException(
                405, exc.detail, headers={"Allow": ", ".join(_allowed_methods(request))}
            )
        elif exc.status_code == 400 and exc.detail == FASTAPI_UNPARSABLE_BODY:
            # FastAPI's answer when decoding the body fails other than as bad JSON (bytes that
            # are not UTF-8, nesting past the decoder's limit): a malformed body, which the
            # Fictures surface answers 422 in its validation-error shape.
            if not is_openai_path(request.url.path):
                error = {"type": "json_invalid", "loc": ["body"], "msg": UNPARSABLE_BODY}
                return JSONResponse({"detail": [error]}, status_code=422)
            exc = StarletteHTTPException(400, UNPARSABLE_BODY)
        if is_openai_path(request.url.path):
            return JSONResponse(
                error_body(str(exc.detail), exc.status_code),
                status_code=exc.status_code,
                headers=exc.headers,
            )
        return await http_exception_handler(request, exc)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app serves at the request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        route_methods = getattr(route, "methods", None)
        if match is not Match.NONE and route_methods:
            methods.update(route_methods)
    return sorted(methods)
