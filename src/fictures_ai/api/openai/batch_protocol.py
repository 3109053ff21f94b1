"""Schemas of OpenAI's Files and Batch APIs (``/v1/files``, ``/v1/batches``), as the official
SDK reads them (``openai.types.FileObject``, ``openai.types.Batch``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class FileObject(BaseModel):
    """A file: an uploaded batch input, or a batch's output or error file."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    expires_at: int | None = None


class FileList(BaseModel):
    """A page of the caller's files, newest first."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    """The answer to a file's deletion."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreateRequest(BaseModel):
    """``POST /v1/batches``: run every line of an uploaded JSONL file."""

    model_config = ConfigDict(extra="ignore", strict=True)

    input_file_id: str = Field(..., description="An uploaded file with purpose 'batch'.")
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/images/generations"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 pairs, keys of 64 and values of 512 characters (OpenAI's)."
    )
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="This server's extension: called (signed) with batch.completed, "
        "batch.failed or batch.cancelled.",
    )


class BatchRequestCounts(BaseModel):
    """Lines by outcome: ``failed`` counts every line of the error file (cancelled ones
    included), so that completed + failed = total once the batch ended."""

    total: int
    completed: int
    failed: int


class BatchErrors(BaseModel):
    """Errors of the batch as a whole."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class Batch(BaseModel):
    """A batch, as ``client.batches.retrieve`` reads it."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, Any] | None = None


class BatchList(BaseModel):
    """A page of the caller's batches, newest first."""

    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool
