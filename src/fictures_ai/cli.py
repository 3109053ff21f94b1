"""The ``fictures-ai`` command: serve, prepare models, and talk to a running server.

The flags of ``serve`` are generated from the ``Settings`` fields (``--api-port`` is
``API_PORT``), so the CLI and the settings cannot drift apart.
"""

from __future__ import annotations

import argparse
import base64
import enum
import json
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from fictures_ai.config import Settings, describe_settings_error
from fictures_ai.key_commands import add_key_commands, run_key_command
from fictures_ai.observability.logs import LogFormat
from fictures_ai.redaction import mask_credentials

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "FICTURES_API_KEY"
API_KEY_HELP = f"API key sent as 'Authorization: Bearer' [env {API_KEY_ENV}]."


def _client(args: argparse.Namespace, timeout: httpx.Timeout) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, timeout=timeout, headers=headers)


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """One handler on stderr for the server and its libraries: JSON lines or plain text.

    The server logs in ``LOG_FORMAT`` (JSON by default, for log pipelines); the other
    commands, which people read, in text.
    """
    from fictures_ai.observability.logs import configure_logging as configure

    configure(level=level, log_format=log_format)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; unset flags leave the environment's value in force."""
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} [env {name.upper()}]"
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fictures-ai``."""
    parser = argparse.ArgumentParser(prog="fictures-ai", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="Run the HTTP server.")
    add_settings_flags(serve)

    add_key_commands(commands)

    models = commands.add_parser("models", help="Manage local models.")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    models_commands.add_parser(
        "prepare", help="Convert the bundled text model now (otherwise done on first use)."
    )

    generate = commands.add_parser("generate", help="Ask a running server to generate.")
    generate_kinds = generate.add_subparsers(dest="kind", required=True)
    text = generate_kinds.add_parser("text", help="Generate text.")
    text.add_argument("prompt")
    text.add_argument("--stream", action="store_true", help="Print tokens as they arrive.")
    text.add_argument("--max-tokens", type=int, default=256)
    text.add_argument("--temperature", type=float, default=0.7)
    text.add_argument("--url", default=DEFAULT_URL, help="Server base URL.")
    text.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=API_KEY_HELP)
    image = generate_kinds.add_parser("image", help="Render an image into a PNG file.")
    image.add_argument("prompt")
    image.add_argument("-o", "--output", required=True, help="PNG file to write.")
    image.add_argument("--negative-prompt")
    image.add_argument("--width", type=int, default=1344)
    image.add_argument("--height", type=int, default=768)
    image.add_argument("--steps", type=int, default=30, help="Denoising steps.")
    image.add_argument("--guidance-scale", type=float, default=7.5)
    image.add_argument("--seed", type=int, help="Same seed, same image (random if unset).")
    image.add_argument("--url", default=DEFAULT_URL, help="Server base URL.")
    image.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=API_KEY_HELP)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def serve(args: argparse.Namespace) -> int:
    """Run the server with uvicorn on the settings (environment, .env and flags)."""
    import uvicorn

    from fictures_ai.api.app import create_app

    try:
        settings = settings_from(args)
    except ValidationError as exc:
        print(f"Invalid settings:\n{describe_settings_error(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
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


def prepare_models() -> int:
    """Convert the bundled text model into the cache and print its folder."""
    from fictures_ai.engines.bundled_model import prepare_bundled_model

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"Invalid settings:\n{describe_settings_error(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    print(prepare_bundled_model(settings.model_cache_dir))
    return 0


def generate_text(args: argparse.Namespace) -> int:
    """Send a prompt to a running server and print the answer."""
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature}
    with _client(args, httpx.Timeout(600.0, connect=5.0)) as client:
        try:
            if not args.stream:
                response = client.post("/api/v1/text/generate", json=body)
                if response.is_error:
                    return _report_http_error(response)
                print(response.json()["text"])
                return 0
            with client.stream("POST", "/api/v1/text/stream", json=body) as stream:
                if stream.is_error:
                    stream.read()
                    return _report_http_error(stream)
                for line in stream.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: ") :])
                    if event.get("error"):
                        print(f"\nerror: {event['error']}", file=sys.stderr)
                        return 1
                    sys.stdout.write(event["delta"])
                    sys.stdout.flush()
                sys.stdout.write("\n")
                return 0
        except httpx.HTTPError as exc:
            print(f"Could not reach the server at {args.url}: {exc}", file=sys.stderr)
            return 1


def generate_image(args: argparse.Namespace) -> int:
    """Render an image on a running server, with a progress bar, and save it as PNG."""
    from tqdm import tqdm

    body = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
    }
    result: dict[str, Any] | None = None
    timeout = httpx.Timeout(3600.0, connect=5.0)
    try:
        with (
            _client(args, timeout) as client,
            client.stream("POST", "/api/v1/images/stream", json=body) as stream,
            tqdm(total=args.steps, unit="step", desc="rendering", file=sys.stderr) as bar,
        ):
            if stream.is_error:
                stream.read()
                return _report_http_error(stream)
            for line in stream.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: ") :])
                if event.get("error"):
                    print(f"error: {event['error']}", file=sys.stderr)
                    return 1
                if event["done"]:
                    result = event
                else:
                    bar.total = event["total_steps"]
                    bar.update(event["step"] - bar.n)
    except httpx.HTTPError as exc:
        print(f"Could not reach the server at {args.url}: {exc}", file=sys.stderr)
        return 1
    if result is None:
        print("error: the server ended the stream without an image", file=sys.stderr)
        return 1
    png = base64.b64decode(result["image_url"].split(",", 1)[1])
    Path(args.output).write_bytes(png)
    print(
        f"{args.output}: {result['width']}x{result['height']}, seed {result['seed']}, "
        f"model {result['model']}"
    )
    return 0


def _report_http_error(response: httpx.Response) -> int:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    print(f"error {response.status_code}: {detail}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fictures-ai`` console command."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "models":
        return prepare_models()
    if args.command == "keys":
        return run_key_command(args)
    if args.kind == "image":
        return generate_image(args)
    return generate_text(args)


if __name__ == "__main__":
    sys.exit(main())
