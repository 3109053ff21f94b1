"""Serves the playground page at ``/playground`` and its script and style sheet.

The page is three package files under ``static/`` (``index.html``, ``playground.js``,
``playground.css``), read once with :mod:`importlib.resources`: they ship inside the wheel and
nothing is built at install. The page calls this server's Fictures API through relative URLs,
so it also works behind a proxy that mounts the server under a path prefix.

Caching: the page is revalidated on every visit (``no-cache`` with an ``ETag``); it links its
assets with a content hash in the query (``?v=HASH``), and an asset requested with the
current hash is cached for a year, so a new version of the page never runs a stale script.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, HTTPException, Request, Response

router = APIRouter()

ASSET_MEDIA_TYPES = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
"""The assets the page may load, by file name (no other file under ``static/`` is served)."""

VERSION_PLACEHOLDER = b"__ASSET_VERSION__"
"""Replaced in ``index.html`` by the assets' content hash."""

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",  # generated images arrive as data: URLs
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",  # forms are sent by the script, never by navigation
        "frame-ancestors 'none'",
    ]
)

REVALIDATE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file of the playground, ready to send."""

    body: bytes
    media_type: str
    etag: str


@dataclass(frozen=True, slots=True)
class PlaygroundFiles:
    """The page, its assets by name, and the content hash that versions the assets."""

    page: StaticFile
    assets: dict[str, StaticFile]
    version: str


def _static_file(body: bytes, media_type: str) -> StaticFile:
    digest = hashlib.sha256(body).hexdigest()[:16]
    return StaticFile(body=body, media_type=media_type, etag=f'"{digest}"')


@functools.cache
def load_playground_files() -> PlaygroundFiles:
    """Read the package's static files once; raises ``FileNotFoundError`` if one is missing."""
    folder = resources.files("fictures_ai.api.playground").joinpath("static")
    assets = {
        name: _static_file(folder.joinpath(name).read_bytes(), media_type)
        for name, media_type in ASSET_MEDIA_TYPES.items()
    }
    version = hashlib.sha256(b"".join(asset.body for asset in assets.values())).hexdigest()[:12]
    html = folder.joinpath("index.html").read_bytes().replace(VERSION_PLACEHOLDER, version.encode())
    page = _static_file(html, "text/html; charset=utf-8")
    return PlaygroundFiles(page=page, assets=assets, version=version)


def _matches(request: Request, etag: str) -> bool:
    """Whether the client's ``If-None-Match`` names this ETag (weak or strong)."""
    header = request.headers.get("if-none-match", "")
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return etag in tags or "*" in tags


def _send(request: Request, file: StaticFile, *, cache_control: str, page: bool) -> Response:
    headers = {
        "Cache-Control": cache_control,
        "ETag": file.etag,
        "X-Content-Type-Options": "nosniff",
    }
    if page:
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        headers["Referrer-Policy"] = "no-referrer"
    if _matches(request, file.etag):
        return Response(status_code=304, headers=headers)
    return Response(content=file.body, media_type=file.media_type, headers=headers)


# Plain functions: FastAPI runs them in its thread pool, so the one-time read of the package
# files never blocks the event loop.
@router.get("/playground", include_in_schema=False)
def show_playground(request: Request) -> Response:
    """The playground page (HTML), with its Content-Security-Policy; revalidated on each visit."""
    return _send(request, load_playground_files().page, cache_control=REVALIDATE, page=True)


@router.get("/playground/assets/{name}", include_in_schema=False)
def get_playground_asset(name: str, request: Request, v: str | None = None) -> Response:
    """A script or style sheet of the page; 404 for any other name.

    Cached for a year when requested with the current content hash (``?v=``), as the page
    links it; revalidated otherwise.
    """
    files = load_playground_files()
    asset = files.assets.get(name)
    if asset is None:
        raise HTTPException(status_code=404, detail="Not Found")
    cache_control = IMMUTABLE if v == files.version else REVALIDATE
    return _send(request, asset, cache_control=cache_control, page=False)
