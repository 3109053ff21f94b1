"""The ``fictures-ai`` command: serve, prepare models, and talk to a running server.

The flags of ``serve`` are generated from the ``Settings`` fields (``--api-port`` is
``API_PORT``), so the CLI and the settings cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fictures_ai import __version__
from fictures_ai.cli.generate import add_generate_commands, generate_image, generate_text
from fictures_ai.cli.keys import add_key_commands, run_key_command
from fictures_ai.cli.models import add_models_commands, run_models_command
from fictures_ai.cli.serve import add_serve_command, serve

DESCRIPTION = (
    "Fictures AI Server: text (vLLM) and image (diffusers) generation over HTTP. Run the "
    "server, manage its API keys, prepare the bundled text model, manage a running server's "
    "models, or ask it to generate. 'fictures-ai COMMAND --help' tells more of each command."
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fictures-ai``."""
    parser = argparse.ArgumentParser(prog="fictures-ai", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # The metavar names the choices in "arguments are required" (the dest would show).
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{serve,keys,models,generate}"
    )
    add_serve_command(commands)
    add_key_commands(commands)
    add_models_commands(commands)
    add_generate_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fictures-ai`` console command."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "models":
        return run_models_command(args)
    if args.command == "keys":
        return run_key_command(args)
    if args.kind == "image":
        return generate_image(args)
    return generate_text(args)


if __name__ == "__main__":
    sys.exit(main())
