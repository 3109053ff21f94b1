"""``fictures-ai generate text|image``: ask a running server to generate, over HTTP."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "FICTURES_API_KEY"
API_KEY_HELP = f"API key sent as 'Authorization: Bearer' [env {API_KEY_ENV}]."


def add_generate_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``generate text|image`` to a parser's subcommands (``dest="kind"``)."""
    generate = subparsers.add_parser("generate", help="Ask a running server to generate.")
    generate_kinds = generate.add_subparsers(dest="kind", required=True, metavar="{text,image}")
    text = generate_kinds.add_parser("text", help="Generate text.")
    text.add_argument("prompt")
    text.add_argument("--stream", action="store_true", help="Print tokens as they arrive.")
    text.add_argument(
        "--max-tokens", type=int, default=256, help="Most tokens to generate (default: 256)."
    )
    text.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="Sampling temperature: 0 always picks the likeliest token, higher varies more "
        "(default: 0.7).",
    )
    text.add_argument("--url", default=DEFAULT_URL, help="Server base URL.")
    text.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=API_KEY_HELP)
    image = generate_kinds.add_parser("image", help="Render an image into a PNG file.")
    image.add_argument("prompt")
    image.add_argument("-o", "--output", required=True, help="PNG file to write.")
    image.add_argument("--negative-prompt", help="What the image should not show.")
    image.add_argument("--width", type=int, default=1344, help="Width in pixels (default: 1344).")
    image.add_argument("--height", type=int, default=768, help="Height in pixels (default: 768).")
    image.add_argument("--steps", type=int, default=30, help="Denoising steps (default: 30).")
    image.add_argument(
        "--guidance-scale",
        type=float,
        default=7.5,
        help="How closely to follow the prompt (default: 7.5).",
    )
    image.add_argument("--seed", type=int, help="Same seed, same image (random if unset).")
    image.add_argument("--url", default=DEFAULT_URL, help="Server base URL.")
    image.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=API_KEY_HELP)


def client_for(args: argparse.Namespace, timeout: httpx.Timeout) -> httpx.Client:
    """An HTTP client for ``args.url`` sending ``args.api_key`` (if any) as a bearer token."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, timeout=timeout, headers=headers)


def generate_text(args: argparse.Namespace) -> int:
    """Send a prompt to a running server and print the answer."""
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature}
    with client_for(args, httpx.Timeout(600.0, connect=5.0)) as client:
        try:
            if not args.stream:
                response = client.post("/api/v1/text/generate", json=body)
                if response.is_error:
                    return report_http_error(response)
                print(response.json()["text"])
                return 0
            with client.stream("POST", "/api/v1/text/stream", json=body) as stream:
                if stream.is_error:
                    stream.read()
                    return report_http_error(stream)
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
            client_for(args, timeout) as client,
            client.stream("POST", "/api/v1/images/stream", json=body) as stream,
            tqdm(total=args.steps, unit="step", desc="rendering", file=sys.stderr) as bar,
        ):
            if stream.is_error:
                stream.read()
                return report_http_error(stream)
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


def report_http_error(response: httpx.Response) -> int:
    """Print the server's error (its ``detail``) to stderr and return exit status 1."""
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    print(f"error {response.status_code}: {detail}", file=sys.stderr)
    return 1
