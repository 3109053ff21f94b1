"""The bytes of job results and of the Files API on disk, under ``JOBS_DIR``.

Layout: ``files/<file id>`` (uploads and batch output files), ``images/<job id>/<token>.png``
(rendered images of jobs, served by URL under their unguessable token). Every write goes to a
temporary file that is renamed into place once complete, so a file is whole or absent however
the server stops.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class JobFiles:
    """Files of jobs and batches under one folder."""

    def __init__(self, root: Path) -> None:
        """``root`` is created when first written to."""
        self.root = root

    def _path(self, *parts: str) -> Path:
        for part in parts:
            if not _SAFE_NAME.match(part) or part in (".", ".."):
                raise ValueError(f"Not a file name the server makes: {part!r}")
        return self.root.joinpath(*parts)

    def write_file(self, file_id: str, chunks: Iterable[bytes]) -> int:
        """Store the bytes of file ``file_id``; return their count."""
        return _write(self._path("files", file_id), chunks)

    def file_path(self, file_id: str) -> Path:
        """Where file ``file_id`` is (it may be missing)."""
        return self._path("files", file_id)

    def delete_file(self, file_id: str) -> None:
        """Delete file ``file_id`` if present."""
        self._path("files", file_id).unlink(missing_ok=True)

    def write_image(self, job_id: str, png: bytes) -> str:
        """Store a PNG of ``job_id``; return its name (``<token>.png``, 256 random bits)."""
        name = f"{secrets.token_urlsafe(32)}.png"
        _write(self._path("images", job_id, name), [png])
        return name

    def image_path(self, job_id: str, name: str) -> Path:
        """Where image ``name`` of ``job_id`` is (it may be missing or expired)."""
        return self._path("images", job_id, name)

    def delete_job(self, job_id: str) -> None:
        """Delete every image of ``job_id``."""
        shutil.rmtree(self._path("images", job_id), ignore_errors=True)


def _write(path: Path, chunks: Iterable[bytes]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
    try:
        with os.fdopen(handle, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return size
