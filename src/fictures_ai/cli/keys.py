"""``fictures-ai keys``: create, list and revoke the server's own API keys; check any key.

``keys create`` prints what it made and then the key alone on the last line of stdout, so that
scripts can take it with ``tail -n 1``; the key is never shown again. Every subcommand works on
``--database-url``, else ``DATABASE_URL``, else the SQLite file in the user data dir, and hashes
with ``API_KEY_PEPPER``, as the server does. ``keys revoke`` of a key already revoked says so and
changes nothing (exit 0: the key is revoked).

``keys check KEY`` asks the stores the server would ask (the web app's too, with
``API_KEY_STORE=fictures`` or ``--fictures-database-url``) and says which one accepts the key,
with what scopes, or why it is refused. It changes nothing, not even when the key was last used.

Exit codes: 0 done (the key is accepted), 1 a database failed, 2 bad input (message on
stderr), 3 the key is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from fictures_ai.config import Settings, describe_settings_error
from fictures_ai.database import default_database_url
from fictures_ai.errors import InvalidRequestError, ServiceUnavailableError
from fictures_ai.redaction import mask_credentials
from fictures_ai.services.keys.base import KeyStoreSchemaError
from fictures_ai.services.keys.info import ApiKeyInfo
from fictures_ai.services.keys.local_store import ApiKeyService
from fictures_ai.services.keys.scopes import VALID_SCOPES
from fictures_ai.services.keys.stores import KeyStores, open_key_stores

DATABASE_URL_ENV = "DATABASE_URL"
FICTURES_DATABASE_URL_ENV = "FICTURES_DATABASE_URL"
EXIT_REFUSED = 3

SERVER_SETTINGS_NOTE = (
    "Like the server, these commands read DATABASE_URL and API_KEY_PEPPER (environment or "
    ".env); give them the server's values: with another database they see other keys, and with "
    "another pepper, or none, the keys they make do not verify on the server."
)
EXIT_CODES = (
    "Exit status: 0 done, 1 a key database failed, 2 bad input, 3 the key is refused (check)."
)


def add_key_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys create|list|revoke|check`` to a parser's subcommands
    (``dest="keys_command"``)."""
    keys = subparsers.add_parser(
        "keys",
        help="Manage API keys.",
        description=(
            "Create, list and revoke the server's own API keys, and check any key as the "
            f"server would. {SERVER_SETTINGS_NOTE}"
        ),
        epilog=EXIT_CODES,
    )
    # The metavar names the choices in "arguments are required" (the dest would show).
    commands = keys.add_subparsers(
        dest="keys_command", required=True, metavar="{create,list,revoke,check}"
    )

    create = commands.add_parser(
        "create",
        help="Create a key and print it (shown once).",
        description=(
            "Create an API key. The key is printed alone on the last line, once. "
            f"{SERVER_SETTINGS_NOTE}"
        ),
        epilog=EXIT_CODES,
    )
    create.add_argument("--name", required=True, help="A unique name among active keys.")
    create.add_argument(
        "--scopes",
        required=True,
        help=f"Comma-separated scopes: {', '.join(VALID_SCOPES)} (each includes the next).",
    )
    create.add_argument(
        "--models",
        default=None,
        help="Comma-separated models the key may use (default: every model).",
    )

    list_keys = commands.add_parser(
        "list",
        help="List the keys (never their secrets).",
        description=f"List the server's own API keys, revoked ones too. {SERVER_SETTINGS_NOTE}",
        epilog=EXIT_CODES,
    )

    revoke = commands.add_parser(
        "revoke",
        help="Revoke a key (within seconds everywhere).",
        description=(
            "Revoke an API key: it stops working at once here and within API_KEY_CACHE_S "
            "seconds on running servers. Revoking a revoked key says so and changes nothing. "
            f"{SERVER_SETTINGS_NOTE}"
        ),
        epilog=EXIT_CODES,
    )
    revoke.add_argument(
        "key", metavar="KEY_ID_OR_NAME", help="The key's id, prefix (fai_xxxxxxxx) or name."
    )

    check = commands.add_parser(
        "check",
        help="Say which store accepts a key, with what scopes (changes nothing).",
        description=(
            "Check a key as the server would: say which store accepts it (local: the server's "
            "own keys; fictures: the web app's) and with what scopes, or why it is refused. "
            f"{SERVER_SETTINGS_NOTE}"
        ),
        epilog=EXIT_CODES,
    )
    check.add_argument("key", metavar="KEY", help="The whole key (fai_... or fic_...).")
    check.add_argument(
        "--fictures-database-url",
        default=None,
        help=(
            f"The web app's database [env {FICTURES_DATABASE_URL_ENV}, used when "
            "API_KEY_STORE=fictures]."
        ),
    )

    for command in (create, list_keys, revoke, check):
        command.add_argument(
            "--database-url",
            default=None,
            help=f"Key database [env {DATABASE_URL_ENV}; default {default_database_url()}].",
        )


def run_key_command(args: argparse.Namespace) -> int:
    """Run the ``keys`` subcommand in ``args``; return the exit code.

    The database is ``--database-url``, else ``DATABASE_URL`` (environment or ``.env``, as the
    server reads it), else :func:`default_database_url`.
    """
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: invalid settings:\n{describe_settings_error(exc)}", file=sys.stderr)
        return 2
    if args.keys_command == "check":
        return _check_key(args, settings)
    try:
        service = ApiKeyService(
            database_url=args.database_url or settings.database_url or default_database_url(),
            pepper=settings.api_key_pepper,
            beside_web_app_keys=settings.api_key_store == "fictures",
            cache_ttl_s=0.0,
        )
    except ArgumentError as exc:
        print(f"error: not a database URL: {exc}", file=sys.stderr)
        return 2
    try:
        if args.keys_command == "create":
            info, plaintext = service.create(args.name, args.scopes, args.models)
            _print_created(info, plaintext)
        elif args.keys_command == "list":
            _print_table(service.list())
        elif args.keys_command == "revoke":
            info, newly = service.revoke(args.key)
            if newly:
                print(f"Revoked API key '{info.name}' ({info.display_prefix}, id {info.id}).")
            else:
                print(
                    f"API key '{info.name}' ({info.display_prefix}, id {info.id}) was already "
                    f"revoked at {_moment(info.revoked_at)}; nothing changed."
                )
        else:  # argparse only lets the known commands through
            raise AssertionError(args.keys_command)
    except (ValueError, InvalidRequestError, KeyStoreSchemaError) as exc:
        message = exc.message if isinstance(exc, InvalidRequestError) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(
            f"error: the key database at {service.database_url} failed: "
            f"{type(exc).__name__}: {mask_credentials(str(exc.args[0] if exc.args else exc))}",
            file=sys.stderr,
        )
        return 1
    finally:
        service.close()
    return 0


def _check_key(args: argparse.Namespace, settings: Settings) -> int:
    fictures_url = args.fictures_database_url or (
        settings.fictures_database_url if settings.api_key_store == "fictures" else None
    )
    try:
        stores = open_key_stores(
            database_url=args.database_url or settings.database_url,
            fictures_database_url=fictures_url,
            pepper=settings.api_key_pepper,
            cache_ttl_s=0.0,
        )
    except ArgumentError as exc:
        print(f"error: not a database URL: {exc}", file=sys.stderr)
        return 2
    try:
        store, check = asyncio.run(stores.check(args.key.strip()))
    except ServiceUnavailableError:
        print(f"error: the key database of {_store_of(stores, args.key)} failed", file=sys.stderr)
        return 1
    finally:
        stores.close()
    if check.info is None:
        where = f"the {store.kind} store ({store.description})" if store else "every store"
        print(f"Refused by {where}: {check.reason}.")
        if store is None and args.key.strip().startswith("fic_"):
            print(
                "This looks like a key of the Fictures web app: set API_KEY_STORE=fictures and "
                "FICTURES_DATABASE_URL (or pass --fictures-database-url) to check it there."
            )
        return EXIT_REFUSED
    assert store is not None  # an accepted key has a store
    info = check.info
    print(f"Accepted by the {store.kind} store ({store.description})")
    owner = f", user {info.owner}" if info.owner else ""
    print(f"  key:     {info.display_prefix} (id {info.id}, name '{info.name}'{owner})")
    print(f"  scopes:  {', '.join(info.scopes) or '(none)'}")
    print(f"  models:  {', '.join(info.models) if info.models is not None else 'all'}")
    print(f"  expires: {_moment(info.expires_at) if info.expires_at else 'never'}")
    return 0


def _store_of(stores: KeyStores, key: str) -> str:
    """The description of the store that would hold ``key``, for error messages."""
    store = stores.store_for(key)
    return f"the {store.kind} store ({store.description})" if store else "the key stores"


def _print_created(info: ApiKeyInfo, plaintext: str) -> None:
    print(f"Created API key '{info.name}' (id {info.id})")
    print(f"  scopes: {', '.join(info.scopes)}")
    print(f"  models: {', '.join(info.models) if info.models is not None else 'all'}")
    print(f"  prefix: {info.display_prefix}")
    print("Store it now: it is shown only once.")
    print(plaintext)


def _print_table(keys: Sequence[ApiKeyInfo]) -> None:
    header = ("ID", "NAME", "PREFIX", "SCOPES", "MODELS", "CREATED", "REVOKED")
    rows = [
        (
            str(key.id),
            key.name,
            key.display_prefix,
            ",".join(key.scopes),
            ",".join(key.models) if key.models is not None else "*",
            _moment(key.created_at),
            _moment(key.revoked_at),
        )
        for key in keys
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    if not rows:
        print("(no keys yet: create one with 'fictures-ai keys create')")


def _moment(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment is not None else "-"
