"""``fictures-ai models``: prepare the bundled text model here, or list, load and unload the
models of a running server (and register or remove its text LoRA adapters) over HTTP."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import httpx
from pydantic import ValidationError

from fictures_ai.cli.generate import (
    API_KEY_ENV,
    API_KEY_HELP,
    DEFAULT_URL,
    client_for,
    report_http_error,
)
from fictures_ai.config import Settings, describe_settings_error
from fictures_ai.observability.logs import configure_logging

ADMIN_KEY_HELP = f"An admin:all API key, sent as 'Authorization: Bearer' [env {API_KEY_ENV}]."
LOAD_TIMEOUT_S = 1800.0
"""How long ``models load`` waits for a model to load (a large model on a slow disk)."""


def add_models_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``models prepare|list|load|unload|add|remove`` to a parser's subcommands
    (``dest="models_command"``)."""
    models = subparsers.add_parser("models", help="Prepare models, or manage a server's models.")
    commands = models.add_subparsers(
        dest="models_command", required=True, metavar="{prepare,list,load,unload,add,remove}"
    )
    commands.add_parser(
        "prepare", help="Convert the bundled text model now (otherwise done on first use)."
    )
    listing = commands.add_parser("list", help="List a running server's models and their state.")
    _add_server_flags(listing, API_KEY_HELP)
    for name, text in (
        ("load", "Load a model on a running server now (answers once it is loaded)."),
        ("unload", "Unload a model on a running server and free its memory."),
        ("remove", "Remove a text LoRA adapter registered at run time."),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("name", help="The model's name or alias.")
        _add_server_flags(command, ADMIN_KEY_HELP)
    add = commands.add_parser("add", help="Serve a text LoRA adapter as a model (run time).")
    add.add_argument("name", help="The adapter's model name.")
    add.add_argument("--base", required=True, help="The text model it adapts.")
    add.add_argument(
        "--lora", required=True, help="Its PEFT folder (absolute, on the server) or bundled:..."
    )
    _add_server_flags(add, ADMIN_KEY_HELP)


def _add_server_flags(parser: argparse.ArgumentParser, key_help: str) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help="Server base URL.")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=key_help)


def run_models_command(args: argparse.Namespace) -> int:
    """Run the ``models`` subcommand ``args`` names; returns the exit status."""
    if args.models_command == "prepare":
        return prepare_models()
    timeout = httpx.Timeout(LOAD_TIMEOUT_S, connect=5.0)
    try:
        with client_for(args, timeout) as client:
            if args.models_command == "list":
                response = client.get("/v1/models")
            elif args.models_command == "add":
                body = {"name": args.name, "base": args.base, "lora": args.lora}
                response = client.post("/api/v1/models", json=body)
            elif args.models_command == "remove":
                response = client.delete(f"/api/v1/models/{args.name}")
            else:
                response = client.post(f"/api/v1/models/{args.name}/{args.models_command}")
    except httpx.HTTPError as exc:
        print(f"Could not reach the server at {args.url}: {exc}", file=sys.stderr)
        return 1
    if response.is_error:
        return report_http_error(response)
    answer = response.json()
    if args.models_command == "list":
        print(format_models(answer["data"]))
        print("(* the default of its kind)")
    elif args.models_command == "remove":
        print(f"{args.name}: removed")
    else:
        print(format_models([answer]))
    return 0


def format_models(models: list[dict[str, Any]]) -> str:
    """A table of models as ``/v1/models`` or the admin routes describe them."""
    rows = [("NAME", "KIND", "STATE", "MEMORY", "LAST USED", "PARENT / SOURCE")]
    now = time.time()
    for model in models:
        memory = model.get("memory_bytes")
        used = model.get("last_used_at")
        state = model.get("state", "")
        if model.get("reason"):
            state += f" ({model['reason']})"
        rows.append(
            (
                (model.get("id") or model.get("name", "")) + (" *" if model.get("default") else ""),
                model.get("kind") or "",
                state,
                f"{memory / 2**30:.2f} GiB" if memory is not None else "-",
                f"{now - used:.0f} s ago" if used is not None else "never",
                model.get("parent") or model.get("root") or model.get("source") or "",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]
    return "\n".join(lines)


def prepare_models() -> int:
    """Convert the bundled text model into the cache and print its folder."""
    from fictures_ai.engines.bundled_model import prepare_bundled_model

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"Invalid settings:\n{describe_settings_error(exc)}", file=sys.stderr)
        return 2
    # People read this command's output: plain text, not the server's JSON lines.
    configure_logging(level=settings.log_level, log_format="text")
    print(prepare_bundled_model(settings.model_cache_dir))
    return 0
