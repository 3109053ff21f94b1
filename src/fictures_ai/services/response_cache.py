"""The response cache: whole answers of deterministic requests, by an exact-match key.

Each model's service keeps one ``ResponseCache`` (``RESPONSE_CACHE_MAX_BYTES``, 0: off):
least recently used entries go first once the bytes held pass the bound. A text entry is a
finished engine stream folded into one chunk (so a plain and a streamed request of the same
engine request share it, and each surface encodes it as it encodes a live one); an image
entry is the rendered PNG.

The key is a SHA-256 digest of a canonical JSON of everything that can change the output:
the model's name, the prompt (text, messages, token ids, format, tools), every sampling
field (structured-output spec, stop, penalties, logit bias, seed, logprobs, LoRA adapter
with its registration id and path, ...; only the scheduling priority is left out) and the
caller's model access (``access_fingerprint``), so keys whose access differs never share
an entry. What was loaded is covered by emptying the cache whenever the model's engine
changes (load, reload, restart, unload): an answer of the previous engine is never served,
nor stored once the engine changed under it.

A request takes part only when it is deterministic, which the API layer decides from what
the client sent (``CacheTicket.deterministic``); its ``Cache-Control`` may skip reading
(``no-cache``), reading and storing (``no-store``) or answers older than it accepts
(``max-age``). The ticket collects what happened to
each of the request's lookups (a request may run several generations: ``n``, several
prompts or images); the API layer reports it.

It lives on the event loop only: no locks.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fictures_ai.observability.metrics import ResponseCacheMetrics

V = TypeVar("V")

ENTRY_OVERHEAD_BYTES = 256
"""What an entry costs beyond its payload (key, bookkeeping), counted against the bound."""


class CacheOutcome(enum.StrEnum):
    """What the cache did for a request (the API reports it as ``X-Fictures-Cache``)."""

    HIT = "hit"
    """Answered from the cache, every part of it."""
    MISS = "miss"
    """Looked up and (at least partly) not found; the answer is stored once it finished."""
    BYPASS = "bypass"
    """Not read, as the client's ``Cache-Control`` asked (``no-cache``: still stored)."""
    UNCACHEABLE = "uncacheable"
    """Not deterministic (no explicit ``temperature: 0`` or ``seed``; an image without seed)."""


@dataclass(slots=True, kw_only=True)
class CacheTicket:
    """What one request may do with the response cache, and what it did.

    ``access``: the fingerprint of the caller's model access (``access_fingerprint``);
    ``deterministic``: the client asked for a reproducible answer; ``read``, ``write`` and
    ``max_age_s`` (the oldest answer, in seconds since it was stored, that it accepts; None:
    any): what its ``Cache-Control`` allows. The services add one outcome per lookup;
    ``age_s`` is the age of the oldest answer a hit used.
    """

    access: str
    deterministic: bool
    read: bool = True
    write: bool = True
    max_age_s: float | None = None
    outcomes: list[CacheOutcome] = field(default_factory=list)
    age_s: float = 0.0

    @property
    def outcome(self) -> CacheOutcome | None:
        """The request's outcome: ``hit`` when every lookup hit, ``miss`` when one missed,
        else what the first said; None when the cache took no part (off)."""
        if not self.outcomes:
            return None
        if CacheOutcome.MISS in self.outcomes:
            return CacheOutcome.MISS
        if all(outcome is CacheOutcome.HIT for outcome in self.outcomes):
            return CacheOutcome.HIT
        return self.outcomes[0]


def access_fingerprint(models: Iterable[str] | None) -> str:
    """A short digest of a model allow-list (``all`` for a caller without one)."""
    if models is None:
        return "all"
    names = json.dumps(sorted(set(models)), separators=(",", ":"))
    return hashlib.sha256(names.encode()).hexdigest()[:32]


def cache_key(request: Mapping[str, Any]) -> str:
    """The SHA-256 hex digest of ``request`` as canonical JSON (sorted keys, compact, enums
    as their values, tuples as lists)."""
    text = json.dumps(
        request, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V
    size: int
    tag: int | None
    stored_at: float
    """``time.monotonic()`` when stored."""


class ResponseCache(Generic[V]):
    """One model's cache: at most ``max_bytes`` (as ``size_of`` counts an entry, plus
    ``ENTRY_OVERHEAD_BYTES``), least recently used entries evicted first; 0 disables it."""

    def __init__(self, *, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self._max_bytes = max_bytes
        self._size_of = size_of
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._bytes = 0
        self._metrics: ResponseCacheMetrics | None = None

    def instrument(self, metrics: ResponseCacheMetrics) -> None:
        """Count hits, misses, evictions and bytes held in ``metrics`` from now on."""
        self._metrics = metrics
        metrics.bytes.set(self._bytes)

    @property
    def enabled(self) -> bool:
        """Whether the cache keeps anything (``max_bytes`` > 0)."""
        return self._max_bytes > 0

    @property
    def bytes_used(self) -> int:
        """The bytes the entries count for now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, ticket: CacheTicket | None, request: Callable[[], Mapping[str, Any]]
    ) -> tuple[V | None, str | None]:
        """``(answer, None)`` on a hit; ``(None, key)`` when the answer, once complete, is
        to be stored under ``key``; ``(None, None)`` when the cache takes no part.

        ``request()`` describes the engine request (the key is built only when needed); the
        ticket's access is added to it. An entry older than the ticket's ``max_age_s`` is a
        miss (the new answer replaces it; ``max_age_s`` 0: every entry). The outcome is added
        to the ticket.
        """
        if ticket is None or not self.enabled:
            return None, None
        if not ticket.deterministic:
            ticket.outcomes.append(CacheOutcome.UNCACHEABLE)
            return None, None
        if not ticket.read:
            ticket.outcomes.append(CacheOutcome.BYPASS)
            if not ticket.write:
                return None, None
            return None, cache_key({**request(), "access": ticket.access})
        key = cache_key({**request(), "access": ticket.access})
        entry = self._entries.get(key)
        metrics = self._metrics
        age_s = time.monotonic() - entry.stored_at if entry is not None else 0.0
        if entry is None or (ticket.max_age_s is not None and age_s >= ticket.max_age_s):
            ticket.outcomes.append(CacheOutcome.MISS)
            if metrics is not None:
                metrics.misses.inc()
            return None, key if ticket.write else None
        self._entries.move_to_end(key)
        ticket.outcomes.append(CacheOutcome.HIT)
        ticket.age_s = max(ticket.age_s, age_s)
        if metrics is not None:
            metrics.hits.inc()
        return entry.value, None

    def store(self, key: str, value: V, *, tag: int | None = None) -> None:
        """Keep ``value`` under ``key`` (``tag``: what ``drop`` removes it by, e.g. a LoRA
        adapter's id), evicting the least recently used entries beyond the bound. An entry
        larger than the whole bound is not kept."""
        size = self._size_of(value) + ENTRY_OVERHEAD_BYTES
        if size > self._max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[key] = _Entry(value, size, tag, time.monotonic())
        self._bytes += size
        evicted = 0
        while self._bytes > self._max_bytes:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.size
            evicted += 1
        if self._metrics is not None:
            if evicted:
                self._metrics.evictions.inc(evicted)
            self._metrics.bytes.set(self._bytes)

    def drop(self, tag: int) -> None:
        """Remove the entries stored with ``tag`` (an adapter removed or re-registered)."""
        for key in [key for key, entry in self._entries.items() if entry.tag == tag]:
            self._bytes -= self._entries.pop(key).size
        if self._metrics is not None:
            self._metrics.bytes.set(self._bytes)

    def clear(self) -> None:
        """Remove every entry (the model's engine changed)."""
        self._entries.clear()
        self._bytes = 0
        if self._metrics is not None:
            self._metrics.bytes.set(0)
