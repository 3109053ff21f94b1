"""``JobRunner``: runs the requests of durable jobs beside interactive traffic, and delivers
their webhooks.

One loop per server process claims queued requests from the store (:mod:`.store`) under a
lease, runs each through the API layer's :class:`JobExecutor` (the same code as the
interactive routes, with the batch priority), and records each outcome in one transaction with
the job's counts. What survives a crash: a request finished is never redone (its outcome was
committed with its status); a request running when its server died is queued again once its
lease runs out (``JOB_LEASE_S``) and runs from the start; an event not yet delivered is sent
after the restart with the same ``webhook-id``.

At most ``text_concurrency`` text and ``image_concurrency`` image requests of jobs run at once
in a process: text requests below ``max_num_seqs`` leave the engine room for interactive ones
(which vLLM's priority scheduling also serves first); image requests wait for the renderer
behind every interactive request (the render queue's priority).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from fictures_ai.services.jobs.files import JobFiles
from fictures_ai.services.jobs.store import (
    ClaimedRequest,
    DeliveryRecord,
    FileRecord,
    JobKind,
    JobRecord,
    JobRequestRecord,
    JobStatus,
    JobStore,
    RequestStatus,
    WebhookEvent,
    new_id,
)
from fictures_ai.services.jobs.webhooks import WebhookSender

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called with (step, total steps) as an image request renders."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestOutcome:
    """What running one request of a job gave."""

    status: RequestStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    result_bytes: int = 0
    """Bytes the result keeps on disk (images), counted against the owner's storage."""
    retry_after_s: float | None = None
    """Set for a transient failure (the model loading, the engine full, a replica lost): the
    request is queued again and runs after this many seconds, up to ``MAX_ATTEMPTS`` runs;
    then ``error`` is its outcome."""


MAX_ATTEMPTS = 5
"""Runs of one request that met transient failures before it fails for good."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputFile:
    """A file a finished job produces (a batch's output or error file)."""

    record: FileRecord
    content: bytes


class JobExecutor(Protocol):
    """What the API layer provides: how to run a request, and how a surface reports a job."""

    async def execute(
        self, job: JobRecord, request: JobRequestRecord, *, progress: ProgressCallback
    ) -> RequestOutcome:
        """Run ``request`` of ``job``; failures are outcomes (``failed``), not exceptions.
        Cancellation (the job was cancelled, or the server stops) raises
        ``asyncio.CancelledError`` as usual."""
        ...

    def output_files(self, job: JobRecord, requests: list[JobRequestRecord]) -> list[OutputFile]:
        """The files ``job`` leaves once every request finished (none for Fictures jobs)."""
        ...

    def job_event(self, job: JobRecord, status: JobStatus) -> WebhookEvent:
        """The webhook event telling that ``job`` ended with ``status``."""
        ...

    def progress_event(
        self, job: JobRecord, request: JobRequestRecord, status: str
    ) -> WebhookEvent:
        """The webhook event telling that ``request`` of ``job`` finished with ``status``."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRunnerOptions:
    """How the runner paces itself (the ``JOB_*`` and ``WEBHOOK_*`` settings)."""

    text_concurrency: int = 4
    image_concurrency: int = 1
    lease_s: float = 30.0
    poll_s: float = 1.0
    result_ttl_s: float = 7 * 86400.0
    webhook_max_attempts: int = 12
    webhook_concurrency: int = 8


class JobRunner:
    """Runs jobs' requests from the store and delivers their webhooks (see the module)."""

    def __init__(
        self,
        *,
        store: JobStore,
        files: JobFiles,
        executor: JobExecutor,
        webhooks: WebhookSender | None,
        options: JobRunnerOptions,
        kinds: tuple[JobKind, ...],
    ) -> None:
        """``kinds``: the kinds of request this process can run (its generation mode)."""
        self.store = store
        self.files = files
        self._executor = executor
        self._webhooks = webhooks
        self._options = options
        self._kinds = kinds
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{new_id('')[:8]}"
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._kind_of: dict[str, JobKind] = {}
        self._paused_until: dict[str, float] = {}
        """Kinds not claimed before this monotonic time (a transient failure's Retry-After)."""
        self._cancelled_jobs: set[str] = set()
        self._progress: dict[str, dict[int, tuple[int, int]]] = {}
        self._deliveries: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self.queue_lengths: dict[str, dict[str, int]] = {}
        """Requests of unfinished jobs by kind (``{"text": {"queued": n, "running": n}}``),
        as of the loop's last look: ``/health`` reads it without touching the database."""

    # Called by the API

    def wake(self) -> None:
        """Look for work now (a job was created or cancelled) rather than at the next poll."""
        self._wake.set()

    def progress(self, job_id: str) -> dict[int, tuple[int, int]]:
        """The (step, total steps) of each image request of ``job_id`` rendering here now."""
        return dict(self._progress.get(job_id, {}))

    def running(self) -> dict[str, int]:
        """Requests of jobs running in this process, by kind."""
        counts: dict[str, int] = {}
        for job_id, _ in self._tasks:
            kind = self._kind_of.get(job_id)
            if kind is not None:
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    async def cancel(self, job_id: str) -> JobRecord | None:
        """Cancel ``job_id``: queued requests at once, running ones here at their next step
        (in another server at its next lease renewal). None when there is no such job."""
        job = await asyncio.to_thread(self.store.request_cancel, job_id)
        if job is not None and job.status == "cancelling":
            self._stop_requests_of(job_id)
            self.wake()
        return job

    async def delete_job(self, job: JobRecord) -> None:
        """Delete a finished job with its results, images and output files."""
        for file_id in (job.output_file_id, job.error_file_id):
            if file_id is not None:
                await asyncio.to_thread(self.files.delete_file, file_id)
        await asyncio.to_thread(self.files.delete_job, job.id)
        await asyncio.to_thread(self.store.delete_job, job.id)

    # The loop

    async def run(self) -> None:
        """Run until cancelled: claim, renew, finish jobs, deliver webhooks, clean up.

        On cancellation (shutdown) the requests running here are stopped and queued again:
        they run from the start on the next start (or on another server).
        """
        logger.info("Job runner %s started (%s)", self.worker, ", ".join(self._kinds))
        # The first round queues again what a previous run of this server left running.
        last_renew = last_cleanup = time.monotonic()
        last_requeue = -math.inf
        failing = False
        try:
            while True:
                now = time.monotonic()
                try:
                    if now - last_renew >= self._options.lease_s / 3:
                        await self._renew()
                        last_renew = now
                    if now - last_requeue >= self._options.lease_s / 2:
                        await asyncio.to_thread(self.store.requeue_expired)
                        last_requeue = now
                    if now - last_cleanup >= 60:
                        await self._clean_up()
                        last_cleanup = now
                    await self._claim()
                    await self._finish_jobs()
                    await self._deliver()
                    self.queue_lengths = await asyncio.to_thread(self.store.queue_lengths)
                    if failing:
                        logger.info("Job runner: the database answers again")
                        failing = False
                except (SQLAlchemyError, OSError) as exc:  # the database or the disk is away
                    if not failing:
                        logger.error("Job runner: %s; retrying every %g s", exc, 5.0)
                        failing = True
                    await asyncio.sleep(5.0)
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._options.poll_s)
        finally:
            await self._stop()

    async def _stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values()) + list(self._deliveries.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.release, worker=self.worker)
        if self._webhooks is not None:
            await self._webhooks.aclose()

    async def _claim(self) -> None:
        limits = {"text": self._options.text_concurrency, "images": self._options.image_concurrency}
        for kind in self._kinds:
            if self._paused_until.get(kind, 0.0) > time.monotonic():
                continue
            busy = sum(1 for job_id, _ in self._tasks if self._kind_of.get(job_id) == kind)
            free = limits[kind] - busy
            if free <= 0:
                continue
            claimed = await asyncio.to_thread(
                self.store.claim,
                kind=kind,
                limit=free,
                worker=self.worker,
                lease_s=self._options.lease_s,
            )
            for item in claimed:
                key = (item.job.id, item.request.index)
                self._kind_of[item.job.id] = item.job.kind
                self._tasks[key] = asyncio.create_task(
                    self._run_request(item), name=f"job {key[0]}#{key[1]}"
                )

    async def _run_request(self, claimed: ClaimedRequest) -> None:
        job, request = claimed.job, claimed.request
        steps = self._progress.setdefault(job.id, {})

        def progress(step: int, total: int) -> None:
            steps[request.index] = (step, total)

        try:
            try:
                outcome = await self._executor.execute(job, request, progress=progress)
            except asyncio.CancelledError:
                if self._stopping or job.id not in self._cancelled_jobs:
                    raise
                outcome = RequestOutcome(
                    status="cancelled",
                    error={"code": "cancelled", "message": "The job was cancelled."},
                )
            except Exception as exc:  # the executor turns every error it knows into outcomes
                logger.error("Job %s request %d failed", job.id, request.index, exc_info=exc)
                outcome = RequestOutcome(
                    status="failed",
                    error={"code": "internal_error", "message": "The server failed on it."},
                )
            if outcome.retry_after_s is not None and request.attempts < MAX_ATTEMPTS:
                logger.info(
                    "Job %s request %d: %s; queued again (attempt %d of %d)",
                    job.id,
                    request.index,
                    (outcome.error or {}).get("detail") or outcome.error,
                    request.attempts,
                    MAX_ATTEMPTS,
                )
                self._paused_until[job.kind] = time.monotonic() + outcome.retry_after_s
                await asyncio.to_thread(
                    self.store.requeue, job_id=job.id, index=request.index, worker=self.worker
                )
                return
            event = (
                self._executor.progress_event(job, request, outcome.status)
                if job.webhook_progress and job.webhook_url
                else None
            )
            recorded = await asyncio.to_thread(
                self.store.finish_request,
                job_id=job.id,
                index=request.index,
                worker=self.worker,
                status=outcome.status,
                result=outcome.result,
                error=outcome.error,
                result_bytes=outcome.result_bytes,
                progress_event=event,
            )
            if not recorded:
                logger.warning(
                    "Job %s request %d: its lease ran out before it finished here; another "
                    "server runs it (JOB_LEASE_S may be too short)",
                    job.id,
                    request.index,
                )
        finally:
            steps.pop(request.index, None)
            if not steps:
                self._progress.pop(job.id, None)
            self._tasks.pop((job.id, request.index), None)
            if not self._stopping:
                self.wake()

    def _stop_requests_of(self, job_id: str) -> None:
        self._cancelled_jobs.add(job_id)
        for (running_job, _), task in list(self._tasks.items()):
            if running_job == job_id:
                task.cancel()

    async def _renew(self) -> None:
        if not self._tasks:
            return
        cancelling = await asyncio.to_thread(
            self.store.renew, worker=self.worker, lease_s=self._options.lease_s
        )
        for job_id in cancelling:  # cancelled through another server
            self._stop_requests_of(job_id)

    async def _finish_jobs(self) -> None:
        for job in await asyncio.to_thread(self.store.unfinished_without_work):
            status = _final_status(job)
            requests = await asyncio.to_thread(self.store.requests, job.id)
            outputs = self._executor.output_files(job, requests)
            for output in outputs:
                await asyncio.to_thread(self.files.write_file, output.record.id, [output.content])
            finished = await asyncio.to_thread(
                self.store.finish_job,
                job.id,
                status=status,
                files=[output.record for output in outputs],
                event=self._executor.job_event(job, status) if job.webhook_url else None,
            )
            if finished is not None:
                self._cancelled_jobs.discard(job.id)
                self._kind_of.pop(job.id, None)
                logger.info(
                    "Job %s %s: %d completed, %d failed, %d cancelled of %d",
                    job.id,
                    status,
                    finished.completed,
                    finished.failed,
                    finished.cancelled,
                    finished.total,
                )

    async def _deliver(self) -> None:
        if self._webhooks is None:
            return
        room = self._options.webhook_concurrency - len(self._deliveries)
        if room <= 0:
            return
        for delivery in await asyncio.to_thread(self.store.due_deliveries, limit=room * 2):
            if delivery.id in self._deliveries or len(self._deliveries) >= room:
                continue
            self._deliveries[delivery.id] = asyncio.create_task(
                self._deliver_one(delivery), name=f"webhook {delivery.id}"
            )

    async def _deliver_one(self, delivery: DeliveryRecord) -> None:
        assert self._webhooks is not None
        try:
            attempt = await self._webhooks.send(
                delivery.url, webhook_id=delivery.id, payload=delivery.payload.encode()
            )
            number = delivery.attempts + 1
            retry = not attempt.delivered and number < self._options.webhook_max_attempts
            next_at = (
                datetime.now(UTC) + timedelta(seconds=self._webhooks.retry_delay(number))
                if retry
                else None
            )
            if not attempt.delivered and not retry:
                logger.warning(
                    "Webhook %s (%s of job %s) not delivered after %d attempts: giving up",
                    delivery.id,
                    delivery.event_type,
                    delivery.job_id,
                    number,
                )
            await asyncio.to_thread(
                self.store.record_attempt,
                delivery,
                attempted_at=attempt.attempted_at,
                duration_ms=round(attempt.duration_s * 1000),
                status_code=attempt.status_code,
                error=attempt.error,
                delivered=attempt.delivered,
                next_attempt_at=next_at,
            )
        finally:
            self._deliveries.pop(delivery.id, None)
            if not self._stopping:
                self.wake()

    async def _clean_up(self) -> None:
        """Delete jobs whose results expired, with their images and output files, and
        uploaded files past their expiry."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self._options.result_ttl_s)
        for job in await asyncio.to_thread(self.store.expired_jobs, finished_before=cutoff):
            await self.delete_job(job)
            logger.info("Job %s expired: its results were deleted", job.id)
        for file in await asyncio.to_thread(self.store.expired_files, now=datetime.now(UTC)):
            await asyncio.to_thread(self.files.delete_file, file.id)
            await asyncio.to_thread(self.store.delete_file, file.id)


def _final_status(job: JobRecord) -> JobStatus:
    """A cancelled job ends ``cancelled``; a Fictures job none of whose requests succeeded
    ``failed``; every other job ``completed`` (OpenAI's batches complete even when every line
    failed: the lines are in the error file)."""
    if job.cancel_requested_at is not None:
        return "cancelled"
    if job.api == "fictures" and job.completed == 0 and job.failed > 0:
        return "failed"
    return "completed"
