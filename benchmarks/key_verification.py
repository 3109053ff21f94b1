"""What one uncached check of the server's own API keys costs: argon2id rows against digests.

Earlier versions stored each key as argon2id (OWASP's minimum: 19 MiB, 2 passes, 1 lane); the
store now keeps an HMAC-SHA-256 keyed with ``API_KEY_PEPPER`` (SHA-256 without one) and
rewrites an argon2id row when its key is first verified. This measures both side by side in
one run, on a fresh SQLite file (the default database), one check at a time:

- ``hash only``: the hash check alone, no database;
- ``right key, uncached``: what a request whose key is not cached costs (``verify`` after
  clearing the cache: the row read by prefix, then the hash check). The argon2id row is checked
  with ``check()``, which reads it the same way but never rewrites it, as earlier versions did;
- ``wrong secret (a guess)``: a key with a real (public) prefix and a new wrong secret each
  time, so the rejection cache never answers: what anyone who knows a prefix can make the
  server spend per guess;
- ``first verification (rewrites the row)``: an argon2id row's first accepted check, which also
  writes the row in the new scheme (reset before each repetition).

``cpu`` is the process's CPU time (every thread) per check, ``wall`` the median time one check
takes. Prints a table and writes ``benchmarks/results/key_verification.json``. The cached path
(microseconds) is measured by ``tests/unit/test_api_keys.py::test_verify_cost``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from argon2 import PasswordHasher, Type

from fictures_ai.database import normalise_url
from fictures_ai.services.keys.hashing import KeyHasher
from fictures_ai.services.keys.local_store import TABLE_NAME, ApiKeyService

RESULTS = Path(__file__).parent / "results" / "key_verification.json"
PEPPER = "benchmark-pepper-0123456789abcdef0123456789abcdef"
# The parameters earlier versions hashed with (services/api_keys.py before issue 11).
LEGACY = PasswordHasher(
    time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16, type=Type.ID
)


def wrong_secret(key: str, number: int) -> str:
    """``key``'s prefix (``fai_xxxxxxxx_``) with a well-formed secret of 43 digits that differs
    from the real one and from every other."""
    return key[:13] + f"{number:043d}"


def time_calls(call: Callable[[int], None], repetitions: int) -> dict[str, float]:
    """Median wall time and mean process CPU time per call, in milliseconds."""
    walls = []
    cpu_started = time.process_time()
    for number in range(repetitions):
        started = time.perf_counter()
        call(number)
        walls.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu_started) / repetitions
    return {"wall_ms": statistics.median(walls) * 1e3, "cpu_ms": cpu * 1e3, "n": repetitions}


async def time_checks(
    check: Callable[[int], Awaitable[Any]],
    repetitions: int,
    before: Callable[[], None] | None = None,
) -> dict[str, float]:
    """As :func:`time_calls` for an async check; ``before`` runs before each one, untimed
    (its CPU time is taken out)."""
    walls = []
    cpu = 0.0
    for number in range(repetitions):
        if before is not None:
            before()
        cpu_started = time.process_time()
        started = time.perf_counter()
        await check(number)
        walls.append(time.perf_counter() - started)
        cpu += time.process_time() - cpu_started
    return {
        "wall_ms": statistics.median(walls) * 1e3,
        "cpu_ms": cpu / repetitions * 1e3,
        "n": repetitions,
    }


def set_hash(engine: sa.Engine, key_id: object, stored: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            sa.text(f"UPDATE {TABLE_NAME} SET hash = :stored WHERE id = :id"),
            {"stored": stored, "id": key_id},
        )


def measure_hashes(slow: int, fast: int) -> dict[str, dict[str, float]]:
    key = "fai_abcdefgh_" + "k" * 43
    legacy = LEGACY.hash(key)
    plain, peppered = KeyHasher(), KeyHasher(PEPPER)
    sha256, hmac_sha256 = plain.hash(key), peppered.hash(key)
    return {
        "argon2id": time_calls(lambda _: plain.matches(legacy, key), slow),
        "sha256": time_calls(lambda _: plain.matches(sha256, key), fast),
        "hmac-sha256": time_calls(lambda _: peppered.matches(hmac_sha256, key), fast),
    }


async def measure_store(folder: Path, slow: int, fast: int) -> dict[str, dict[str, float]]:
    url = f"sqlite:///{folder}/keys.db"
    engine = sa.create_engine(normalise_url(url))
    service = ApiKeyService(database_url=url, pepper=PEPPER, cache_ttl_s=0.0, negative_ttl_s=0.0)
    try:
        legacy_info, legacy_key = service.create("argon2id", "stories:read")
        legacy = LEGACY.hash(legacy_key)
        set_hash(engine, legacy_info.id, legacy)
        _, key = service.create("hmac-sha256", "stories:read")
        assert (await service.check(legacy_key)).accepted
        assert await service.verify(key) is not None

        async def verify_uncached(presented: str) -> None:
            service.clear_cache()
            assert await service.verify(presented) is not None

        async def refuse(presented: str) -> None:
            assert await service.verify(presented) is None

        async def check_only(presented: str) -> None:
            assert (await service.check(presented)).accepted

        results = {
            "argon2id row (before): right key, uncached": await time_checks(
                lambda _: check_only(legacy_key), slow
            ),
            "argon2id row: wrong secret (a guess)": await time_checks(
                lambda number: refuse(wrong_secret(legacy_key, number)), slow
            ),
            "argon2id row: first verification (rewrites the row)": await time_checks(
                lambda _: verify_uncached(legacy_key),
                slow,
                before=lambda: set_hash(engine, legacy_info.id, legacy),
            ),
            "hmac-sha256 row (after): right key, uncached": await time_checks(
                lambda _: verify_uncached(key), fast
            ),
            "hmac-sha256 row: wrong secret (a guess)": await time_checks(
                lambda number: refuse(wrong_secret(key, number)), fast
            ),
        }
    finally:
        service.close()
        engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", type=int, default=40, help="Repetitions of argon2id checks.")
    parser.add_argument("--fast", type=int, default=400, help="Repetitions of digest checks.")
    args = parser.parse_args()

    hashes = measure_hashes(args.slow, args.fast * 25)
    with tempfile.TemporaryDirectory() as folder:
        store = asyncio.run(measure_store(Path(folder), args.slow, args.fast))

    print(f"{'hash only':<55} {'wall ms':>9} {'cpu ms':>9} {'n':>6}")
    for name, figures in hashes.items():
        print(f"  {name:<53} {figures['wall_ms']:9.4f} {figures['cpu_ms']:9.4f} {figures['n']:6}")
    print(f"{'uncached verification, SQLite (row read + hash)':<55}")
    for name, figures in store.items():
        print(f"  {name:<53} {figures['wall_ms']:9.3f} {figures['cpu_ms']:9.3f} {figures['n']:6}")
    before = store["argon2id row: wrong secret (a guess)"]["cpu_ms"]
    after = store["hmac-sha256 row: wrong secret (a guess)"]["cpu_ms"]
    print(f"CPU per guess at a known prefix: {before:.2f} ms before, {after:.3f} ms after "
          f"({before / after:.0f}x less)")  # fmt: skip

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "hash_only": hashes,
                "uncached_sqlite": store,
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()
