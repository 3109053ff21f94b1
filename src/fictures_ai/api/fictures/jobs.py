"""``/api/v1/jobs``: durable jobs of text or image requests (docs/jobs.md).

A job's requests are validated at submission, each against the schema of the route it names
(``/api/v1/text/generate``, ``/api/v1/images/generate``) and the key's model allow-list: a bad
one refuses the whole job, naming its index. A key sees only its own jobs (another key's id is
a 404 like an unknown one). Creating and cancelling need ``stories:write``, reading
``stories:read``.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from fictures_ai.api.auth import Client, require_scope
from fictures_ai.api.dependencies import Services, get_jobs, get_services
from fictures_ai.api.errors import error_responses
from fictures_ai.api.fictures.job_protocol import (
    FICTURES_ENDPOINTS,
    MAX_METADATA_BYTES,
    JobCreateRequest,
    JobDeleted,
    JobListResponse,
    JobProgress,
    JobRequestResult,
    JobResponse,
    JobStepInfo,
    WebhookAttemptInfo,
)
from fictures_ai.api.fictures.protocol import (
    ErrorResponse,
    ImageGenerationRequest,
    TextGenerationRequest,
)
from fictures_ai.api.fictures.router import TEXT_DEFAULT_FIELDS
from fictures_ai.api.model_views import requested_loras, with_model_defaults
from fictures_ai.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
)
from fictures_ai.services.jobs.service import JobService
from fictures_ai.services.jobs.store import JobRecord, NewJob

logger = logging.getLogger(__name__)

jobs_router = APIRouter(
    prefix="/api/v1/jobs",
    tags=["jobs"],
    responses=error_responses(ErrorResponse, include_422=False),
)

JobsDep = Annotated[JobService, Depends(get_jobs)]
ServicesDep = Annotated[Services, Depends(get_services)]
Writer = Annotated[Client, Depends(require_scope("stories:write"))]
Reader = Annotated[Client, Depends(require_scope("stories:read"))]

_STATUS = {"cancelling": "cancelled"}
"""Job statuses as this surface names them (a job being cancelled is cancelled to clients;
``finished_at`` stays null until its running requests stopped)."""


def _timestamp(moment: Any) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


async def _describe(jobs: JobService, job: JobRecord, *, detailed: bool) -> JobResponse:
    steps = jobs.runner.progress(job.id)
    response = JobResponse(
        id=job.id,
        kind=job.kind,
        status=_STATUS.get(job.status, job.status),
        position=await jobs.position(job),
        progress=JobProgress(
            total=job.total,
            completed=job.completed,
            failed=job.failed,
            cancelled=job.cancelled,
            running=[
                JobStepInfo(index=index, step=step, total_steps=total)
                for index, (step, total) in sorted(steps.items())
            ],
        ),
        created_at=int(job.created_at.timestamp()),
        started_at=_timestamp(job.started_at),
        finished_at=_timestamp(job.finished_at),
        webhook_url=job.webhook_url,
        metadata=job.metadata,
    )
    if detailed:
        response.results = [
            JobRequestResult(
                index=request.index,
                status=request.status,
                result=request.result,
                error=request.error,
            )
            for request in await jobs.requests(job.id)
        ]
        response.webhook_attempts = [
            WebhookAttemptInfo(
                webhook_id=attempt.delivery_id,
                event=attempt.event_type,
                attempted_at=int(attempt.attempted_at.timestamp()),
                duration_ms=attempt.duration_ms,
                status_code=attempt.status_code,
                error=attempt.error,
                delivered=attempt.delivered,
            )
            for attempt in await jobs.attempts(job.id)
        ]
    return response


def _check_requests(body: JobCreateRequest, services: Services, caller: Client) -> None:
    """Validate every request as its route would, and its model against the key; raise
    ``RequestValidationError`` (with each bad request's index) or ``InvalidRequestError``."""
    _, schema = FICTURES_ENDPOINTS[body.kind]
    errors: list[Any] = []
    for index, item in enumerate(body.requests):
        try:
            parsed = schema.model_validate_json(json.dumps(item))
        except ValidationError as exc:
            errors.extend(
                {**error, "loc": ("body", "requests", index, *error["loc"])}
                for error in exc.errors(include_url=False)
            )
            continue
        where = f"requests[{index}]"
        try:
            if isinstance(parsed, TextGenerationRequest):
                text = services.models.text(parsed.model)
                caller.check_model(text.name)
                parsed = with_model_defaults(parsed, text.defaults, TEXT_DEFAULT_FIELDS)
                text.params(parsed.to_generation_params())
            else:
                assert isinstance(parsed, ImageGenerationRequest)
                image = services.models.image(parsed.model)
                caller.check_model(image.name)
                parsed = with_model_defaults(parsed, image.defaults)
                image.params(parsed.to_generation_params(), requested_loras(parsed.loras))
        except ModelNotFoundError as exc:
            raise InvalidRequestError(
                f"{where}.model: {exc.message}", param=f"{where}.model"
            ) from None
        except PermissionDeniedError as exc:
            raise PermissionDeniedError(f"{where}: {exc.message}") from None
        except InvalidRequestError as exc:  # an unknown LoRA adapter, ...
            param = f"{where}.{exc.param}" if exc.param else where
            raise InvalidRequestError(f"{where}: {exc.message}", param=param) from None
    if errors:
        raise RequestValidationError(errors)
    if body.metadata is not None and len(json.dumps(body.metadata)) > MAX_METADATA_BYTES:
        raise InvalidRequestError(
            f"metadata is over {MAX_METADATA_BYTES} bytes of JSON.", param="metadata"
        )


@jobs_router.post("", status_code=202, response_model=JobResponse)
async def create_job(
    body: JobCreateRequest,
    request: Request,
    caller: Writer,
    jobs: JobsDep,
    services: ServicesDep,
) -> JSONResponse:
    """Accept a job: 202 with its id, status ``queued`` and its place in the queue. Its
    requests run beside interactive traffic, at a lower priority; poll
    ``GET /api/v1/jobs/{id}`` or give a ``webhook_url``."""
    if body.kind == "images" and "image" not in services.models.kinds():
        raise InvalidRequestError("This server does not generate images.", param="kind")
    if body.kind == "text" and "text" not in services.models.kinds():
        raise InvalidRequestError("This server does not generate text.", param="kind")
    _check_requests(body, services, caller)
    job = await jobs.submit(
        NewJob(
            api="fictures",
            kind=body.kind,
            endpoint=FICTURES_ENDPOINTS[body.kind][0],
            owner=caller.id,
            allowed_models=caller.key.models if caller.key is not None else None,
            requests=[(None, item) for item in body.requests],
            base_url=str(request.base_url),
            webhook_url=body.webhook_url,
            webhook_progress=body.webhook_progress,
            metadata=body.metadata,
        )
    )
    described = await _describe(jobs, job, detailed=False)
    return JSONResponse(
        described.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/api/v1/jobs/{job.id}"},
    )


@jobs_router.get("", response_model=JobListResponse)
async def list_jobs(
    caller: Reader,
    jobs: JobsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JobListResponse:
    """The caller's own jobs, newest first (``after``: the last id of the previous page)."""
    page, more = await jobs.list_jobs(owner=caller.id, api="fictures", limit=limit, after=after)
    return JobListResponse(
        data=[await _describe(jobs, job, detailed=False) for job in page], has_more=more
    )


@jobs_router.get("/{job_id}", response_model=JobResponse)
async def retrieve_job(job_id: str, caller: Reader, jobs: JobsDep) -> JobResponse:
    """The job with each request's result or error as soon as it is ready, the image step
    rendering now, and every webhook attempt."""
    job = await jobs.get(job_id, owner=caller.id, api="fictures")
    return await _describe(jobs, job, detailed=True)


@jobs_router.delete("/{job_id}", response_model=JobResponse | JobDeleted)
async def cancel_job(job_id: str, caller: Writer, jobs: JobsDep) -> JobResponse | JobDeleted:
    """Cancel an unfinished job: requests not started never run, running ones stop at their
    next step (their outcome is ``cancelled``); finished requests keep their results. A
    finished job is deleted with its results and images (``{"id", "deleted": true}``): what it
    kept no longer counts against the key's JOB_MAX_STORED_BYTES."""
    job = await jobs.get(job_id, owner=caller.id, api="fictures")
    if job.finished:
        await jobs.delete(job)
        return JobDeleted(id=job.id)
    job = await jobs.cancel(job_id, owner=caller.id, api="fictures")
    return await _describe(jobs, job, detailed=True)


@jobs_router.get("/{job_id}/images/{name}", include_in_schema=False)
async def get_job_image(job_id: str, name: str, jobs: JobsDep) -> FileResponse:
    """A PNG a job rendered; its unguessable name is the permission (as for OpenAI's image
    URLs), so an ``<img>`` can show it. 404 once the job expired."""
    try:
        path = jobs.files.image_path(job_id, name)
    except ValueError:
        raise NotFoundError("image", name) from None
    if not path.is_file():
        raise NotFoundError("image", name)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private"})
