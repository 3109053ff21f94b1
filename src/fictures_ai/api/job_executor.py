"""How a request of a job or batch runs: the interactive routes' own code, at batch priority.

``RouteExecutor`` is the API layer's :class:`~fictures_ai.services.jobs.runner.JobExecutor`. A
request of a Fictures job runs as ``POST /api/v1/text/generate`` or ``/api/v1/images/generate``
would run it; a line of an OpenAI batch as ``/v1/chat/completions``, ``/v1/completions`` or
``/v1/images/generations`` would (the same validation, defaults, tools, structured output and
errors), with :data:`~fictures_ai.engines.base.BATCH_PRIORITY` and without per-minute budgets
(the job's own limits apply instead). The model allow-list checked is the one the key had when
the job was created. Images are kept on disk and answered by URL under the job.

Results and errors are stored as the surface reports them: a Fictures request's response body,
or ``{"status_code", "detail"}``; an OpenAI line's ``{"status_code", "request_id", "body"}``,
the body being the route's answer or its error object.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from fictures_ai.api.cache_control import cache_ticket
from fictures_ai.api.dependencies import Services
from fictures_ai.api.errors import error_reply
from fictures_ai.api.fictures.errors import fictures_validation_error
from fictures_ai.api.fictures.job_protocol import FICTURES_ENDPOINTS
from fictures_ai.api.fictures.protocol import (
    ImageGenerationRequest as FicturesImageRequest,
)
from fictures_ai.api.fictures.protocol import TextGenerationRequest
from fictures_ai.api.fictures.router import image_generation as fictures_image
from fictures_ai.api.fictures.router import text_generation
from fictures_ai.api.openai.errors import error_body, openai_validation_error
from fictures_ai.api.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from fictures_ai.api.openai.protocol import (
    ImageGenerationRequest as OpenAIImageRequest,
)
from fictures_ai.api.openai.router import chat_completion, completion, image_generation
from fictures_ai.api.sse import EventStreamResponse
from fictures_ai.engines.base import BATCH_PRIORITY
from fictures_ai.errors import (
    FicturesError,
    InvalidRequestError,
    PermissionDeniedError,
    ServiceUnavailableError,
    TooManyRequestsError,
)
from fictures_ai.services.jobs.runner import OutputFile, ProgressCallback, RequestOutcome
from fictures_ai.services.jobs.store import (
    FileRecord,
    JobRecord,
    JobRequestRecord,
    JobStatus,
    WebhookEvent,
)
from fictures_ai.services.response_cache import CacheTicket

logger = logging.getLogger(__name__)

BATCH_ENDPOINTS: dict[str, tuple[str, type[BaseModel]]] = {
    "/v1/chat/completions": ("text", ChatCompletionRequest),
    "/v1/completions": ("text", CompletionRequest),
    "/v1/images/generations": ("images", OpenAIImageRequest),
}
"""The endpoints a batch may target → the kind of its lines, and their schema."""


def job_image_path(job_id: str, name: str) -> str:
    """The path (under the server's base URL) of a job's rendered image."""
    return f"api/v1/jobs/{job_id}/images/{name}"


def batch_line_id(job_id: str, index: int) -> str:
    """The ``id`` of a batch's output line (``batch_req_...``), the same however often the
    file is written."""
    return "batch_req_" + hashlib.sha256(f"{job_id}:{index}".encode()).hexdigest()[:32]


def output_file_ids(job_id: str) -> tuple[str, str]:
    """The ids of a batch's output and error files (fixed by the batch: a batch finished
    twice, by a restart in between, writes the same files)."""
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:24]
    return f"file-out{digest}", f"file-err{digest}"


class RouteExecutor:
    """Runs jobs' requests through the routes' code (see the module docstring)."""

    def __init__(self, services: Services, *, store_image: Callable[[str, bytes], str]) -> None:
        """``store_image(job_id, png)`` keeps a job's PNG and returns its file name."""
        self._services = services
        self._store_image = store_image

    async def execute(
        self, job: JobRecord, request: JobRequestRecord, *, progress: ProgressCallback
    ) -> RequestOutcome:
        """Run one request; every error becomes a ``failed`` outcome with the surface's
        error."""
        if job.api == "fictures":
            return await self._fictures(job, request, progress)
        return await self._openai(job, request)

    def _check_model(self, job: JobRecord) -> Callable[..., Any]:
        async def admit(model: str, *_: Any) -> None:
            if job.allowed_models is not None and model not in job.allowed_models:
                raise PermissionDeniedError(
                    f"The API key that created this job may not use the model '{model}'. "
                    f"Allowed: {', '.join(job.allowed_models)}."
                )

        return admit

    async def _fictures(
        self, job: JobRecord, request: JobRequestRecord, progress: ProgressCallback
    ) -> RequestOutcome:
        _, schema = FICTURES_ENDPOINTS[job.kind]
        try:
            body = schema.model_validate_json(json.dumps(request.body))
            kept: list[int] = []

            async def image_url(png: bytes) -> str:
                name = await asyncio.to_thread(self._store_image, job.id, png)
                kept.append(len(png))
                return job.base_url + job_image_path(job.id, name)

            response: BaseModel
            if isinstance(body, TextGenerationRequest):
                response = await text_generation(
                    body,
                    self._services,
                    admit=self._check_model(job),
                    request=None,
                    priority=BATCH_PRIORITY,
                    request_id=f"{job.id}-{request.index}",
                    cache=_job_ticket(job, body.deterministic),
                )
            else:
                assert isinstance(body, FicturesImageRequest)
                response = await fictures_image(
                    body,
                    self._services.models,
                    admit=self._check_model(job),
                    request=None,
                    image_url=image_url,
                    priority=BATCH_PRIORITY,
                    progress=progress,
                    cache=_job_ticket(job, body.deterministic),
                )
        except ValidationError as exc:  # validated at submission; a changed schema lands here
            reply = fictures_validation_error(RequestValidationError(exc.errors()))
            return RequestOutcome(
                status="failed",
                error={"status_code": reply.status_code, **json.loads(bytes(reply.body))},
            )
        except FicturesError as exc:
            failure = error_reply(exc)
            return RequestOutcome(
                status="failed",
                error={"status_code": failure.status, "detail": failure.message},
                retry_after_s=_retry_after(exc),
            )
        return RequestOutcome(
            status="completed",
            result=response.model_dump(mode="json"),
            result_bytes=sum(kept),
        )

    async def _openai(self, job: JobRecord, request: JobRequestRecord) -> RequestOutcome:
        _, schema = BATCH_ENDPOINTS[job.endpoint]
        request_id = f"req_{uuid.uuid4().hex}"
        kept: list[int] = []

        async def keep(png: bytes) -> str:
            name = await asyncio.to_thread(self._store_image, job.id, png)
            kept.append(len(png))
            return job.base_url + job_image_path(job.id, name)

        try:
            body = schema.model_validate_json(json.dumps(request.body))
            if getattr(body, "stream", None):
                raise InvalidRequestError(
                    "stream is not supported in a batch: its answer is a line of the output "
                    "file. Leave stream out (or false).",
                    param="stream",
                )
            admit = self._check_model(job)
            assert isinstance(body, ChatCompletionRequest | CompletionRequest | OpenAIImageRequest)
            cache = _job_ticket(job, body.deterministic)
            answer: BaseModel | EventStreamResponse
            if isinstance(body, ChatCompletionRequest):
                answer = await chat_completion(
                    body,
                    self._services.models,
                    admit=admit,
                    request=None,
                    priority=BATCH_PRIORITY,
                    cache=cache,
                )
            elif isinstance(body, CompletionRequest):
                answer = await completion(
                    body,
                    self._services.models,
                    admit=admit,
                    request=None,
                    priority=BATCH_PRIORITY,
                    cache=cache,
                )
            else:
                assert isinstance(body, OpenAIImageRequest)
                answer = await image_generation(
                    body,
                    self._services.models,
                    admit=admit,
                    request=None,
                    keep=keep,
                    priority=BATCH_PRIORITY,
                    cache=cache,
                )
            assert not isinstance(answer, EventStreamResponse)  # a stream was refused above
            response = answer
        except ValidationError as exc:
            reply = openai_validation_error(RequestValidationError(exc.errors()))
            return RequestOutcome(
                status="failed",
                error={
                    "status_code": reply.status_code,
                    "request_id": request_id,
                    "body": json.loads(bytes(reply.body)),
                },
            )
        except FicturesError as exc:
            failure = error_reply(exc)
            return RequestOutcome(
                status="failed",
                error={
                    "status_code": failure.status,
                    "request_id": request_id,
                    "body": error_body(
                        failure.message, failure.status, param=failure.param, code=failure.code
                    ),
                },
                retry_after_s=_retry_after(exc),
            )
        return RequestOutcome(
            status="completed",
            result={
                "status_code": 200,
                "request_id": request_id,
                "body": response.model_dump(mode="json", exclude_none=True),
            },
            result_bytes=sum(kept),
        )

    def output_files(self, job: JobRecord, requests: list[JobRequestRecord]) -> list[OutputFile]:
        """A batch's output file (lines that got a 200) and error file (every other line:
        failed with the route's error, or cancelled), in OpenAI's line format; none for a
        Fictures job. Every line is in exactly one of the two."""
        if job.api != "openai":
            return []
        output: list[bytes] = []
        errors: list[bytes] = []
        for request in requests:
            line: dict[str, Any] = {
                "id": batch_line_id(job.id, request.index),
                "custom_id": request.custom_id,
            }
            if request.status == "completed":
                line.update(response=request.result, error=None)
                output.append(_jsonl(line))
            elif request.status == "failed" and request.error and "body" in request.error:
                line.update(response=request.error, error=None)
                errors.append(_jsonl(line))
            else:
                detail = request.error or {}
                code = "batch_cancelled" if request.status == "cancelled" else "internal_error"
                line.update(
                    response=None,
                    error={
                        "code": code,
                        "message": detail.get("message", "The line did not run."),
                    },
                )
                errors.append(_jsonl(line))
        out_id, err_id = output_file_ids(job.id)
        now = datetime.now(UTC)
        files = []
        for file_id, purpose, lines in (
            (out_id, "batch_output", output),
            (err_id, "batch_error", errors),
        ):
            if not lines and purpose == "batch_error":
                continue
            content = b"".join(lines)
            files.append(
                OutputFile(
                    record=FileRecord(
                        id=file_id,
                        owner=job.owner,
                        purpose=purpose,
                        filename=f"{job.id}_{purpose.removeprefix('batch_')}.jsonl",
                        bytes=len(content),
                        created_at=now,
                        expires_at=None,
                        job_id=job.id,
                    ),
                    content=content,
                )
            )
        return files

    def job_event(self, job: JobRecord, status: JobStatus) -> WebhookEvent:
        """``job.completed|failed|cancelled`` (Fictures: the job's summary as ``data``) or
        ``batch.completed|failed|cancelled`` (OpenAI's event shape: ``data.id``)."""
        if job.api == "openai":
            payload: dict[str, Any] = {
                "object": "event",
                "id": f"evt_{uuid.uuid4().hex}",
                "type": f"batch.{status}",
                "created_at": int(time.time()),
                "data": {"id": job.id},
            }
            return WebhookEvent(event_type=f"batch.{status}", payload=json.dumps(payload))
        counts = {
            "total": job.total,
            "completed": job.completed,
            "failed": job.failed,
            "cancelled": job.cancelled,
        }
        payload = {
            "type": f"job.{status}",
            "timestamp": datetime.now(UTC).isoformat(),
            "data": {
                "id": job.id,
                "object": "job",
                "kind": job.kind,
                "status": status,
                "progress": counts,
                "metadata": job.metadata,
            },
        }
        return WebhookEvent(event_type=f"job.{status}", payload=json.dumps(payload))

    def progress_event(
        self, job: JobRecord, request: JobRequestRecord, status: str
    ) -> WebhookEvent:
        """``job.progress``: request ``index`` of the job finished with ``status``."""
        payload = {
            "type": "job.progress",
            "timestamp": datetime.now(UTC).isoformat(),
            "data": {
                "id": job.id,
                "object": "job",
                "index": request.index,
                "status": status,
                "total": job.total,
                "metadata": job.metadata,
            },
        }
        return WebhookEvent(event_type="job.progress", payload=json.dumps(payload))


def _job_ticket(job: JobRecord, deterministic: bool) -> CacheTicket:
    """A job's request reads and stores the response cache as an interactive one of its key
    would: under the allow-list the key had when the job was created."""
    return cache_ticket(None, models=job.allowed_models, deterministic=deterministic)


def _retry_after(exc: FicturesError) -> float | None:
    """Seconds before a request that met ``exc`` may run again; None when ``exc`` is its
    outcome (a bad request, a failed generation). The model loading or failing to load, an
    engine that died or is full: those pass."""
    if isinstance(exc, ServiceUnavailableError | TooManyRequestsError):
        return float(exc.retry_after or 5)
    return None


def _jsonl(line: dict[str, Any]) -> bytes:
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"
