"""Jobs, their requests, webhook deliveries and files in the server's own database.

Tables (all named with :data:`~fictures_ai.database.TABLE_PREFIX`, in ``DATABASE_URL``'s
database: an SQLite file by default, PostgreSQL with ``postgresql://``; the same code path):

- ``fictures_ai_jobs``: one row per job (``/api/v1/jobs``) or batch (``/v1/batches``).
- ``fictures_ai_job_requests``: one row per request of a job, with its body and, once it
  finished, its result or error. A request moves ``queued`` → ``running`` (claimed by one
  worker, under a lease) → ``completed``, ``failed`` or ``cancelled``. Its result and its
  final status are written in one transaction, so a request has exactly one result however the
  server stops; a ``running`` request whose lease ran out (its server died) is queued again.
- ``fictures_ai_webhook_deliveries`` and ``fictures_ai_webhook_attempts``: each event to send
  (created in the transaction that changes the job) and every attempt to send it.
- ``fictures_ai_files``: files of the OpenAI Files API (uploads and batch output); their bytes
  live on disk (:mod:`.files`).

Every method blocks on the database: async code calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    and_,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from fictures_ai.database import (
    TABLE_PREFIX,
    create_database_engine,
    masked,
    normalise_url,
    sqlite_file,
)
from fictures_ai.services.keys.info import aware

logger = logging.getLogger(__name__)

JobApi = Literal["fictures", "openai"]
JobKind = Literal["text", "images"]
JobStatus = Literal["queued", "running", "cancelling", "completed", "failed", "cancelled"]
RequestStatus = Literal["queued", "running", "completed", "failed", "cancelled"]

UNFINISHED: tuple[JobStatus, ...] = ("queued", "running", "cancelling")
"""Job statuses that still have work (or its end) ahead."""
FINISHED_REQUEST: tuple[RequestStatus, ...] = ("completed", "failed", "cancelled")


class _Base(DeclarativeBase):
    pass


class _JobRow(_Base):
    __tablename__ = f"{TABLE_PREFIX}jobs"
    __table_args__ = (Index(f"ix_{TABLE_PREFIX}jobs_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(255))
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    status: Mapped[str] = mapped_column(String(16), index=True)
    total: Mapped[int] = mapped_column(Integer)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    cancelled: Mapped[int] = mapped_column(Integer, default=0)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_progress: Mapped[bool] = mapped_column(Boolean, default=False)
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON(none_as_null=True))
    base_url: Mapped[str] = mapped_column(Text)
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    completion_window: Mapped[str | None] = mapped_column(String(16))
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class _RequestRow(_Base):
    __tablename__ = f"{TABLE_PREFIX}job_requests"
    __table_args__ = (Index(f"ix_{TABLE_PREFIX}job_requests_claim", "status", "kind"),)

    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey(f"{TABLE_PREFIX}jobs.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column("idx", Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    custom_id: Mapped[str | None] = mapped_column(String(512))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    worker: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class _DeliveryRow(_Base):
    __tablename__ = f"{TABLE_PREFIX}webhook_deliveries"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(64), ForeignKey(f"{TABLE_PREFIX}jobs.id", ondelete="CASCADE"), index=True
    )
    event_type: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _AttemptRow(_Base):
    __tablename__ = f"{TABLE_PREFIX}webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        String(64),
        ForeignKey(f"{TABLE_PREFIX}webhook_deliveries.id", ondelete="CASCADE"),
        index=True,
    )
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    attempted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    delivered: Mapped[bool] = mapped_column(Boolean)


class _FileRow(_Base):
    __tablename__ = f"{TABLE_PREFIX}files"
    __table_args__ = (Index(f"ix_{TABLE_PREFIX}files_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    job_id: Mapped[str | None] = mapped_column(String(64))


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    """One job or batch as stored (counts include every finished request)."""

    id: str
    api: JobApi
    kind: JobKind
    endpoint: str
    """The route each request goes to (``/api/v1/text/generate``, ``/v1/chat/completions``)."""
    owner: str
    """The client id of the key that created it (``key:local:3``)."""
    allowed_models: tuple[str, ...] | None
    """The key's model allow-list when the job was created (None: every model)."""
    status: JobStatus
    total: int
    completed: int
    failed: int
    cancelled: int
    webhook_url: str | None
    webhook_progress: bool
    metadata: dict[str, Any] | None
    base_url: str
    input_file_id: str | None
    output_file_id: str | None
    error_file_id: str | None
    completion_window: str | None
    stored_bytes: int
    created_at: datetime
    started_at: datetime | None
    cancel_requested_at: datetime | None
    finished_at: datetime | None

    @property
    def done(self) -> int:
        """Requests that finished, whatever their outcome."""
        return self.completed + self.failed + self.cancelled

    @property
    def finished(self) -> bool:
        """Whether the job reached its final status."""
        return self.status not in UNFINISHED


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRequestRecord:
    """One request of a job: its body and, once finished, its result or error."""

    job_id: str
    index: int
    kind: JobKind
    custom_id: str | None
    body: dict[str, Any]
    status: RequestStatus
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewJob:
    """What the API hands the store to create a job (its requests are validated already)."""

    api: JobApi
    kind: JobKind
    endpoint: str
    owner: str
    allowed_models: tuple[str, ...] | None
    requests: Sequence[tuple[str | None, dict[str, Any]]]
    """``(custom_id, body)`` per request, in order."""
    base_url: str
    webhook_url: str | None = None
    webhook_progress: bool = False
    metadata: dict[str, Any] | None = None
    input_file_id: str | None = None
    completion_window: str | None = None
    id_prefix: str = "job_"


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookEvent:
    """An event to deliver, created with the change it reports (same transaction)."""

    event_type: str
    payload: str
    """The exact JSON text to send (signed and sent as UTF-8)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRecord:
    """A webhook event and where its delivery stands."""

    id: str
    """The ``webhook-id`` header: the same on every attempt."""
    job_id: str
    event_type: str
    url: str
    payload: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptRecord:
    """One attempt to deliver a webhook event."""

    delivery_id: str
    event_type: str
    attempted_at: datetime
    duration_ms: int
    status_code: int | None
    error: str | None
    delivered: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRecord:
    """A file of the Files API (its bytes are on disk)."""

    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: datetime
    expires_at: datetime | None
    job_id: str | None


@dataclass(frozen=True, slots=True)
class ClaimedRequest:
    """A request this worker now runs, with its job."""

    job: JobRecord
    request: JobRequestRecord


def new_id(prefix: str) -> str:
    """A random id with ``prefix`` (``job_``, ``batch_``, ``file-``, ``msg_``): 128 bits."""
    return f"{prefix}{secrets.token_hex(16)}"


def _now() -> datetime:
    return datetime.now(UTC)


def _opt(moment: datetime | None) -> datetime | None:
    return aware(moment) if moment is not None else None


def _job(row: _JobRow) -> JobRecord:
    return JobRecord(
        id=row.id,
        api=row.api,  # type: ignore[arg-type]
        kind=row.kind,  # type: ignore[arg-type]
        endpoint=row.endpoint,
        owner=row.owner,
        allowed_models=tuple(row.allowed_models) if row.allowed_models is not None else None,
        status=row.status,  # type: ignore[arg-type]
        total=row.total,
        completed=row.completed,
        failed=row.failed,
        cancelled=row.cancelled,
        webhook_url=row.webhook_url,
        webhook_progress=row.webhook_progress,
        metadata=row.job_metadata,
        base_url=row.base_url,
        input_file_id=row.input_file_id,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        completion_window=row.completion_window,
        stored_bytes=row.stored_bytes,
        created_at=aware(row.created_at),
        started_at=_opt(row.started_at),
        cancel_requested_at=_opt(row.cancel_requested_at),
        finished_at=_opt(row.finished_at),
    )


def _request(row: _RequestRow) -> JobRequestRecord:
    return JobRequestRecord(
        job_id=row.job_id,
        index=row.index,
        kind=row.kind,  # type: ignore[arg-type]
        custom_id=row.custom_id,
        body=row.body,
        status=row.status,  # type: ignore[arg-type]
        result=row.result,
        error=row.error,
        attempts=row.attempts,
        started_at=_opt(row.started_at),
        finished_at=_opt(row.finished_at),
    )


def _delivery(row: _DeliveryRow) -> DeliveryRecord:
    return DeliveryRecord(
        id=row.id,
        job_id=row.job_id,
        event_type=row.event_type,
        url=row.url,
        payload=row.payload,
        status=row.status,  # type: ignore[arg-type]
        attempts=row.attempts,
        next_attempt_at=aware(row.next_attempt_at),
        created_at=aware(row.created_at),
    )


def _file(row: _FileRow) -> FileRecord:
    return FileRecord(
        id=row.id,
        owner=row.owner,
        purpose=row.purpose,
        filename=row.filename,
        bytes=row.bytes,
        created_at=aware(row.created_at),
        expires_at=_opt(row.expires_at),
        job_id=row.job_id,
    )


def _file_row(file: FileRecord) -> _FileRow:
    return _FileRow(
        id=file.id,
        owner=file.owner,
        purpose=file.purpose,
        filename=file.filename,
        bytes=file.bytes,
        created_at=file.created_at,
        expires_at=file.expires_at,
        job_id=file.job_id,
    )


class JobStore:
    """The jobs tables of the server's database (see the module docstring)."""

    def __init__(self, *, database_url: str) -> None:
        """Open (lazily) the database at ``database_url`` (``DATABASE_URL``).

        Raises ``sqlalchemy.exc.ArgumentError`` when it is not a supported database URL.
        """
        self._url = normalise_url(database_url)
        self._engine = create_database_engine(self._url)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._prepared = False
        self._prepare_lock = threading.Lock()

    @property
    def database_url(self) -> str:
        """The database URL, password masked (safe to log)."""
        return masked(self._url)

    def prepare(self) -> None:
        """Create the tables (and an SQLite file's folder) when missing; idempotent."""
        with self._prepare_lock:
            if self._prepared:
                return
            database_file = sqlite_file(self._url)
            if database_file is not None:
                database_file.parent.mkdir(parents=True, exist_ok=True)
            _Base.metadata.create_all(self._engine)
            self._prepared = True

    def close(self) -> None:
        """Close the pooled connections."""
        self._engine.dispose()

    # Jobs

    def create_job(self, job: NewJob) -> JobRecord:
        """Store ``job`` and its requests (all ``queued``) in one transaction."""
        self.prepare()
        now = _now()
        row = _JobRow(
            id=new_id(job.id_prefix),
            api=job.api,
            kind=job.kind,
            endpoint=job.endpoint,
            owner=job.owner,
            allowed_models=list(job.allowed_models) if job.allowed_models is not None else None,
            status="queued",
            total=len(job.requests),
            completed=0,
            failed=0,
            cancelled=0,
            webhook_url=job.webhook_url,
            webhook_progress=job.webhook_progress,
            job_metadata=job.metadata,
            base_url=job.base_url,
            input_file_id=job.input_file_id,
            completion_window=job.completion_window,
            stored_bytes=0,
            created_at=now,
        )
        with self._sessions.begin() as session:
            session.add(row)
            session.flush()
            session.add_all(
                _RequestRow(
                    job_id=row.id,
                    index=index,
                    kind=job.kind,
                    custom_id=custom_id,
                    body=body,
                    status="queued",
                    attempts=0,
                    result_bytes=0,
                )
                for index, (custom_id, body) in enumerate(job.requests)
            )
        return _job(row)

    def get_job(self, job_id: str) -> JobRecord | None:
        """The job ``job_id``, or None."""
        self.prepare()
        with self._sessions() as session:
            row = session.get(_JobRow, job_id)
            return _job(row) if row is not None else None

    def list_jobs(
        self, *, owner: str, api: JobApi, limit: int, after: str | None = None
    ) -> list[JobRecord] | None:
        """``owner``'s jobs of ``api``, newest first; ``after`` (an id of theirs) pages on.
        None when ``after`` is not one of those jobs."""
        self.prepare()
        query = select(_JobRow).where(_JobRow.owner == owner, _JobRow.api == api)
        with self._sessions() as session:
            if after is not None:
                anchor = session.get(_JobRow, after)
                if anchor is None or anchor.owner != owner or anchor.api != api:
                    return None
                query = query.where(
                    (_JobRow.created_at < anchor.created_at)
                    | and_(_JobRow.created_at == anchor.created_at, _JobRow.id < anchor.id)
                )
            query = query.order_by(_JobRow.created_at.desc(), _JobRow.id.desc()).limit(limit)
            return [_job(row) for row in session.scalars(query)]

    def requests(self, job_id: str) -> list[JobRequestRecord]:
        """The requests of ``job_id`` in order."""
        self.prepare()
        with self._sessions() as session:
            query = select(_RequestRow).where(_RequestRow.job_id == job_id)
            return [_request(row) for row in session.scalars(query.order_by(_RequestRow.index))]

    def active_jobs(self, owner: str) -> int:
        """How many of ``owner``'s jobs are unfinished."""
        self.prepare()
        with self._sessions() as session:
            query = select(func.count()).where(
                _JobRow.owner == owner, _JobRow.status.in_(UNFINISHED)
            )
            return int(session.scalar(query) or 0)

    def stored_bytes(self, owner: str) -> int:
        """Bytes ``owner`` keeps here: files and job results."""
        self.prepare()
        with self._sessions() as session:
            files = session.scalar(select(func.sum(_FileRow.bytes)).where(_FileRow.owner == owner))
            jobs = session.scalar(
                select(func.sum(_JobRow.stored_bytes)).where(_JobRow.owner == owner)
            )
            return int(files or 0) + int(jobs or 0)

    def position(self, job: JobRecord) -> int:
        """1 + the unfinished jobs of the same kind created before ``job`` (0 once it runs or
        ended): where it stands in the queue."""
        if job.status != "queued":
            return 0
        self.prepare()
        with self._sessions() as session:
            ahead = session.scalar(
                select(func.count()).where(
                    _JobRow.kind == job.kind,
                    _JobRow.status.in_(UNFINISHED),
                    (_JobRow.created_at < job.created_at)
                    | and_(_JobRow.created_at == job.created_at, _JobRow.id < job.id),
                )
            )
            return int(ahead or 0) + 1

    def queue_lengths(self) -> dict[str, dict[str, int]]:
        """Requests of unfinished jobs by kind and status: ``{"text": {"queued": n,
        "running": n}, ...}``."""
        self.prepare()
        lengths: dict[str, dict[str, int]] = {}
        with self._sessions() as session:
            rows = session.execute(
                select(_RequestRow.kind, _RequestRow.status, func.count())
                .where(_RequestRow.status.in_(("queued", "running")))
                .group_by(_RequestRow.kind, _RequestRow.status)
            )
            for kind, status, count in rows:
                lengths.setdefault(kind, {"queued": 0, "running": 0})[status] = int(count)
        return lengths

    # Running requests

    def claim(
        self, *, kind: JobKind, limit: int, worker: str, lease_s: float
    ) -> list[ClaimedRequest]:
        """Mark up to ``limit`` queued requests of ``kind`` as run by ``worker`` (oldest job
        first, then in order) under a lease of ``lease_s`` seconds.

        A request goes to one worker only: the update is conditional on its still being
        queued, so two servers on one database never run the same request.
        """
        if limit <= 0:
            return []
        self.prepare()
        now = _now()
        lease = now + timedelta(seconds=lease_s)
        claimed: list[ClaimedRequest] = []
        with self._sessions.begin() as session:
            candidates = session.execute(
                select(_RequestRow.job_id, _RequestRow.index)
                .join(_JobRow, _JobRow.id == _RequestRow.job_id)
                .where(
                    _RequestRow.status == "queued",
                    _RequestRow.kind == kind,
                    _JobRow.status.in_(("queued", "running")),
                )
                .order_by(_JobRow.created_at, _JobRow.id, _RequestRow.index)
                .limit(limit)
            ).all()
            for job_id, index in candidates:
                taken = session.execute(
                    update(_RequestRow)
                    .where(
                        _RequestRow.job_id == job_id,
                        _RequestRow.index == index,
                        _RequestRow.status == "queued",
                    )
                    .values(
                        status="running",
                        worker=worker,
                        lease_until=lease,
                        started_at=now,
                        attempts=_RequestRow.attempts + 1,
                    )
                )
                if taken.rowcount != 1:  # type: ignore[attr-defined]
                    continue
                session.execute(
                    update(_JobRow)
                    .where(_JobRow.id == job_id, _JobRow.status == "queued")
                    .values(status="running", started_at=now)
                )
                job = session.get(_JobRow, job_id)
                request = session.get(_RequestRow, (job_id, index))
                if job is not None and request is not None:
                    session.refresh(job)
                    session.refresh(request)
                    claimed.append(ClaimedRequest(_job(job), _request(request)))
        return claimed

    def renew(self, *, worker: str, lease_s: float) -> set[str]:
        """Extend the lease of every request ``worker`` runs; return the ids of their jobs
        that are being cancelled (their running requests must stop)."""
        self.prepare()
        lease = _now() + timedelta(seconds=lease_s)
        with self._sessions.begin() as session:
            session.execute(
                update(_RequestRow)
                .where(_RequestRow.worker == worker, _RequestRow.status == "running")
                .values(lease_until=lease)
            )
            cancelling = session.scalars(
                select(_JobRow.id)
                .join(_RequestRow, _RequestRow.job_id == _JobRow.id)
                .where(
                    _RequestRow.worker == worker,
                    _RequestRow.status == "running",
                    _JobRow.status == "cancelling",
                )
                .distinct()
            )
            return set(cancelling)

    def requeue_expired(self) -> int:
        """Queue again the running requests whose lease ran out (their worker stopped without
        finishing them); return how many."""
        self.prepare()
        with self._sessions.begin() as session:
            result = session.execute(
                update(_RequestRow)
                .where(_RequestRow.status == "running", _RequestRow.lease_until < _now())
                .values(status="queued", worker=None, lease_until=None)
            )
            count = int(result.rowcount or 0)  # type: ignore[attr-defined]
        if count:
            logger.info("Queued %d job requests again: the server running them stopped", count)
        return count

    def release(self, *, worker: str) -> None:
        """Queue again every request ``worker`` still runs (it is shutting down)."""
        self.prepare()
        with self._sessions.begin() as session:
            session.execute(
                update(_RequestRow)
                .where(_RequestRow.worker == worker, _RequestRow.status == "running")
                .values(status="queued", worker=None, lease_until=None)
            )

    def requeue(self, *, job_id: str, index: int, worker: str) -> None:
        """Give back a request ``worker`` runs (it met a transient error: the model was loading,
        the engine full): queued again, to run from the start."""
        self.prepare()
        with self._sessions.begin() as session:
            session.execute(
                update(_RequestRow)
                .where(
                    _RequestRow.job_id == job_id,
                    _RequestRow.index == index,
                    _RequestRow.status == "running",
                    _RequestRow.worker == worker,
                )
                .values(status="queued", worker=None, lease_until=None)
            )

    def finish_request(
        self,
        *,
        job_id: str,
        index: int,
        worker: str,
        status: RequestStatus,
        result: dict[str, Any] | None,
        error: dict[str, Any] | None,
        result_bytes: int = 0,
        progress_event: WebhookEvent | None = None,
    ) -> bool:
        """Record the outcome of a request ``worker`` ran, in one transaction with the job's
        counts (and its progress event). False when the request is no longer this worker's
        (its lease ran out and another took it): the outcome is dropped, nothing counts twice.
        """
        self.prepare()
        now = _now()
        with self._sessions.begin() as session:
            done = session.execute(
                update(_RequestRow)
                .where(
                    _RequestRow.job_id == job_id,
                    _RequestRow.index == index,
                    _RequestRow.status == "running",
                    _RequestRow.worker == worker,
                )
                .values(
                    status=status,
                    result=result,
                    error=error,
                    result_bytes=result_bytes,
                    finished_at=now,
                    lease_until=None,
                )
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                return False
            counter = {
                "completed": _JobRow.completed,
                "failed": _JobRow.failed,
                "cancelled": _JobRow.cancelled,
            }[status]
            session.execute(
                update(_JobRow)
                .where(_JobRow.id == job_id)
                .values(
                    {
                        counter: counter + 1,
                        _JobRow.stored_bytes: _JobRow.stored_bytes + result_bytes,
                    }
                )
            )
            job = session.get(_JobRow, job_id)
            if progress_event is not None and job is not None and job.webhook_url:
                self._add_delivery(session, job_id, job.webhook_url, progress_event, now)
        return True

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel ``job_id``: its queued requests become ``cancelled`` at once, the job
        ``cancelling`` until its running ones stop. A finished job is left as it is."""
        self.prepare()
        now = _now()
        with self._sessions.begin() as session:
            row = session.get(_JobRow, job_id, with_for_update=True)
            if row is None:
                return None
            if row.status in UNFINISHED and row.status != "cancelling":
                result = session.execute(
                    update(_RequestRow)
                    .where(_RequestRow.job_id == job_id, _RequestRow.status == "queued")
                    .values(
                        status="cancelled",
                        finished_at=now,
                        error={"code": "cancelled", "message": "The job was cancelled."},
                    )
                )
                row.cancelled += int(result.rowcount or 0)  # type: ignore[attr-defined]
                row.status = "cancelling"
                row.cancel_requested_at = now
            session.flush()
            return _job(row)

    def unfinished_without_work(self) -> list[JobRecord]:
        """Unfinished jobs none of whose requests is queued or running: ready to finish."""
        self.prepare()
        pending = (
            select(_RequestRow.job_id)
            .where(_RequestRow.status.in_(("queued", "running")))
            .scalar_subquery()
        )
        with self._sessions() as session:
            query = select(_JobRow).where(
                _JobRow.status.in_(UNFINISHED), _JobRow.id.not_in(pending)
            )
            return [_job(row) for row in session.scalars(query)]

    def finish_job(
        self,
        job_id: str,
        *,
        status: JobStatus,
        files: Iterable[FileRecord] = (),
        event: WebhookEvent | None = None,
    ) -> JobRecord | None:
        """Give the job its final ``status``, its output files and its webhook event, in one
        transaction; None when it had already finished (another server did it)."""
        self.prepare()
        now = _now()
        with self._sessions.begin() as session:
            row = session.get(_JobRow, job_id, with_for_update=True)
            if row is None or row.status not in UNFINISHED:
                return None
            for file in files:
                session.merge(_file_row(file))
                if file.purpose == "batch_output":
                    row.output_file_id = file.id
                elif file.purpose == "batch_error":
                    row.error_file_id = file.id
            row.status = status
            row.finished_at = now
            if event is not None and row.webhook_url:
                self._add_delivery(session, job_id, row.webhook_url, event, now)
            session.flush()
            return _job(row)

    def expired_jobs(self, *, finished_before: datetime) -> list[JobRecord]:
        """Jobs that finished before ``finished_before`` (their results have expired)."""
        self.prepare()
        with self._sessions() as session:
            query = select(_JobRow).where(
                _JobRow.finished_at.is_not(None), _JobRow.finished_at < finished_before
            )
            return [_job(row) for row in session.scalars(query)]

    def delete_job(self, job_id: str) -> None:
        """Delete the job, its requests, deliveries, attempts and output file rows."""
        self.prepare()
        with self._sessions.begin() as session:
            session.execute(delete(_AttemptRow).where(_AttemptRow.job_id == job_id))
            session.execute(delete(_DeliveryRow).where(_DeliveryRow.job_id == job_id))
            session.execute(delete(_RequestRow).where(_RequestRow.job_id == job_id))
            session.execute(delete(_FileRow).where(_FileRow.job_id == job_id))
            session.execute(delete(_JobRow).where(_JobRow.id == job_id))

    # Webhooks

    @staticmethod
    def _add_delivery(
        session: Session, job_id: str, url: str, event: WebhookEvent, now: datetime
    ) -> None:
        session.add(
            _DeliveryRow(
                id=new_id("msg_"),
                job_id=job_id,
                event_type=event.event_type,
                url=url,
                payload=event.payload,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )

    def due_deliveries(self, *, limit: int) -> list[DeliveryRecord]:
        """Pending deliveries whose next attempt is due, oldest first."""
        self.prepare()
        with self._sessions() as session:
            query = (
                select(_DeliveryRow)
                .where(_DeliveryRow.status == "pending", _DeliveryRow.next_attempt_at <= _now())
                .order_by(_DeliveryRow.created_at, _DeliveryRow.id)
                .limit(limit)
            )
            return [_delivery(row) for row in session.scalars(query)]

    def record_attempt(
        self,
        delivery: DeliveryRecord,
        *,
        attempted_at: datetime,
        duration_ms: int,
        status_code: int | None,
        error: str | None,
        delivered: bool,
        next_attempt_at: datetime | None,
    ) -> None:
        """Record one attempt; the delivery is done when ``delivered``, given up when
        ``next_attempt_at`` is None, else pending until then."""
        self.prepare()
        if delivered:
            status = "delivered"
        elif next_attempt_at is None:
            status = "failed"
        else:
            status = "pending"
        with self._sessions.begin() as session:
            session.add(
                _AttemptRow(
                    delivery_id=delivery.id,
                    job_id=delivery.job_id,
                    attempted_at=attempted_at,
                    duration_ms=duration_ms,
                    status_code=status_code,
                    error=error,
                    delivered=delivered,
                )
            )
            session.execute(
                update(_DeliveryRow)
                .where(_DeliveryRow.id == delivery.id)
                .values(
                    status=status,
                    attempts=_DeliveryRow.attempts + 1,
                    next_attempt_at=next_attempt_at or attempted_at,
                )
            )

    def deliveries(self, job_id: str) -> list[DeliveryRecord]:
        """Every webhook event of ``job_id``, oldest first."""
        self.prepare()
        with self._sessions() as session:
            query = (
                select(_DeliveryRow)
                .where(_DeliveryRow.job_id == job_id)
                .order_by(_DeliveryRow.created_at, _DeliveryRow.id)
            )
            return [_delivery(row) for row in session.scalars(query)]

    def attempts(self, job_id: str) -> list[AttemptRecord]:
        """Every webhook attempt of ``job_id``, oldest first."""
        self.prepare()
        with self._sessions() as session:
            query = (
                select(_AttemptRow, _DeliveryRow.event_type)
                .join(_DeliveryRow, _DeliveryRow.id == _AttemptRow.delivery_id)
                .where(_AttemptRow.job_id == job_id)
                .order_by(_AttemptRow.id)
            )
            return [
                AttemptRecord(
                    delivery_id=row.delivery_id,
                    event_type=event_type,
                    attempted_at=aware(row.attempted_at),
                    duration_ms=row.duration_ms,
                    status_code=row.status_code,
                    error=row.error,
                    delivered=row.delivered,
                )
                for row, event_type in session.execute(query)
            ]

    # Files

    def add_file(self, file: FileRecord) -> None:
        """Record an uploaded file (its bytes are on disk already)."""
        self.prepare()
        with self._sessions.begin() as session:
            session.add(_file_row(file))

    def get_file(self, file_id: str) -> FileRecord | None:
        """The file ``file_id``, or None."""
        self.prepare()
        with self._sessions() as session:
            row = session.get(_FileRow, file_id)
            return _file(row) if row is not None else None

    def list_files(
        self, *, owner: str, purpose: str | None, limit: int, after: str | None = None
    ) -> list[FileRecord] | None:
        """``owner``'s files (of ``purpose``), newest first; ``after`` (an id of theirs)
        pages on. None when ``after`` is not one of their files."""
        self.prepare()
        query = select(_FileRow).where(_FileRow.owner == owner)
        if purpose is not None:
            query = query.where(_FileRow.purpose == purpose)
        with self._sessions() as session:
            if after is not None:
                anchor = session.get(_FileRow, after)
                if anchor is None or anchor.owner != owner:
                    return None
                query = query.where(
                    (_FileRow.created_at < anchor.created_at)
                    | and_(_FileRow.created_at == anchor.created_at, _FileRow.id < anchor.id)
                )
            query = query.order_by(_FileRow.created_at.desc(), _FileRow.id.desc()).limit(limit)
            return [_file(row) for row in session.scalars(query)]

    def delete_file(self, file_id: str) -> bool:
        """Delete the file's row; False when there was none."""
        self.prepare()
        with self._sessions.begin() as session:
            result = session.execute(delete(_FileRow).where(_FileRow.id == file_id))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def expired_files(self, *, now: datetime) -> list[FileRecord]:
        """Files whose ``expires_at`` has passed."""
        self.prepare()
        with self._sessions() as session:
            query = select(_FileRow).where(
                _FileRow.expires_at.is_not(None), _FileRow.expires_at < now
            )
            return [_file(row) for row in session.scalars(query)]
