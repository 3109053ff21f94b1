"""Durable jobs and OpenAI batches end to end: a real ``fictures-ai serve`` (bundled SmolLM2 on
vLLM, the tiny SDXL pipeline) with its jobs in SQLite, a real webhook receiver on loopback,
httpx and the ``openai`` SDK as clients, and a SIGKILL in the middle of a job.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from standardwebhooks import Webhook

from fictures_ai.services.jobs.webhooks import generate_webhook_secret
from tests.e2e.conftest import create_key, start_server, stop_server
from tests.webhook_receiver import webhook_receiver

pytestmark = pytest.mark.e2e

SECRET = generate_webhook_secret()
IMAGE = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "num_inference_steps": 4}


@dataclass
class JobsServer:
    """A server process with its jobs database, restartable with the same settings."""

    folder: Path
    env: dict[str, str]
    keys: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    starts: list[Path] = field(default_factory=list)

    def start(self) -> None:
        log = self.folder / f"server-{len(self.starts)}.log"
        self.starts.append(log)
        self.process, self.url = start_server(self.env, log, ready_s=120)

    def http(self, key: str = "writer") -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.keys[key]}"}, timeout=60
        )

    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.starts)


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobsServer]:
    folder = tmp_path_factory.mktemp("jobs")
    database_url = f"sqlite:///{folder}/server.db"
    keys = {
        "writer": create_key(database_url, "writer", "stories:write", web_app=False),
        "other": create_key(database_url, "other", "stories:write", web_app=False),
    }
    env = {
        "DATABASE_URL": database_url,
        "JOBS_DIR": str(folder / "files"),
        "TEXT_CPU_KV_CACHE_MB": "256",
        "TEXT_MAX_MODEL_LEN": "2048",
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "WEBHOOK_RETRY_BASE_S": "0.5",
        "WEBHOOK_RETRY_MAX_S": "1",
        "JOB_LEASE_S": "3",
        "JOB_TEXT_CONCURRENCY": "2",
    }
    server = JobsServer(folder=folder, env=env, keys=keys)
    server.start()
    yield server
    if server.process is not None:
        stop_server(server.process)


def wait_for(
    check: Callable[[], dict[str, Any]], until: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if until(answer):
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"not reached in {timeout} s: {json.dumps(answer)[:2000]}")
        time.sleep(0.2)


def job_of(http: httpx.Client, job_id: str) -> Callable[[], dict[str, Any]]:
    def check() -> dict[str, Any]:
        answer = http.get(f"/api/v1/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    return check


def test_an_image_job_calls_its_signed_webhook_again_after_a_500(jobs_server: JobsServer) -> None:
    with webhook_receiver([500, 204]) as receiver, jobs_server.http() as http:
        created = http.post(
            "/api/v1/jobs",
            json={
                "kind": "images",
                "requests": [{**IMAGE, "seed": seed} for seed in range(1, 7)],
                "webhook_url": f"{receiver.url}/fictures/hook",
                "metadata": {"scene": 4},
            },
        )
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        done = wait_for(job_of(http, job_id), lambda job: job["finished_at"] is not None, 300)
        assert done["status"] == "completed"
        assert done["progress"]["completed"] == 6
        for index, request in enumerate(done["results"]):
            image = request["result"]
            assert image["seed"] == index + 1
            assert (image["width"], image["height"]) == (256, 256)
            png = httpx.get(image["image_url"], timeout=30)  # no key: the URL is the permission
            assert png.status_code == 200
            assert png.content.startswith(b"\x89PNG")

        wait_for(
            job_of(http, job_id),
            lambda job: any(a["delivered"] for a in job["webhook_attempts"]),
            60,
        )
        first, second = receiver.requests[:2]
        for received in (first, second):
            assert received.path == "/fictures/hook"
            event = Webhook(SECRET).verify(received.body, received.headers)
            assert event["type"] == "job.completed"
            assert event["data"]["id"] == job_id
            assert event["data"]["metadata"] == {"scene": 4}
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        assert int(second.headers["webhook-timestamp"]) >= int(first.headers["webhook-timestamp"])
        with pytest.raises(Exception, match="signature"):
            Webhook(SECRET).verify(second.body.replace(b"completed", b"failed"), second.headers)
        attempts = http.get(f"/api/v1/jobs/{job_id}").json()["webhook_attempts"]
        assert [(a["status_code"], a["delivered"]) for a in attempts] == [(500, False), (204, True)]
        assert {a["webhook_id"] for a in attempts} == {first.headers["webhook-id"]}


def test_a_text_job_is_its_owners_alone_and_can_be_cancelled(jobs_server: JobsServer) -> None:
    story = {"prompt": "Write the next line of the story: The ship", "max_tokens": 16,
             "temperature": 0.0}  # fmt: skip
    with jobs_server.http() as http, jobs_server.http("other") as other:
        job_id = http.post("/api/v1/jobs", json={"kind": "text", "requests": [story] * 2}).json()[
            "id"
        ]
        done = wait_for(job_of(http, job_id), lambda job: job["finished_at"] is not None, 120)
        assert done["status"] == "completed"
        for request in done["results"]:  # the route's own answer
            assert request["result"]["text"]
            assert 0 < request["result"]["tokens_used"] <= 16
            assert request["result"]["finish_reason"] in ("stop", "length")
        assert other.get(f"/api/v1/jobs/{job_id}").status_code == 404
        assert other.delete(f"/api/v1/jobs/{job_id}").status_code == 404
        assert job_id not in [job["id"] for job in other.get("/api/v1/jobs").json()["data"]]

        long = {**story, "max_tokens": 400, "min_tokens": 400}
        job_id = http.post("/api/v1/jobs", json={"kind": "text", "requests": [long] * 6}).json()[
            "id"
        ]
        wait_for(job_of(http, job_id), lambda job: job["status"] == "running", 120)
        cancelled = http.delete(f"/api/v1/jobs/{job_id}")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        final = wait_for(job_of(http, job_id), lambda job: job["finished_at"] is not None, 60)
        statuses = [request["status"] for request in final["results"]]
        assert statuses.count("cancelled") >= 4  # at most the two running could have finished
        assert set(statuses) <= {"cancelled", "completed"}


def test_private_webhook_addresses_are_refused(jobs_server: JobsServer) -> None:
    with jobs_server.http() as http:
        for url in (
            "http://10.0.0.7/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:8000/hook",
            "http://2130706434/hook",  # 127.0.0.2 in decimal: not the allowed 127.0.0.1
            "ftp://127.0.0.1/hook",
        ):
            answer = http.post(
                "/api/v1/jobs",
                json={"kind": "text", "requests": [{"prompt": "x"}], "webhook_url": url},
            )
            assert answer.status_code == 400, url
            assert "webhook" in answer.text.lower(), answer.text


def test_the_openai_sdk_batch_flow(jobs_server: JobsServer, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{jobs_server.url}/v1", api_key=jobs_server.keys["writer"])
    lines = [
        {
            "custom_id": f"scene-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": f"Name a colour ({index})."}],
                "max_tokens": 8,
                "temperature": 0,
            },
        }
        for index in range(3)
    ]
    lines[1]["body"]["max_tokens"] = -1  # refused by the route: goes to the error file
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    upload = client.files.create(file=path, purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    assert batch.output_file_id is not None
    assert batch.error_file_id is not None
    output = [
        json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()
    ]
    errors = [
        json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()
    ]
    assert sorted(line["custom_id"] for line in output) == ["scene-0", "scene-2"]
    for line in output:
        body = line["response"]["body"]
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] <= 8
    assert [line["custom_id"] for line in errors] == ["scene-1"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "max_tokens"


def test_a_job_survives_a_sigkill_with_every_request_run_once(jobs_server: JobsServer) -> None:
    """Last in the module: it kills the server and starts another on the same database."""
    prompts = [
        {
            "prompt": f"Chapter {index}: the storm",
            "max_tokens": 48,
            "min_tokens": 48,
            "temperature": 0.0,
        }  # fmt: skip
        for index in range(8)
    ]
    with webhook_receiver([204]) as receiver:
        with jobs_server.http() as http:
            job_id = http.post(
                "/api/v1/jobs",
                json={"kind": "text", "requests": prompts, "webhook_url": receiver.url},
            ).json()["id"]
            before = wait_for(
                job_of(http, job_id), lambda job: job["progress"]["completed"] >= 2, 180
            )
        assert before["progress"]["completed"] < 8, "the job finished before the kill"
        assert jobs_server.process is not None
        # vLLM's engine core outlives a SIGKILLed server (docs/jobs.md): stopped here too.
        engine_processes = psutil.Process(jobs_server.process.pid).children(recursive=True)
        jobs_server.process.send_signal(signal.SIGKILL)
        jobs_server.process.wait()
        for process in engine_processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        finished_before = {
            request["index"]: request["result"]
            for request in before["results"]
            if request["status"] == "completed"
        }

        jobs_server.start()
        with jobs_server.http() as http:
            after = wait_for(job_of(http, job_id), lambda job: job["finished_at"] is not None, 300)
            assert after["status"] == "completed"
            assert after["progress"] == {
                "total": 8, "completed": 8, "failed": 0, "cancelled": 0, "running": []
            }  # fmt: skip
            for index, result in finished_before.items():
                assert after["results"][index]["result"] == result  # not run again
            for request in after["results"]:
                assert request["result"]["tokens_used"] == 48
            wait_for(
                job_of(http, job_id),
                lambda job: any(a["delivered"] for a in job["webhook_attempts"]),
                60,
            )
        events = [Webhook(SECRET).verify(r.body, r.headers) for r in receiver.requests]
        assert [event["type"] for event in events] == ["job.completed"]
