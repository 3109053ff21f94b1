"""``fictures-ai keys``: create, list and revoke the API keys of the server.

``keys create`` prints what it made and then the key alone on the last line of stdout, so that
scripts can take it with ``tail -n 1``; the key is never shown again. Every subcommand works on
``--database-url``, else ``DATABASE_URL``, else the SQLite file in the user data dir.

Exit codes: 0 done, 1 the database failed, 2 bad input (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError

from fictures_ai.errors import InvalidRequestError
from fictures_ai.services.api_keys import (
    VALID_SCOPES,
    ApiKeyInfo,
    ApiKeyService,
    default_database_url,
)

DATABASE_URL_ENV = "DATABASE_URL"


def add_key_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys create|list|revoke`` to a parser's subcommands (``dest="keys_command"``)."""
    keys = subparsers.add_parser(
        "keys", help="Manage API keys.", description="Create, list and revoke API keys."
    )
    commands = keys.add_subparsers(dest="keys_command", required=True)

    create = commands.add_parser(
        "create",
        help="Create a key and print it (shown once).",
        description="Create an API key. The key is printed alone on the last line, once.",
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

    list_keys = commands.add_parser("list", help="List the keys (never their secrets).")

    revoke = commands.add_parser("revoke", help="Revoke a key (within seconds everywhere).")
    revoke.add_argument(
        "key", metavar="KEY_ID_OR_NAME", help="The key's id, prefix (fai_xxxxxxxx) or name."
    )

    for command in (create, list_keys, revoke):
        command.add_argument(
            "--database-url",
            default=None,
            help=f"Key database [env {DATABASE_URL_ENV}; default {default_database_url()}].",
        )


def database_url_from(args: argparse.Namespace) -> str:
    """The flag, else ``DATABASE_URL`` (environment or ``.env``, as the server reads it), else
    :func:`default_database_url`."""
    from fictures_ai.config import Settings

    url: str | None = args.database_url or Settings().database_url
    return url or default_database_url()


def run_key_command(args: argparse.Namespace) -> int:
    """Run the ``keys`` subcommand in ``args``; return the exit code."""
    service = ApiKeyService(database_url=database_url_from(args), cache_ttl_s=0.0)
    try:
        if args.keys_command == "create":
            info, plaintext = service.create(args.name, args.scopes, args.models)
            _print_created(info, plaintext)
        elif args.keys_command == "list":
            _print_table(service.list())
        elif args.keys_command == "revoke":
            info = service.revoke(args.key)
            print(f"Revoked API key '{info.name}' ({info.display_prefix}, id {info.id}).")
        else:  # argparse only lets the known commands through
            raise AssertionError(args.keys_command)
    except (ValueError, InvalidRequestError) as exc:
        message = exc.message if isinstance(exc, InvalidRequestError) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(
            f"error: the key database at {service.database_url} failed: "
            f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}",
            file=sys.stderr,
        )
        return 1
    finally:
        service.close()
    return 0


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
