"""The response cache at the HTTP edge: a request's ``Cache-Control`` in, ``X-Fictures-Cache``
out (``services.response_cache`` keeps the answers; docs/caching.md).

A client steers the cache with the standard request directives (RFC 9111 section 5.2.1):
``no-cache`` (answer from the engine, still store the answer), ``no-store`` (neither read
nor store) and ``max-age=N`` (an answer stored N seconds ago or more is not used: the
engine answers and the new answer replaces it; ``max-age=0`` reads nothing). Directives
are case-insensitive, arguments may be quoted; unknown or malformed ones are ignored,
never an error; a repeated ``max-age`` (in one header or several) counts its smallest value.
The answer says what happened in ``X-Fictures-Cache``: ``hit``, ``miss``,
``bypass`` or ``uncacheable`` (no header when the cache is off); a hit also carries
``Age``, the seconds since its answer was stored (RFC 9111 section 5.1).
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.requests import Request

from fictures_ai.api.auth import Client
from fictures_ai.observability.context import current_request
from fictures_ai.services.response_cache import CacheOutcome, CacheTicket, access_fingerprint

CACHE_HEADER = "X-Fictures-Cache"


def cache_directives(value: str | None) -> dict[str, list[str | None]]:
    """The directives of a ``Cache-Control`` value (several headers joined with commas):
    lower-cased name to the argument of each occurrence, in order (unquoted when in double
    quotes; None without ``=``)."""
    directives: dict[str, list[str | None]] = {}
    for part in (value or "").split(","):
        name, equals, argument = part.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        argument = argument.strip()
        if len(argument) >= 2 and argument[0] == argument[-1] == '"':
            argument = argument[1:-1]
        directives.setdefault(name, []).append(argument if equals else None)
    return directives


def max_age_s(directives: dict[str, list[str | None]]) -> int | None:
    """The request's ``max-age`` in seconds: a non-negative integer (RFC 9111 section 1.2.2);
    repeated, the smallest (the strictest); None when absent or every value is malformed
    (then ignored, like any malformed directive)."""
    ages = [
        int(argument)
        for argument in directives.get("max-age", ())
        if argument is not None and argument.isascii() and argument.isdigit()
    ]
    return min(ages) if ages else None


def cache_ticket(
    request: Request | None, *, models: Iterable[str] | None, deterministic: bool
) -> CacheTicket:
    """The ticket of a request whose caller may use ``models`` (None: any), with what its
    ``Cache-Control`` allows (``request`` None: a job's request, which reads and stores)."""
    directives = cache_directives(
        ", ".join(request.headers.getlist("cache-control")) if request is not None else None
    )
    no_store = "no-store" in directives
    return CacheTicket(
        access=access_fingerprint(models),
        deterministic=deterministic,
        read=not no_store and "no-cache" not in directives,
        write=not no_store,
        max_age_s=max_age_s(directives),
    )


def caller_ticket(request: Request, caller: Client, *, deterministic: bool) -> CacheTicket:
    """``cache_ticket`` for a route's caller (its key's model allow-list)."""
    models = caller.key.models if caller.key is not None else None
    return cache_ticket(request, models=models, deterministic=deterministic)


def report_cache(ticket: CacheTicket | None) -> None:
    """Put the ticket's outcome on the response (``X-Fictures-Cache``, and ``Age`` on a hit)
    and the access line (``cache``); nothing outside a request (a job's) or when the cache
    took no part."""
    context = current_request()
    outcome = ticket.outcome if ticket is not None else None
    if context is None or ticket is None or outcome is None:
        return
    context.response_headers[CACHE_HEADER] = outcome.value
    if outcome is CacheOutcome.HIT:
        context.response_headers["Age"] = str(int(ticket.age_s))
    context.fields["cache"] = outcome.value
