"""Serve our real app over the instant engine, or the bare SSE app, with uvicorn.

``python benchmarks/http_ceiling_server.py --app fictures|bare --port P``. Uvicorn runs with
the same defaults as ``fictures-ai serve`` (uvloop and httptools when installed); our app is
built by ``create_app`` with ``REQUIRE_API_KEY=false`` and logging at WARNING.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).parent))
from bare_sse_app import create_bare_app  # noqa: E402
from fictures_ai.api.app import create_app  # noqa: E402
from fictures_ai.config import Settings  # noqa: E402
from instant_engine import build_instant_services  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", choices=["fictures", "bare"], required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.app == "bare":
        app = create_bare_app()
    else:
        settings = Settings(_env_file=None, require_api_key=False, log_level="WARNING")  # type: ignore[call-arg]
        app = create_app(services=build_instant_services(settings))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
