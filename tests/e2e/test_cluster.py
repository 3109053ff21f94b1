"""``fictures-ai serve --ray`` on a local Ray cluster: 2 ingress, 2 text and 2 image replicas.

The cluster is a real ``ray start --head --block`` on loopback (token authentication, as
``make serve-cluster``); the server runs the bundled models with two replicas each, and two
ingress replicas that share their keys through PostgreSQL and their rate limits through Redis.
Requests spread over the replicas (``X-Fictures-Replica``); a replica whose process is killed
ends its streams with an error event while new requests go to the live one, and Ray brings it
back; a client that leaves, or a request past ``REQUEST_TIMEOUT_S``, is aborted in its
replica; SIGINT drains a running stream, and stopping the head leaves no process behind.
What each replica runs is read from Ray's metrics endpoint of the node
(``ray_fictures_replica_running_requests``), as Prometheus would scrape it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import create_key, start_server
from tests.postgres import PostgresServer
from tests.redis_server import RedisServer
from tests.support import free_port

pytestmark = pytest.mark.e2e

RAY = Path(sys.executable).with_name("ray")
TEXT = "model-SmolLM2-135M-Instruct"
IMAGE = "model-tiny-sdxl-random"
TIMEOUT_S = 20
IMAGE_BODY = {"prompt": "a lighthouse", "width": 384, "height": 384, "num_inference_steps": 12}


@dataclass
class Cluster:
    url: str
    key: str
    env: dict[str, str]
    head: subprocess.Popen[bytes]
    server: subprocess.Popen[bytes]
    log: Path
    metrics_port: int
    ingress_metrics_port: int

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=300, **kwargs)  # type: ignore[arg-type]

    def running(self) -> dict[str, float]:
        """The requests each model replica runs now, by replica id, from Ray's metrics."""
        body = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        running = {}
        for line in body.splitlines():
            if line.startswith("ray_fictures_replica_running_requests{"):
                labels, value = line.rsplit(" ", 1)
                match = re.search(r'replica="([^"]+)"', labels)
                assert match is not None, line
                running[match.group(1)] = float(value)
        return running

    async def wait_reported(self, deployment: str, replicas: int) -> None:
        """Until Ray's metrics carry the series of ``replicas`` replicas of ``deployment``: a
        replica's first export may come a minute or more after it started on a loaded
        machine (a CI run once saw none within 60 s), later ones every few seconds."""
        deadline = time.monotonic() + 300
        while (
            len(seen := [name for name in self.running() if deployment_of(name) == deployment])
            < replicas
        ):
            assert time.monotonic() < deadline, f"only {seen} of {deployment} reported"
            await asyncio.sleep(1)

    async def wait_running(self, replica: str, value: float) -> None:
        """Until the metrics say ``replica`` runs ``value`` requests (they lag by seconds)."""
        deadline = time.monotonic() + 60
        while (now := (running := self.running()).get(replica_id(replica))) != value:
            assert time.monotonic() < deadline, f"{replica} runs {now}, not {value}: {running}"
            await asyncio.sleep(1)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    postgres_server.create_database("fictures_cluster")
    database_url = postgres_server.url("fictures_cluster")
    key = create_key(database_url, "cluster-writer", "stories:write")
    port, metrics_port, ingress_metrics_port = free_port(), free_port(), two_free_ports()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": f"127.0.0.1:{port}"}
    with (folder / "head.log").open("wb") as out:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(port), "--num-cpus", "8", "--include-dashboard", "false",
             "--disable-usage-stats", "--metrics-export-port", str(metrics_port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    tree: set[psutil.Process] = set()
    server: subprocess.Popen[bytes] | None = None
    try:
        server_env = {
            **env,
            "RAY_INGRESS_REPLICAS": "2",
            "RAY_MODEL_REPLICAS": "2",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_server.url,
            "RATE_LIMIT_PER_MINUTE": "100000",
            "TEXT_CPU_KV_CACHE_MB": "128",
            "TEXT_MAX_MODEL_LEN": "4096",
            "REQUEST_TIMEOUT_S": str(TIMEOUT_S),
            "SHUTDOWN_GRACE_S": "30",
            "RAY_METRICS_PORT": str(ingress_metrics_port),
        }
        log = folder / "server.log"
        server, url = start_server(server_env, log, command=("serve", "--ray"), ready_s=600)
        # /health answers once the ingress runs; every model replica is up once the
        # deployment returns (serve.run), which the server then logs.
        deadline = time.monotonic() + 600
        while "Serving on Ray Serve" not in log.read_text(errors="replace"):
            assert server.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the application never finished deploying"
            time.sleep(1)
        tree = {head_process := psutil.Process(head.pid), *head_process.children(recursive=True)}
        yield Cluster(
            url=url,
            key=key,
            env=env,
            head=head,
            server=server,
            log=log,
            metrics_port=metrics_port,
            ingress_metrics_port=ingress_metrics_port,
        )
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            head.wait(timeout=120)
        for process in tree:  # a failed test must not leave the cluster running
            if process.is_running():
                process.kill()


def two_free_ports() -> int:
    """A port P such that P and P + 1 are free (the ingress replicas' metrics ports)."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


async def read_stream(
    client: httpx.AsyncClient, body: dict[str, object], started: list[str] | None = None
) -> tuple[str, list[dict[str, object]]]:
    """The replica header and the JSON events of one ``/api/v1/text/stream``."""
    async with client.stream("POST", "/api/v1/text/stream", json=body) as response:
        assert response.status_code == 200, await response.aread()
        replica = response.headers["x-fictures-replica"]
        if started is not None:
            started.append(replica)
        events = [
            json.loads(line[5:])
            async for line in response.aiter_lines()
            if line.startswith("data:") and line != "data: [DONE]"
        ]
    return replica, events


def deployment_of(replica: str) -> str:
    return replica.split("#", 1)[0]


def replica_id(replica: str) -> str:
    """``model-x#id`` of a replica header ``model-x#id pid=... node=...``."""
    return replica.split(" ", 1)[0]


def pid_of(replica: str) -> int:
    match = re.search(r"pid=(\d+)", replica)
    assert match is not None, replica
    return int(match.group(1))


async def test_streams_and_images_land_on_both_replicas_of_each_model(cluster: Cluster) -> None:
    body = {"prompt": "Write one line about the sea.", "max_tokens": 24}
    async with cluster.client() as client:
        streams = [read_stream(client, body) for _ in range(8)]
        # 8 images over 2 ingress replicas of 2 render slots each: some wait, and those that
        # wait together go to a replica as one batch.
        images = [
            client.post("/api/v1/images/generate", json={**IMAGE_BODY, "seed": seed})
            for seed in range(8)
        ]
        results = await asyncio.gather(*streams, *images)
    text_replicas = Counter[str]()
    for replica, events in results[:8]:  # type: ignore[misc]
        assert deployment_of(replica) == TEXT
        assert events[-1]["done"] is True
        assert "error" not in events[-1]
        text_replicas[replica] += 1
    image_replicas = Counter[str]()
    for response in results[8:]:
        assert isinstance(response, httpx.Response)
        assert response.status_code == 200, response.text
        assert response.json()["image_url"].startswith("data:image/png;base64,")
        image_replicas[response.headers["x-fictures-replica"]] += 1
    assert len(text_replicas) == 2, text_replicas
    assert len(image_replicas) == 2, image_replicas
    assert {deployment_of(name) for name in image_replicas} == {IMAGE}
    renders = images_rendered = 0.0
    for rank in (0, 1):
        metrics = httpx.get(f"http://127.0.0.1:{cluster.ingress_metrics_port + rank}/metrics")
        for line in metrics.text.splitlines():
            if line.startswith("fictures_image_batch_size_count{"):
                renders += float(line.rsplit(" ", 1)[1])
            elif line.startswith("fictures_image_batch_size_sum{"):
                images_rendered += float(line.rsplit(" ", 1)[1])
    assert images_rendered == 8
    assert renders < images_rendered, "no two images shared a render"


async def test_structured_output_errors_and_tokens_cross_the_handle(cluster: Cluster) -> None:
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "chapters": {"type": "integer"}},
        "required": ["title", "chapters"],
    }
    async with cluster.client() as client:
        structured = await client.post(
            "/api/v1/text/structured",
            json={
                "prompt": "Propose a novel: its title and number of chapters, as JSON.",
                "max_tokens": 80,
                "guided_decoding": {"type": "json", "schema": schema},
            },
        )
        # Raised in the replica (vLLM tokenizes there), answered as without Ray.
        too_long = await client.post(
            "/v1/completions",
            json={"model": "SmolLM2-135M-Instruct", "prompt": "word " * 5000, "max_tokens": 10},
        )
        tokens = await client.post("/tokenize", json={"prompt": "Once upon a time"})
    assert structured.status_code == 200, structured.text
    assert structured.json()["is_valid"] is True
    assert too_long.status_code == 400, too_long.text
    error = too_long.json()["error"]
    assert error["param"] == "prompt", error
    assert "this model's context is 4096 tokens" in error["message"]
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["count"] >= 4
    # Each ingress replica serves its own metrics on RAY_METRICS_PORT + its rank.
    for rank in (0, 1):
        metrics = httpx.get(f"http://127.0.0.1:{cluster.ingress_metrics_port + rank}/metrics")
        assert metrics.status_code == 200
        assert "fictures_http_requests_total" in metrics.text


async def test_a_client_that_leaves_is_aborted_in_its_replica(cluster: Cluster) -> None:
    body = {"prompt": "Tell a long story.", "max_tokens": 3000, "ignore_eos": True}
    # The stream lasts REQUEST_TIMEOUT_S at most: the metrics must already be flowing.
    await cluster.wait_reported(TEXT, 2)
    async with (
        cluster.client() as client,
        client.stream("POST", "/api/v1/text/stream", json=body) as response,
    ):
        replica = response.headers["x-fictures-replica"]
        lines = response.aiter_lines()
        for _ in range(5):
            await anext(lines)
        await cluster.wait_running(replica, 1)
        # Closed: the ingress cancels the handle call, the replica aborts it in vLLM.
    await cluster.wait_running(replica, 0)


async def test_a_killed_replica_ends_its_streams_and_comes_back(cluster: Cluster) -> None:
    body = {"prompt": "Tell a long story.", "max_tokens": 3000, "ignore_eos": True}
    started: list[str] = []
    async with cluster.client() as client:
        # Streams until both replicas run some (Ray's router picks the less busy of two).
        streams: list[asyncio.Task[tuple[str, list[dict[str, object]]]]] = []
        while len(set(started)) < 2 and len(streams) < 12:
            streams.append(asyncio.create_task(read_stream(client, body, started)))
            while len(started) < len(streams) and not streams[-1].done():
                await asyncio.sleep(0.1)
        assert len(set(started)) == 2, started
        await asyncio.sleep(2)
        victim = started[0]
        os.kill(pid_of(victim), signal.SIGKILL)
        results = await asyncio.gather(*streams)
        for replica, events in results:
            last = events[-1]
            # What a failure shows: the stream, its end (without the long text) and the log.
            seen = {
                "replica": replica,
                "victim": victim,
                "events": len(events),
                "last": {key: value for key, value in last.items() if key != "text"},
                "log": cluster.log.read_text(errors="replace")[-4000:],
            }
            assert last["done"] is True, seen
            if replica == victim:
                assert last["finish_reason"] == "error", seen
                assert "serving this request stopped" in str(last["error"]), last
            elif last["finish_reason"] == "stop":
                # Twice in CI a survivor's vLLM ended this ignore_eos stream early with
                # "stop" (51 tokens; its replica's call ended OK): unexplained, vLLM's own
                # (the engine logs its stop_reason). It is not this test's subject.
                assert int(str(last["tokens_used"])) < 3000, seen
            else:  # the others ran on to REQUEST_TIMEOUT_S and were stopped there
                assert last["finish_reason"] == "error", seen
                assert "REQUEST_TIMEOUT_S" in str(last["error"]) or "timed out" in str(
                    last["error"]
                ), last
        # New requests go to the live replica at once.
        for _ in range(3):
            response = await client.post(
                "/api/v1/text/generate", json={"prompt": "Hello", "max_tokens": 4}
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-fictures-replica"] != victim
        # The streams that timed out were aborted in their replica too.
        survivor = next(name for name in started if name != victim)
        await cluster.wait_running(survivor, 0)
        # Ray replaces the dead replica: a new one answers beside the survivor.
        deadline = time.monotonic() + 300
        seen: set[str] = set()
        while not seen - {replica_id(victim), replica_id(survivor)}:
            assert time.monotonic() < deadline, f"no replacement replica among {seen}"
            response = await client.post(
                "/api/v1/text/generate", json={"prompt": "Hello", "max_tokens": 2}
            )
            if response.status_code == 200:
                seen.add(replica_id(response.headers["x-fictures-replica"]))
            await asyncio.sleep(1)
    assert not psutil.pid_exists(pid_of(victim))


async def test_sigint_drains_a_running_stream_and_the_cluster_stops_clean(
    cluster: Cluster,
) -> None:
    body = {"prompt": "Tell a story.", "max_tokens": 48, "ignore_eos": True}
    started: list[str] = []
    async with cluster.client() as client:
        stream = asyncio.create_task(read_stream(client, body, started))
        while not started:
            await asyncio.sleep(0.1)
        cluster.server.send_signal(signal.SIGINT)
        _, events = await stream
    assert events[-1]["finish_reason"] == "length", events[-1]
    assert events[-1]["tokens_used"] == 48
    assert await asyncio.to_thread(cluster.server.wait, 120) == 0
    head = psutil.Process(cluster.head.pid)
    tree = [head, *head.children(recursive=True)]
    cluster.head.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(cluster.head.wait, 120) is not None
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, [process.info for process in alive]
