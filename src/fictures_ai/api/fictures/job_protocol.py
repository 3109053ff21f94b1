"""Schemas of ``/api/v1/jobs``: durable jobs of text or image requests (docs/jobs.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fictures_ai.api.fictures.protocol import ImageGenerationRequest, TextGenerationRequest

MAX_METADATA_BYTES = 16 << 10
"""The most JSON bytes of a job's ``metadata``."""

FICTURES_ENDPOINTS: dict[str, tuple[str, type[BaseModel]]] = {
    "text": ("/api/v1/text/generate", TextGenerationRequest),
    "images": ("/api/v1/images/generate", ImageGenerationRequest),
}
"""A job's kind → the route its requests are bodies of, and their schema."""


class JobCreateRequest(BaseModel):
    """A job: requests of one kind, run in order beside interactive traffic."""

    model_config = ConfigDict(strict=True, extra="forbid")

    kind: Literal["text", "images"] = Field(
        ...,
        description="text: each request is a body of POST /api/v1/text/generate; images: of "
        "POST /api/v1/images/generate.",
    )
    requests: list[dict[str, Any]] = Field(
        ..., min_length=1, description="The request bodies, run in this order (JOB_MAX_REQUESTS)."
    )
    webhook_url: str | None = Field(
        None,
        max_length=2048,
        description="Called (signed, Standard Webhooks) when the job completes, fails or is "
        "cancelled. Needs the server's WEBHOOK_SECRET.",
    )
    webhook_progress: bool = Field(
        False, description="Also call webhook_url each time a request finishes (job.progress)."
    )
    metadata: dict[str, Any] | None = Field(
        None, description="Yours: returned with the job and in its webhooks (16 KiB of JSON)."
    )


class JobProgress(BaseModel):
    """Where a job stands: its requests by outcome, and the image rendering now."""

    total: int
    completed: int
    failed: int
    cancelled: int
    running: list[JobStepInfo] = Field(
        default_factory=list,
        description="The image requests rendering now on this server, with their step.",
    )


class JobStepInfo(BaseModel):
    """An image request of the job that is rendering: its denoising step of the total."""

    index: int
    step: int
    total_steps: int


class JobRequestResult(BaseModel):
    """One request of a job: its result (the route's response body) or its error, as soon as
    it is ready."""

    index: int
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = Field(
        None, description="{status_code, detail}: what the route would have answered."
    )


class WebhookAttemptInfo(BaseModel):
    """One attempt to deliver one of the job's webhook events."""

    webhook_id: str
    event: str
    attempted_at: int
    duration_ms: int
    status_code: int | None
    error: str | None
    delivered: bool


class JobResponse(BaseModel):
    """A job: its status, progress and (for ``GET /api/v1/jobs/{id}``) each request's
    outcome."""

    id: str
    object: Literal["job"] = "job"
    kind: Literal["text", "images"]
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    position: int = Field(
        ..., description="1 + the jobs of its kind ahead of it while queued; 0 once it runs."
    )
    progress: JobProgress
    created_at: int
    started_at: int | None
    finished_at: int | None
    webhook_url: str | None
    metadata: dict[str, Any] | None
    results: list[JobRequestResult] | None = Field(
        None, description="Every request in order (left out of listings)."
    )
    webhook_attempts: list[WebhookAttemptInfo] | None = Field(
        None, description="Every webhook attempt, oldest first (left out of listings)."
    )


class JobDeleted(BaseModel):
    """The answer to deleting a finished job."""

    id: str
    object: Literal["job"] = "job"
    deleted: bool = True


class JobListResponse(BaseModel):
    """The caller's jobs, newest first."""

    object: Literal["list"] = "list"
    data: list[JobResponse]
    has_more: bool
