"""``JobService``: what the job and batch routes ask of the server — submit within the limits,
find a key's own jobs and files, cancel — over the store, the files on disk and the runner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from fictures_ai.errors import (
    InvalidRequestError,
    NotFoundError,
    RequestTooLargeError,
    TooManyRequestsError,
)
from fictures_ai.services.jobs.files import JobFiles
from fictures_ai.services.jobs.runner import JobRunner
from fictures_ai.services.jobs.store import (
    AttemptRecord,
    FileRecord,
    JobApi,
    JobRecord,
    JobRequestRecord,
    JobStore,
    NewJob,
    new_id,
)
from fictures_ai.services.jobs.webhooks import WebhookSender

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobLimits:
    """Per-key and per-job limits (``JOB_MAX_*``)."""

    max_requests: int
    max_active_per_key: int
    max_stored_bytes: int
    max_file_bytes: int


class StorageQuotaError(RequestTooLargeError):
    """The key keeps as many bytes here as it may (413)."""

    def __init__(self, *, used: int, limit: int) -> None:
        Exception.__init__(self)
        self.message = (
            f"This API key keeps {used} bytes of files and job results here, and may keep "
            f"{limit} (JOB_MAX_STORED_BYTES). Delete files (DELETE /v1/files/ID) or wait "
            "for finished jobs to expire."
        )
        self.args = (self.message,)
        self.limit = limit


class JobService:
    """Jobs and files of each key (see the module docstring)."""

    def __init__(
        self,
        *,
        store: JobStore,
        files: JobFiles,
        runner: JobRunner,
        webhooks: WebhookSender | None,
        limits: JobLimits,
    ) -> None:
        self.store = store
        self.files = files
        self.runner = runner
        self._webhooks = webhooks
        self.limits = limits

    async def submit(self, job: NewJob) -> JobRecord:
        """Create ``job`` (its requests were validated by the route).

        Raises:
            InvalidRequestError: too many requests, or a webhook URL that is refused (no
                ``WEBHOOK_SECRET``, an internal address, not http(s)).
            TooManyRequestsError: the key has ``max_active_per_key`` unfinished jobs.
            StorageQuotaError: the key keeps ``max_stored_bytes`` already.
        """
        noun = "batch" if job.api == "openai" else "job"
        if len(job.requests) > self.limits.max_requests:
            raise InvalidRequestError(
                f"A {noun} may hold {self.limits.max_requests} requests (JOB_MAX_REQUESTS); "
                f"this one has {len(job.requests)}. Split it.",
                param="input_file_id" if job.api == "openai" else "requests",
            )
        if job.webhook_url is not None:
            if self._webhooks is None:
                raise InvalidRequestError(
                    "webhook_url needs the server's WEBHOOK_SECRET (a whsec_ secret, shared "
                    "with your receiver to check signatures); this server has none.",
                    param="webhook_url",
                )
            await self._webhooks.check_url(job.webhook_url)
        active = await asyncio.to_thread(self.store.active_jobs, job.owner)
        if active >= self.limits.max_active_per_key:
            raise TooManyRequestsError(
                f"This API key has {active} unfinished jobs and batches, the most it may have "
                "(JOB_MAX_ACTIVE_PER_KEY). Wait for one to finish or cancel one.",
                retry_after=30,
            )
        if job.kind == "images":  # text results live in the database, uncounted
            await self._check_quota(job.owner, 0)
        created = await asyncio.to_thread(self.store.create_job, job)
        logger.info(
            "Job %s created: %d %s requests for %s", created.id, created.total, job.kind, job.owner
        )
        self.runner.wake()
        return created

    async def _check_quota(self, owner: str, adding: int) -> None:
        used = await asyncio.to_thread(self.store.stored_bytes, owner)
        if used + adding > self.limits.max_stored_bytes:
            raise StorageQuotaError(used=used, limit=self.limits.max_stored_bytes)

    async def get(self, job_id: str, *, owner: str, api: JobApi) -> JobRecord:
        """``owner``'s job ``job_id`` of ``api``; ``NotFoundError`` otherwise (whoever owns
        it)."""
        job = await asyncio.to_thread(self.store.get_job, job_id)
        if job is None or job.owner != owner or job.api != api:
            raise NotFoundError("batch" if api == "openai" else "job", job_id)
        return job

    async def list_jobs(
        self, *, owner: str, api: JobApi, limit: int, after: str | None
    ) -> tuple[list[JobRecord], bool]:
        """``owner``'s jobs of ``api``, newest first, and whether more follow."""
        jobs = await asyncio.to_thread(
            self.store.list_jobs, owner=owner, api=api, limit=limit + 1, after=after
        )
        if jobs is None:
            raise _unknown_cursor("batch" if api == "openai" else "job", after)
        return jobs[:limit], len(jobs) > limit

    async def delete(self, job: JobRecord) -> None:
        """Delete a finished job with its results, images and output files (their bytes no
        longer count against its owner)."""
        await self.runner.delete_job(job)
        logger.info("Job %s deleted by its owner", job.id)

    async def cancel(self, job_id: str, *, owner: str, api: JobApi) -> JobRecord:
        """Cancel ``owner``'s job (a finished one is returned as it is)."""
        await self.get(job_id, owner=owner, api=api)
        job = await self.runner.cancel(job_id)
        if job is None:
            raise NotFoundError("batch" if api == "openai" else "job", job_id)
        return job

    async def requests(self, job_id: str) -> list[JobRequestRecord]:
        """The requests of ``job_id`` with their outcomes."""
        return await asyncio.to_thread(self.store.requests, job_id)

    async def attempts(self, job_id: str) -> list[AttemptRecord]:
        """Every webhook attempt of ``job_id``."""
        return await asyncio.to_thread(self.store.attempts, job_id)

    async def position(self, job: JobRecord) -> int:
        """Where ``job`` stands in the queue of its kind (0: running or ended)."""
        return await asyncio.to_thread(self.store.position, job)

    async def queue_lengths(self) -> dict[str, dict[str, int]]:
        """Requests of unfinished jobs by kind: ``{"text": {"queued", "running"}}``."""
        return await asyncio.to_thread(self.store.queue_lengths)

    # Files

    async def upload(
        self, *, owner: str, filename: str, purpose: str, chunks: AsyncIterator[bytes]
    ) -> FileRecord:
        """Store an uploaded file read from ``chunks``.

        Raises ``RequestTooLargeError`` beyond ``max_file_bytes`` and ``StorageQuotaError``
        beyond the key's storage.
        """
        await self._check_quota(owner, 0)
        data = bytearray()
        async for chunk in chunks:
            data.extend(chunk)
            if len(data) > self.limits.max_file_bytes:
                raise RequestTooLargeError(
                    limit=self.limits.max_file_bytes, setting="JOB_MAX_FILE_BYTES", what="file"
                )
        await self._check_quota(owner, len(data))
        file = FileRecord(
            id=new_id("file-"),
            owner=owner,
            purpose=purpose,
            filename=filename,
            bytes=len(data),
            created_at=datetime.now(UTC),
            expires_at=None,
            job_id=None,
        )
        await asyncio.to_thread(self.files.write_file, file.id, [bytes(data)])
        await asyncio.to_thread(self.store.add_file, file)
        return file

    async def file(self, file_id: str, *, owner: str) -> FileRecord:
        """``owner``'s file ``file_id``; ``NotFoundError`` otherwise."""
        file = await asyncio.to_thread(self.store.get_file, file_id)
        if file is None or file.owner != owner:
            raise NotFoundError("file", file_id)
        return file

    async def file_content(self, file: FileRecord) -> bytes:
        """The bytes of ``file``; ``NotFoundError`` when they are gone from disk."""
        path = self.files.file_path(file.id)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFoundError("file", file.id) from None

    async def list_files(
        self, *, owner: str, purpose: str | None, limit: int, after: str | None
    ) -> tuple[list[FileRecord], bool]:
        """``owner``'s files, newest first, and whether more follow."""
        files = await asyncio.to_thread(
            self.store.list_files, owner=owner, purpose=purpose, limit=limit + 1, after=after
        )
        if files is None:
            raise _unknown_cursor("file", after)
        return files[:limit], len(files) > limit

    async def delete_file(self, file_id: str, *, owner: str) -> None:
        """Delete ``owner``'s file (its bytes and its row)."""
        await self.file(file_id, owner=owner)
        await asyncio.to_thread(self.store.delete_file, file_id)
        await asyncio.to_thread(self.files.delete_file, file_id)


def _unknown_cursor(what: str, after: str | None) -> InvalidRequestError:
    return InvalidRequestError(
        f"after: no {what} '{after}' of this API key to page on from (it may have expired); "
        "start again without after.",
        param="after",
    )
