"""``fictures-ai serve``, its flags generated from the settings."""

from __future__ import annotations

import argparse
import enum
import sys
import typing

from pydantic import AliasChoices, ValidationError

from fictures_ai.config import Settings, describe_settings_error
from fictures_ai.observability.logs import configure_logging
from fictures_ai.redaction import mask_credentials


def add_serve_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve``, with one flag per setting, to a parser's subcommands."""
    serve_command = subparsers.add_parser("serve", help="Run the HTTP server.")
    serve_command.add_argument(
        "--ray",
        action="store_true",
        help=(
            "Serve on Ray Serve: an ingress and one deployment per model, with replicas "
            "(docs/scaling.md; needs fictures-ai[cluster])."
        ),
    )
    add_settings_flags(serve_command)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; unset flags leave the environment's value in force."""
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        # argparse reads help as a %-format: "~10% slower" would print the action's dict.
        names = [name.upper()]
        if isinstance(info.validation_alias, AliasChoices):
            names = [str(choice).upper() for choice in info.validation_alias.choices]
        help_text = f"{info.description} [env {' or '.join(names)}]".replace("%", "%%")
        annotation = info.annotation
        if annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        choices: list[str] | None = None
        if typing.get_origin(annotation) is typing.Literal:
            choices = [str(arg) for arg in typing.get_args(annotation)]
        elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            choices = [str(member.value) for member in annotation]
        parser.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings of the environment and ``.env``, overridden by the flags given."""
    overrides = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def serve(args: argparse.Namespace) -> int:
    """Run the server with uvicorn on the settings (environment, .env and flags)."""
    # Imported here: the other commands need neither the web stack nor the engines.
    import uvicorn

    from fictures_ai.api.app import create_app
    from fictures_ai.services.models.spec import ModelsFileError

    try:
        settings = settings_from(args)
    except ValidationError as exc:
        print(f"Invalid settings:\n{describe_settings_error(exc)}", file=sys.stderr)
        return 2
    configure_logging(level=settings.log_level, log_format=settings.log_format)
    try:
        if getattr(args, "ray", False):
            return _serve_on_ray(settings)
        app = create_app(settings)
    except ModelsFileError as exc:
        print(f"Invalid models file: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"Invalid settings: {mask_credentials(str(exc))}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0


def _serve_on_ray(settings: Settings) -> int:
    """``serve --ray`` until stopped; raises its ``ModelsFileError`` and ``ValueError``."""
    try:
        from fictures_ai.cluster.run import DeployError, serve_on_ray
    except ImportError as exc:
        print(
            f"serve --ray needs Ray Serve ({exc.name} is missing): pip install "
            "'fictures-ai[cluster]' (make install brings it).",
            file=sys.stderr,
        )
        return 2
    try:
        serve_on_ray(settings)
    except DeployError as exc:
        print(f"Cannot serve on Ray: {mask_credentials(str(exc))}", file=sys.stderr)
        return 1
    return 0
