"""The response cache at the HTTP edge: a request's ``Cache-Control`` in, ``X-Fictures-Cache``
out (``services.response_cache`` keeps the answers; docs/caching.md).

A client skips the cache with the standard request directives: ``no-cache`` (answer from
the engine, still store the answer) and ``no-store`` (neither read nor store). Directives
are case-insensitive; unknown or malformed ones are ignored, never an error. The answer says
what happened in ``X-Fictures-Cache``: ``hit``, ``miss``, ``bypass`` or ``uncacheable``; no
header when the cache is off.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request

from fictures_ai.api.auth import Client
from fictures_ai.observability.context import current_request
from fictures_ai.services.response_cache import CacheTicket, access_fingerprint

CACHE_HEADER = "X-Fictures-Cache"


def cache_directives(value: str | None) -> frozenset[str]:
    """The directive names of a ``Cache-Control`` value, lower-cased (arguments dropped)."""
    if not value:
        return frozenset()
    names = (part.split("=", 1)[0].strip().lower() for part in value.split(","))
    return frozenset(name for name in names if name)


def cache_ticket(
    request: Request | None, *, models: Iterable[str] | None, deterministic: bool
) -> CacheTicket:
    """The ticket of a request whose caller may use ``models`` (None: any), with what its
    ``Cache-Control`` allows (``request`` None: a job's request, which reads and stores)."""
    directives = cache_directives(
        request.headers.get("cache-control") if request is not None else None
    )
    no_store = "no-store" in directives
    return CacheTicket(
        access=access_fingerprint(models),
        deterministic=deterministic,
        read=not no_store and "no-cache" not in directives,
        write=not no_store,
    )


def caller_ticket(request: Request, caller: Client, *, deterministic: bool) -> CacheTicket:
    """``cache_ticket`` for a route's caller (its key's model allow-list)."""
    models = caller.key.models if caller.key is not None else None
    return cache_ticket(request, models=models, deterministic=deterministic)


def report_cache(ticket: CacheTicket | None) -> None:
    """Put the ticket's outcome on the response (``X-Fictures-Cache``) and the access line
    (``cache``); nothing outside a request (a job's) or when the cache took no part."""
    context = current_request()
    outcome = ticket.outcome if ticket is not None else None
    if context is None or outcome is None:
        return
    context.response_headers[CACHE_HEADER] = outcome.value
    context.fields["cache"] = outcome.value
