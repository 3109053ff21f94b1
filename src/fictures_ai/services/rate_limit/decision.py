"""What a limiter answers: plain values, no HTTP (``api/auth.py`` turns them into headers)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Budget(enum.StrEnum):
    """One of the per-minute budgets a client has."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    IMAGES = "images"


@dataclass(frozen=True, slots=True)
class BudgetState:
    """Where one active budget of a client stands after a decision.

    ``remaining``: whole units left now. ``reset_s``: seconds until the usage counted so far has
    faded out entirely (the budget is full again), up to two minutes.
    """

    budget: Budget
    limit: int
    remaining: int
    reset_s: int


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    """The answer to ``RateLimiter.admit``.

    ``budgets`` lists the active (limited) budgets only, in the order requests, tokens, images;
    none when nothing is limited, or when the backend could not be asked and the request was let
    through unchecked (fail open). When refused, ``refused_by`` names the budget that holds the
    request back longest and ``retry_after_s`` (>= 1) says when the same request would be
    admitted.
    """

    allowed: bool
    budgets: tuple[BudgetState, ...] = ()
    refused_by: Budget | None = None
    retry_after_s: int | None = None


UNCHECKED = RateLimitDecision(allowed=True)
"""Admitted without counting: no budget is active, or the backend could not be asked."""
