"""OpenAI's Files and Batch APIs: ``/v1/files`` and ``/v1/batches`` (docs/jobs.md).

A batch runs every line of an uploaded JSONL file (``{"custom_id", "method": "POST", "url",
"body"}``) through ``/v1/chat/completions``, ``/v1/completions`` or ``/v1/images/generations``
at the batch priority. As OpenAI's: a line that fails goes to the error file and the batch
still completes (even when every line fails); lines carry their ``custom_id`` and their order
in the output is not promised; duplicate ``custom_id``s, malformed lines and lines for another
endpoint refuse the batch at creation (400, naming the lines); after a cancel every line is in
exactly one of the two files (the lines that never ran with ``batch_cancelled``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.responses import Response

from fictures_ai.api.auth import Client, require_scope
from fictures_ai.api.dependencies import get_jobs
from fictures_ai.api.errors import error_responses
from fictures_ai.api.openai.batch_protocol import (
    Batch,
    BatchCreateRequest,
    BatchList,
    BatchRequestCounts,
    FileDeleted,
    FileList,
    FileObject,
)
from fictures_ai.api.openai.protocol import ErrorResponse
from fictures_ai.errors import InvalidRequestError
from fictures_ai.services.jobs.service import JobService
from fictures_ai.services.jobs.store import FileRecord, JobKind, JobRecord, NewJob

logger = logging.getLogger(__name__)

batch_router = APIRouter(
    prefix="/v1", tags=["openai"], responses=error_responses(ErrorResponse, include_422=True)
)

JobsDep = Annotated[JobService, Depends(get_jobs)]
Writer = Annotated[Client, Depends(require_scope("stories:write"))]
Reader = Annotated[Client, Depends(require_scope("stories:read"))]

FILE_PURPOSES = ("batch",)
"""Purposes a file may be uploaded for (``batch_output``/``batch_error`` are the server's)."""
MAX_LINE_ERRORS = 20
"""The most bad lines one refusal lists."""
_STATUS = {
    "queued": "in_progress",
    "running": "in_progress",
    "cancelling": "cancelling",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


def _timestamp(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def _file_object(file: FileRecord) -> FileObject:
    return FileObject(
        id=file.id,
        bytes=file.bytes,
        created_at=int(file.created_at.timestamp()),
        filename=file.filename,
        purpose=file.purpose,
        expires_at=_timestamp(file.expires_at),
    )


def _batch(job: JobRecord) -> Batch:
    status = _STATUS[job.status]
    finished = _timestamp(job.finished_at)
    return Batch(
        id=job.id,
        endpoint=job.endpoint,
        input_file_id=job.input_file_id or "",
        completion_window=job.completion_window or "24h",
        status=status,
        output_file_id=job.output_file_id,
        error_file_id=job.error_file_id,
        created_at=int(job.created_at.timestamp()),
        in_progress_at=_timestamp(job.started_at),
        expires_at=int(job.created_at.timestamp()) + 86400,
        finalizing_at=finished if status in ("completed", "failed") else None,
        completed_at=finished if status == "completed" else None,
        failed_at=finished if status == "failed" else None,
        cancelling_at=_timestamp(job.cancel_requested_at),
        cancelled_at=finished if status == "cancelled" else None,
        request_counts=BatchRequestCounts(
            total=job.total, completed=job.completed, failed=job.failed + job.cancelled
        ),
        metadata=job.metadata,
    )


# Files


@batch_router.post("/files", response_model=FileObject)
async def create_file(
    file: UploadFile, purpose: Annotated[str, Form()], caller: Writer, jobs: JobsDep
) -> FileObject:
    """Upload a JSONL file for a batch (multipart: ``file`` and ``purpose=batch``), up to
    ``JOB_MAX_FILE_BYTES``."""
    if purpose not in FILE_PURPOSES:
        raise InvalidRequestError(
            f"purpose must be 'batch' (the only files this server takes), not '{purpose}'.",
            param="purpose",
        )

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await file.read(1 << 20):
            yield chunk

    record = await jobs.upload(
        owner=caller.id,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
        chunks=chunks(),
    )
    return _file_object(record)


@batch_router.get("/files", response_model=FileList)
async def list_files(
    caller: Reader,
    jobs: JobsDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
) -> FileList:
    """The caller's files, newest first."""
    page, more = await jobs.list_files(owner=caller.id, purpose=purpose, limit=limit, after=after)
    return FileList(
        data=[_file_object(file) for file in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=more,
    )


@batch_router.get("/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, caller: Reader, jobs: JobsDep) -> FileObject:
    """One of the caller's files."""
    return _file_object(await jobs.file(file_id, owner=caller.id))


@batch_router.get("/files/{file_id}/content", response_class=Response)
async def retrieve_file_content(file_id: str, caller: Reader, jobs: JobsDep) -> Response:
    """The bytes of one of the caller's files (a batch's output: JSONL)."""
    file = await jobs.file(file_id, owner=caller.id)
    return Response(await jobs.file_content(file), media_type="application/octet-stream")


@batch_router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, caller: Writer, jobs: JobsDep) -> FileDeleted:
    """Delete one of the caller's files."""
    await jobs.delete_file(file_id, owner=caller.id)
    return FileDeleted(id=file_id)


# Batches


def _parse_lines(content: bytes, endpoint: str) -> list[tuple[str | None, dict[str, Any]]]:
    """The ``(custom_id, body)`` of each line; ``InvalidRequestError`` listing the lines
    (1-based) that are not JSON objects with a unique ``custom_id``, ``method`` POST, ``url``
    the batch's endpoint and an object ``body``."""
    lines: list[tuple[str | None, dict[str, Any]]] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            problems.append(f"line {number}: not UTF-8 text")
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            problems.append(f"line {number}: not a JSON object")
            continue
        if not isinstance(line, dict):
            problems.append(f"line {number}: not a JSON object")
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problems.append(f"line {number}: custom_id must be a non-empty string")
        elif custom_id in seen:
            problems.append(
                f"line {number}: custom_id '{custom_id}' is already used on line "
                f"{seen[custom_id]} (each must be unique)"
            )
        else:
            seen[custom_id] = number
        if line.get("method") != "POST":
            problems.append(f"line {number}: method must be POST")
        if line.get("url") != endpoint:
            problems.append(
                f"line {number}: url is {line.get('url')!r}, but this batch's endpoint is "
                f"{endpoint} (a batch runs one endpoint)"
            )
        if not isinstance(line.get("body"), dict):
            problems.append(f"line {number}: body must be a JSON object")
        if not problems or not problems[-1].startswith(f"line {number}:"):
            lines.append((custom_id, line["body"]))
    if problems:
        shown = "; ".join(problems[:MAX_LINE_ERRORS])
        more = len(problems) - MAX_LINE_ERRORS
        raise InvalidRequestError(
            f"The input file has {len({p.split(':')[0] for p in problems})} bad line(s): {shown}"
            + (f"; and {more} more" if more > 0 else ""),
            param="input_file_id",
        )
    if not lines:
        raise InvalidRequestError("The input file has no lines.", param="input_file_id")
    return lines


@batch_router.post("/batches", response_model=Batch)
async def create_batch(
    body: BatchCreateRequest, request: Request, caller: Writer, jobs: JobsDep
) -> Batch:
    """Run every line of an uploaded file; the answer is the batch, ``in_progress``."""
    file = await jobs.file(body.input_file_id, owner=caller.id)
    if file.purpose != "batch":
        raise InvalidRequestError(
            f"File {file.id} has purpose '{file.purpose}'; a batch reads a file uploaded with "
            "purpose 'batch'.",
            param="input_file_id",
        )
    if body.metadata is not None and (
        len(body.metadata) > 16
        or any(len(key) > 64 or len(value) > 512 for key, value in body.metadata.items())
    ):
        raise InvalidRequestError(
            "metadata holds at most 16 pairs, keys of 64 and values of 512 characters.",
            param="metadata",
        )
    lines = _parse_lines(await jobs.file_content(file), body.endpoint)
    kind: JobKind = "images" if body.endpoint == "/v1/images/generations" else "text"
    job = await jobs.submit(
        NewJob(
            api="openai",
            kind=kind,
            endpoint=body.endpoint,
            owner=caller.id,
            allowed_models=caller.key.models if caller.key is not None else None,
            requests=lines,
            base_url=str(request.base_url),
            webhook_url=body.webhook_url,
            metadata=dict(body.metadata) if body.metadata is not None else None,
            input_file_id=file.id,
            completion_window=body.completion_window,
            id_prefix="batch_",
        )
    )
    return _batch(job)


@batch_router.get("/batches", response_model=BatchList)
async def list_batches(
    caller: Reader,
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> BatchList:
    """The caller's batches, newest first."""
    page, more = await jobs.list_jobs(owner=caller.id, api="openai", limit=limit, after=after)
    return BatchList(
        data=[_batch(job) for job in page],
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=more,
    )


@batch_router.get("/batches/{batch_id}", response_model=Batch)
async def retrieve_batch(batch_id: str, caller: Reader, jobs: JobsDep) -> Batch:
    """One of the caller's batches."""
    return _batch(await jobs.get(batch_id, owner=caller.id, api="openai"))


@batch_router.post("/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(batch_id: str, caller: Writer, jobs: JobsDep) -> Batch:
    """Cancel a batch: ``cancelling`` until its running lines stop, then ``cancelled`` with
    its output and error files."""
    return _batch(await jobs.cancel(batch_id, owner=caller.id, api="openai"))
