"""Durable jobs (/api/v1/jobs) and OpenAI batches (/v1/files, /v1/batches) over fake engines:
submission checks, results, cancellation, ownership, limits, and the store's exactly-once
bookkeeping (leases)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from standardwebhooks import Webhook

from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from fictures_ai.services.jobs.files import JobFiles
from fictures_ai.services.jobs.runner import (
    MAX_ATTEMPTS,
    JobRunner,
    JobRunnerOptions,
    RequestOutcome,
)
from fictures_ai.services.jobs.store import (
    JobRecord,
    JobRequestRecord,
    JobStore,
    NewJob,
    WebhookEvent,
)
from fictures_ai.services.jobs.webhooks import generate_webhook_secret
from fictures_ai.services.keys.local_store import ApiKeyService
from tests.unit.conftest import live_server, make_services
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine
from tests.webhook_receiver import webhook_receiver

PROMPT = {"prompt": "Once upon a time", "max_tokens": 8}
IMAGE_PROMPT = {"prompt": "a cat", "width": 256, "height": 256, "num_inference_steps": 2}


@pytest.fixture
def keys(tmp_path: Path) -> ApiKeyService:
    return ApiKeyService(database_url=f"sqlite:///{tmp_path}/keys.db")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=f"sqlite:///{tmp_path}/server.db",
        jobs_dir=tmp_path / "jobs",
        job_max_requests=20,
        job_max_active_per_key=3,
        job_image_concurrency=1,  # one image request of jobs at a time: tests read positions
    )


@pytest.fixture
async def server(
    settings: Settings, keys: ApiKeyService, engine: FakeTextEngine, image_engine: FakeImageEngine
) -> AsyncIterator[str]:
    app = create_app(
        services=make_services(engine, image_engine=image_engine, settings=settings, api_keys=keys)
    )
    async with live_server(app) as port:
        yield f"http://127.0.0.1:{port}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def wait_for(
    http: httpx.AsyncClient, path: str, key: str, done: tuple[str, ...], timeout: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        answer = (await http.get(path, headers=bearer(key))).json()
        if answer["status"] in done:
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"{path} still {answer['status']}: {answer}")
        await asyncio.sleep(0.05)


async def test_a_text_job_runs_every_request_and_lists_only_its_owners(
    server: str, keys: ApiKeyService
) -> None:
    _, writer = keys.create("writer", "stories:write")
    _, other = keys.create("other", "stories:write")
    async with httpx.AsyncClient(base_url=server) as http:
        created = await http.post(
            "/api/v1/jobs",
            json={"kind": "text", "requests": [PROMPT, {**PROMPT, "prompt": "Second"}]},
            headers=bearer(writer),
        )
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["status"] == "queued"
        assert job["position"] == 1
        assert created.headers["location"] == f"/api/v1/jobs/{job['id']}"
        done = await wait_for(http, f"/api/v1/jobs/{job['id']}", writer, ("completed",))
        assert done["progress"] == {
            "total": 2,
            "completed": 2,
            "failed": 0,
            "cancelled": 0,
            "running": [],
        }
        assert [r["status"] for r in done["results"]] == ["completed", "completed"]
        alone = await http.post("/api/v1/text/generate", json=PROMPT, headers=bearer(writer))
        assert done["results"][0]["result"]["text"] == alone.json()["text"]
        assert done["results"][0]["result"]["model"] == "fake-model"

        assert (
            await http.get(f"/api/v1/jobs/{job['id']}", headers=bearer(other))
        ).status_code == 404
        assert (
            await http.delete(f"/api/v1/jobs/{job['id']}", headers=bearer(other))
        ).status_code == 404
        mine = (await http.get("/api/v1/jobs", headers=bearer(writer))).json()
        assert [item["id"] for item in mine["data"]] == [job["id"]]
        assert "results" not in mine["data"][0] or mine["data"][0]["results"] is None
        assert (await http.get("/api/v1/jobs", headers=bearer(other))).json()["data"] == []


async def test_text_jobs_run_at_the_batch_priority(
    server: str, keys: ApiKeyService, engine: FakeTextEngine
) -> None:
    _, writer = keys.create("writer", "stories:write")
    async with httpx.AsyncClient(base_url=server) as http:
        job = (
            await http.post(
                "/api/v1/jobs", json={"kind": "text", "requests": [PROMPT]}, headers=bearer(writer)
            )
        ).json()
        await wait_for(http, f"/api/v1/jobs/{job['id']}", writer, ("completed",))
        await http.post("/api/v1/text/generate", json=PROMPT, headers=bearer(writer))
    assert [params.priority for _, params in engine.calls] == [1, 0]


async def test_bad_requests_refuse_the_job_with_their_index(
    server: str, keys: ApiKeyService
) -> None:
    _, writer = keys.create("writer", "stories:write")
    async with httpx.AsyncClient(base_url=server, headers=bearer(writer)) as http:
        out_of_range = await http.post(
            "/api/v1/jobs",
            json={"kind": "text", "requests": [PROMPT, {**PROMPT, "temperature": 9}]},
        )
        assert out_of_range.status_code == 400
        assert "requests[1].temperature" in out_of_range.json()["detail"]
        malformed = await http.post(
            "/api/v1/jobs", json={"kind": "text", "requests": [PROMPT, {"max_tokens": 3}, {}]}
        )
        assert malformed.status_code == 422
        where = [error["loc"] for error in malformed.json()["detail"]]
        assert ["body", "requests", 1, "prompt"] in where
        assert ["body", "requests", 2, "prompt"] in where
        unknown = await http.post(
            "/api/v1/jobs", json={"kind": "images", "requests": [{"prompt": "x", "model": "nope"}]}
        )
        assert unknown.status_code == 400
        assert "requests[0].model" in unknown.json()["detail"]
        too_many = await http.post("/api/v1/jobs", json={"kind": "text", "requests": [PROMPT] * 21})
        assert too_many.status_code == 400
        assert "JOB_MAX_REQUESTS" in too_many.json()["detail"]
        assert (await http.get("/api/v1/jobs")).json()["data"] == []  # nothing was created


async def test_webhooks_need_the_secret_and_a_public_address(
    server: str, keys: ApiKeyService
) -> None:
    _, writer = keys.create("writer", "stories:write")
    async with httpx.AsyncClient(base_url=server, headers=bearer(writer)) as http:
        answer = await http.post(
            "/api/v1/jobs",
            json={"kind": "text", "requests": [PROMPT], "webhook_url": "https://example.com/h"},
        )
        assert answer.status_code == 400
        assert "WEBHOOK_SECRET" in answer.json()["detail"]


async def test_active_jobs_per_key_are_limited(
    server: str, keys: ApiKeyService, image_engine: FakeImageEngine
) -> None:
    image_engine.step_delay = 0.05
    _, writer = keys.create("writer", "stories:write")
    _, reader = keys.create("reader", "stories:read")
    slow = {"prompt": "a cat", "num_inference_steps": 50}
    async with httpx.AsyncClient(base_url=server) as http:
        refused = await http.post(
            "/api/v1/jobs", json={"kind": "images", "requests": [slow]}, headers=bearer(reader)
        )
        assert refused.status_code == 403
        ids = []
        for _ in range(3):
            answer = await http.post(
                "/api/v1/jobs", json={"kind": "images", "requests": [slow]}, headers=bearer(writer)
            )
            assert answer.status_code == 202
            ids.append(answer.json()["id"])
        fourth = await http.post(
            "/api/v1/jobs", json={"kind": "images", "requests": [slow]}, headers=bearer(writer)
        )
        assert fourth.status_code == 429
        assert "JOB_MAX_ACTIVE_PER_KEY" in fourth.json()["detail"]
        assert fourth.headers["retry-after"]
        positions = [
            (await http.get(f"/api/v1/jobs/{job_id}", headers=bearer(writer))).json()["position"]
            for job_id in ids
        ]
        assert positions[1:] == [2, 3]
        await asyncio.sleep(1.5)  # the runner refreshes its counts every second
        queues = (await http.get("/health")).json()["queues"]["jobs"]
        assert queues == {"images": {"queued": 2, "running": 1}}
        for job_id in ids:
            await http.delete(f"/api/v1/jobs/{job_id}", headers=bearer(writer))


async def test_an_image_job_keeps_its_images_and_stops_when_cancelled(
    server: str, keys: ApiKeyService, image_engine: FakeImageEngine
) -> None:
    _, writer = keys.create("writer", "stories:write")
    async with httpx.AsyncClient(base_url=server, headers=bearer(writer)) as http:
        job = (
            await http.post(
                "/api/v1/jobs",
                json={"kind": "images", "requests": [{"prompt": "a cat", "seed": 7}]},
            )
        ).json()
        done = await wait_for(http, f"/api/v1/jobs/{job['id']}", writer, ("completed",))
        result = done["results"][0]["result"]
        assert result["seed"] == 7
        assert result["image_url"].startswith(f"{server}/api/v1/jobs/{job['id']}/images/")
        png = await http.get(result["image_url"], headers={})
        assert png.status_code == 200
        assert png.content.startswith(b"\x89PNG")
        assert (await http.get(result["image_url"] + "x")).status_code == 404

        image_engine.step_delay = 0.05
        slow = {"prompt": "a dog", "num_inference_steps": 100}
        job = (
            await http.post("/api/v1/jobs", json={"kind": "images", "requests": [slow] * 3})
        ).json()
        deadline = time.monotonic() + 10
        while True:
            running = (await http.get(f"/api/v1/jobs/{job['id']}")).json()
            if running["progress"]["running"] and running["progress"]["running"][0]["step"] > 1:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert running["status"] == "running"
        assert running["progress"]["running"][0]["total_steps"] == 100
        cancelled = await http.delete(f"/api/v1/jobs/{job['id']}")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        final = await wait_for(http, f"/api/v1/jobs/{job['id']}", writer, ("cancelled",))
        while final["finished_at"] is None:
            final = (await http.get(f"/api/v1/jobs/{job['id']}")).json()
            await asyncio.sleep(0.05)
        assert [r["status"] for r in final["results"]] == ["cancelled"] * 3
        assert final["progress"]["cancelled"] == 3
    assert image_engine.cancelled  # the render stopped at a step, not at its end


def write_batch_file(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def chat_line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], **body},
    }


async def test_the_openai_sdk_runs_a_batch_with_failed_lines_in_the_error_file(
    server: str, keys: ApiKeyService, tmp_path: Path
) -> None:
    _, writer = keys.create("writer", "stories:write")
    _, other = keys.create("other", "stories:write")
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=writer)
    lines = [
        chat_line("ok-1", max_tokens=4),
        chat_line("bad-temperature", temperature=7),
        chat_line("ok-2", max_tokens=4),
        chat_line("streamed", stream=True),
        chat_line("unknown-model", model="nope"),
    ]
    upload = await client.files.create(
        file=write_batch_file(tmp_path / "in.jsonl", lines), purpose="batch"
    )
    assert upload.purpose == "batch"
    assert upload.bytes == (tmp_path / "in.jsonl").stat().st_size
    batch = await client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"scene": "3"},
    )
    assert batch.status == "in_progress"
    assert batch.request_counts is not None
    assert batch.request_counts.total == 5
    deadline = time.monotonic() + 20
    while batch.status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch
        await asyncio.sleep(0.05)
        batch = await client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.metadata == {"scene": "3"}
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 3)
    assert batch.output_file_id
    assert batch.error_file_id
    output = [
        json.loads(line)
        for line in (await client.files.content(batch.output_file_id)).text.splitlines()
    ]
    errors = [
        json.loads(line)
        for line in (await client.files.content(batch.error_file_id)).text.splitlines()
    ]
    assert {line["custom_id"] for line in output} == {"ok-1", "ok-2"}
    for line in output:
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
        assert line["id"].startswith("batch_req_")
    by_id = {line["custom_id"]: line for line in errors}
    assert set(by_id) == {"bad-temperature", "streamed", "unknown-model"}
    assert by_id["bad-temperature"]["response"]["status_code"] == 400
    assert by_id["bad-temperature"]["response"]["body"]["error"]["param"] == "temperature"
    assert by_id["streamed"]["response"]["body"]["error"]["param"] == "stream"
    assert by_id["unknown-model"]["response"]["status_code"] == 404
    assert by_id["unknown-model"]["response"]["body"]["error"]["code"] == "model_not_found"

    listed = [item.id async for item in client.batches.list()]
    assert listed == [batch.id]
    stranger = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=other)
    with pytest.raises(openai.NotFoundError):
        await stranger.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await stranger.files.content(batch.output_file_id)
    assert (await client.files.delete(upload.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(upload.id)


async def test_a_batch_whose_every_line_fails_still_completes(
    server: str, keys: ApiKeyService, tmp_path: Path
) -> None:
    _, writer = keys.create("writer", "stories:write")
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=writer)
    upload = await client.files.create(
        file=write_batch_file(tmp_path / "in.jsonl", [chat_line("a", top_p=3)]), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status != "completed":
        await asyncio.sleep(0.05)
        batch = await client.batches.retrieve(batch.id)
    assert batch.request_counts is not None
    assert batch.request_counts.failed == 1
    assert batch.error_file_id is not None
    output = (await client.files.content(batch.output_file_id or "")).text
    assert output == ""


async def test_malformed_batch_files_are_refused_at_creation(
    server: str, keys: ApiKeyService, tmp_path: Path
) -> None:
    _, writer = keys.create("writer", "stories:write")
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=writer)
    lines = [chat_line("same"), chat_line("same"), {"custom_id": "x", "method": "GET"}]
    upload = await client.files.create(
        file=write_batch_file(tmp_path / "in.jsonl", lines), purpose="batch"
    )
    with pytest.raises(openai.BadRequestError) as refused:
        await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    message = str(refused.value)
    assert "line 2: custom_id 'same' is already used on line 1" in message
    assert "line 3: method must be POST" in message
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=tmp_path / "in.jsonl", purpose="fine-tune")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert [batch async for batch in client.batches.list()] == []


def new_job(store: JobStore, requests: int) -> str:
    return store.create_job(
        NewJob(
            api="fictures",
            kind="text",
            endpoint="/api/v1/text/generate",
            owner="key:local:1",
            allowed_models=None,
            requests=[(None, PROMPT)] * requests,
            base_url="http://test/",
            webhook_url="https://hooks.example.com/x",
        )
    ).id


class JobStoreContract:
    """What the job store promises on every database (SQLite here, PostgreSQL in
    tests/integration/test_job_store_postgres.py)."""

    @pytest.fixture
    def store(self, database_url: str) -> Iterator[JobStore]:
        store = JobStore(database_url=database_url)
        yield store
        store.close()

    def test_a_request_whose_worker_died_runs_again_once(self, store: JobStore) -> None:
        job_id = new_job(store, 2)
        first = store.claim(kind="text", limit=1, worker="dead", lease_s=0.01)
        assert [item.request.index for item in first] == [0]
        assert store.claim(kind="text", limit=5, worker="alive", lease_s=30)[0].request.index == 1
        time.sleep(0.05)
        assert store.requeue_expired() == 1
        again = store.claim(kind="text", limit=5, worker="alive", lease_s=30)
        assert [(item.request.index, item.request.attempts) for item in again] == [(0, 2)]
        # The dead worker's late outcome is dropped: the request counts once.
        assert not store.finish_request(
            job_id=job_id, index=0, worker="dead", status="completed", result={"x": 1}, error=None
        )
        for index in (0, 1):
            assert store.finish_request(
                job_id=job_id,
                index=index,
                worker="alive",
                status="completed",
                result={"i": index},
                error=None,
            )
        assert not store.finish_request(
            job_id=job_id, index=1, worker="alive", status="completed", result={"i": 9}, error=None
        )
        finished = store.get_job(job_id)
        assert finished is not None
        assert (finished.completed, finished.failed) == (2, 0)
        assert [request.result for request in store.requests(job_id)] == [{"i": 0}, {"i": 1}]
        assert [job.id for job in store.unfinished_without_work()] == [job_id]

    def test_concurrent_workers_never_claim_the_same_request(self, store: JobStore) -> None:
        job_id = new_job(store, 40)
        claimed: list[list[int]] = [[] for _ in range(4)]

        def work(worker: int) -> None:
            while batch := store.claim(kind="text", limit=3, worker=f"w{worker}", lease_s=30):
                claimed[worker].extend(item.request.index for item in batch)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(work, range(4)))
        everything = sorted(index for indexes in claimed for index in indexes)
        assert everything == list(range(40))
        job = store.get_job(job_id)
        assert job is not None
        assert job.status == "running"

    def test_a_job_finishes_once_with_one_event(self, store: JobStore) -> None:
        job_id = new_job(store, 2)
        store.claim(kind="text", limit=1, worker="w", lease_s=30)
        cancelling = store.request_cancel(job_id)
        assert cancelling is not None
        assert (cancelling.status, cancelling.cancelled) == ("cancelling", 1)
        assert store.unfinished_without_work() == []  # request 0 still runs
        assert store.renew(worker="w", lease_s=30) == {job_id}
        store.finish_request(
            job_id=job_id, index=0, worker="w", status="cancelled", result=None, error={}
        )
        event = WebhookEvent(event_type="job.cancelled", payload='{"type": "job.cancelled"}')
        done = store.finish_job(job_id, status="cancelled", event=event)
        assert done is not None
        assert done.status == "cancelled"
        assert store.finish_job(job_id, status="completed", event=event) is None
        (delivery,) = store.due_deliveries(limit=10)
        assert (delivery.event_type, delivery.payload) == ("job.cancelled", event.payload)
        now = datetime.now(UTC)
        store.record_attempt(
            delivery,
            attempted_at=now,
            duration_ms=5,
            status_code=500,
            error="HTTP 500",
            delivered=False,
            next_attempt_at=now + timedelta(hours=1),
        )
        assert store.due_deliveries(limit=10) == []  # not before its back-off
        attempts = store.attempts(job_id)
        assert [(a.status_code, a.delivered, a.event_type) for a in attempts] == [
            (500, False, "job.cancelled")
        ]
        store.delete_job(job_id)
        assert store.get_job(job_id) is None
        assert store.attempts(job_id) == []


class TestJobStoreOnSqlite(JobStoreContract):
    @pytest.fixture
    def database_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/jobs.db"


async def test_progress_and_final_webhooks_are_signed_events_of_the_job(
    tmp_path: Path, engine: FakeTextEngine
) -> None:
    secret = generate_webhook_secret()
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=f"sqlite:///{tmp_path}/server.db",
        jobs_dir=tmp_path / "jobs",
        webhook_secret=secret,
        webhook_allowed_hosts="127.0.0.1",
    )
    app = create_app(services=make_services(engine, settings=settings))
    with webhook_receiver([204]) as receiver:
        async with live_server(app) as port, httpx.AsyncClient() as http:
            job = (
                await http.post(
                    f"http://127.0.0.1:{port}/api/v1/jobs",
                    json={
                        "kind": "text",
                        "requests": [PROMPT, {**PROMPT, "prompt": "Second"}],
                        "webhook_url": f"{receiver.url}/hook",
                        "webhook_progress": True,
                        "metadata": {"story": "s-1"},
                    },
                )
            ).json()
            deadline = time.monotonic() + 10
            while len(receiver.requests) < 3:
                assert time.monotonic() < deadline, receiver.requests
                await asyncio.sleep(0.05)
    events = [Webhook(secret).verify(r.body, r.headers) for r in receiver.requests]
    assert sorted(
        (event["type"], event["data"].get("index"), event["data"].get("status")) for event in events
    ) == [
        ("job.completed", None, "completed"),
        ("job.progress", 0, "completed"),
        ("job.progress", 1, "completed"),
    ]
    final = next(event for event in events if event["type"] == "job.completed")
    assert final["data"]["id"] == job["id"]
    assert final["data"]["progress"] == {"total": 2, "completed": 2, "failed": 0, "cancelled": 0}
    assert final["data"]["metadata"] == {"story": "s-1"}
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 3


async def test_uploads_count_against_the_keys_storage(tmp_path: Path, keys: ApiKeyService) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=f"sqlite:///{tmp_path}/server.db",
        jobs_dir=tmp_path / "jobs",
        job_max_stored_bytes=1 << 20,
        job_max_file_bytes=1 << 20,
    )
    _, writer = keys.create("writer", "stories:write")
    app = create_app(services=make_services(settings=settings, api_keys=keys))
    line = json.dumps(chat_line("x")) + "\n"
    big = line * ((600 << 10) // len(line))
    async with live_server(app) as port:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=writer)
        first = await client.files.create(file=("a.jsonl", big.encode()), purpose="batch")
        with pytest.raises(openai.APIStatusError) as refused:
            await client.files.create(file=("b.jsonl", big.encode()), purpose="batch")
        assert refused.value.status_code == 413
        assert "JOB_MAX_STORED_BYTES" in str(refused.value)
        with pytest.raises(openai.APIStatusError) as too_big:
            await client.files.create(file=("c.jsonl", (big * 2).encode()), purpose="batch")
        assert too_big.value.status_code == 413
        assert "JOB_MAX_FILE_BYTES" in str(too_big.value)
        await client.files.delete(first.id)
        await client.files.create(file=("b.jsonl", big.encode()), purpose="batch")


class FlakyExecutor:
    """Answers each request with a transient failure ``flaky`` times, then completes it."""

    def __init__(self, flaky: int) -> None:
        self.flaky = flaky
        self.runs: list[int] = []

    async def execute(
        self, job: JobRecord, request: JobRequestRecord, *, progress: Any
    ) -> RequestOutcome:
        self.runs.append(request.index)
        if self.runs.count(request.index) <= self.flaky:
            return RequestOutcome(
                status="failed",
                error={"status_code": 503, "detail": "The text model is loading."},
                retry_after_s=0.05,
            )
        return RequestOutcome(status="completed", result={"text": "done"})

    def output_files(self, job: JobRecord, requests: list[JobRequestRecord]) -> list[Any]:
        return []

    def job_event(self, job: JobRecord, status: str) -> WebhookEvent:
        return WebhookEvent(event_type=f"job.{status}", payload="{}")

    def progress_event(self, job: JobRecord, request: JobRequestRecord, status: str) -> Any:
        return None


@pytest.mark.parametrize(("flaky", "outcome"), [(2, "completed"), (9, "failed")])
async def test_transient_failures_queue_the_request_again_up_to_max_attempts(
    tmp_path: Path, flaky: int, outcome: str
) -> None:
    store = JobStore(database_url=f"sqlite:///{tmp_path}/jobs.db")
    job_id = new_job(store, 1)
    executor = FlakyExecutor(flaky)
    runner = JobRunner(
        store=store,
        files=JobFiles(tmp_path / "files"),
        executor=executor,
        webhooks=None,
        options=JobRunnerOptions(poll_s=0.02),
        kinds=("text",),
    )
    task = asyncio.create_task(runner.run())
    try:
        deadline = time.monotonic() + 10
        while (job := store.get_job(job_id)) is None or not job.finished:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    (request,) = store.requests(job_id)
    assert request.status == outcome
    assert request.attempts == min(flaky + 1, MAX_ATTEMPTS)
    assert executor.runs == [0] * request.attempts
    if outcome == "failed":
        assert request.error == {"status_code": 503, "detail": "The text model is loading."}


async def test_submission_checks_adapters_and_the_keys_models_per_request(
    server: str, keys: ApiKeyService
) -> None:
    _, limited = keys.create("limited", "stories:write", models="fake-image-model")
    async with httpx.AsyncClient(base_url=server, headers=bearer(limited)) as http:
        adapter = await http.post(
            "/api/v1/jobs",
            json={
                "kind": "images",
                "requests": [IMAGE_PROMPT, {**IMAGE_PROMPT, "loras": [{"name": "nope"}]}],
            },
        )
        assert adapter.status_code == 400
        assert adapter.json()["detail"].startswith("requests[1]: ")
        assert "nope" in adapter.json()["detail"]
        text = await http.post("/api/v1/jobs", json={"kind": "text", "requests": [PROMPT]})
        assert text.status_code == 403
        assert text.json()["detail"].startswith("requests[0]: This API key may not use")
        assert (await http.get("/api/v1/jobs")).json()["data"] == []


async def test_paging_from_an_unknown_cursor_is_refused(server: str, keys: ApiKeyService) -> None:
    _, writer = keys.create("writer", "stories:write")
    async with httpx.AsyncClient(base_url=server, headers=bearer(writer)) as http:
        job = (await http.post("/api/v1/jobs", json={"kind": "text", "requests": [PROMPT]})).json()
        first = await http.get("/api/v1/jobs", params={"limit": 1, "after": job["id"]})
        assert first.json() == {"object": "list", "data": [], "has_more": False}
        for path, cursor in (
            ("/api/v1/jobs", "job_nope"),
            ("/v1/batches", "batch_nope"),
            ("/v1/files", "file-nope"),
            ("/v1/batches", job["id"]),  # a job is not a batch
        ):
            answer = await http.get(path, params={"after": cursor})
            assert answer.status_code == 400, (path, answer.text)
            assert "after" in answer.text


async def test_deleting_a_finished_job_frees_what_it_kept(server: str, keys: ApiKeyService) -> None:
    _, writer = keys.create("writer", "stories:write")
    async with httpx.AsyncClient(base_url=server, headers=bearer(writer)) as http:
        job = (
            await http.post("/api/v1/jobs", json={"kind": "images", "requests": [IMAGE_PROMPT]})
        ).json()
        done = await wait_for(http, f"/api/v1/jobs/{job['id']}", writer, ("completed",))
        image_url = done["results"][0]["result"]["image_url"]
        assert (await http.get(image_url)).status_code == 200
        deleted = await http.delete(f"/api/v1/jobs/{job['id']}")
        assert deleted.json() == {"id": job["id"], "object": "job", "deleted": True}
        assert (await http.get(f"/api/v1/jobs/{job['id']}")).status_code == 404
        assert (await http.get(image_url)).status_code == 404
