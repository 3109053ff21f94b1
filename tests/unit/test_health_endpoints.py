"""``/health/live``, ``/health/ready`` and the fields ``/health`` adds to the contract."""

from __future__ import annotations

import asyncio
import sys
import types

import httpx
import pytest

from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from fictures_ai.errors import ModelLoadError
from fictures_ai.observability.gpu import gpu_memory
from tests.unit.conftest import image_of, make_services, text_of, wait_until
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine


async def test_live_answers_while_the_process_runs(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/live")
    assert (response.status_code, response.json()) == (200, {"status": "alive"})


async def test_ready_before_any_load_because_the_models_are_loadable(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["models"]["fake-model"] == {
        "name": "fake-model",
        "state": "not_loaded",
        "ready": True,
        "reason": None,
    }
    assert body["models"]["fake-image-model"]["state"] == "not_loaded"


async def test_ready_once_loaded_and_healthy(client: httpx.AsyncClient) -> None:
    await client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    body = (await client.get("/health/ready")).json()
    assert body["status"] == "ready"
    assert body["models"]["fake-model"]["state"] == "loaded"


async def test_not_ready_after_a_failed_load_says_which_model_and_why() -> None:
    async def broken() -> FakeTextEngine:
        raise ModelLoadError("CUDA out of memory", model="fake-model")

    app = create_app(services=make_services(loader=broken))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
        response = await c.get("/health/ready")
        contract_health = await c.get("/health")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "30"
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["models"]["fake-model"]["ready"] is False
    assert body["models"]["fake-model"]["state"] == "failed"
    assert "CUDA out of memory" in body["models"]["fake-model"]["reason"]
    assert body["models"]["fake-image-model"]["ready"] is True
    # The contract's /health stays 200 whatever happens.
    assert contract_health.status_code == 200


async def test_not_ready_when_a_loaded_engine_fails_its_health_check(
    engine: FakeTextEngine, client: httpx.AsyncClient
) -> None:
    await client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    engine.dead = True
    response = await client.get("/health/ready")
    assert response.status_code == 503
    text = response.json()["models"]["fake-model"]
    assert (text["state"], text["ready"], text["reason"]) == (
        "loaded",
        False,
        "The fake engine is dead.",
    )


async def test_not_ready_when_the_health_check_hangs(
    engine: FakeTextEngine, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fictures_ai.api.health as health

    await client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})

    async def hang() -> None:
        await asyncio.sleep(10)

    monkeypatch.setattr(engine, "check_health", hang)
    monkeypatch.setattr(health, "HEALTH_CHECK_TIMEOUT_S", 0.05)
    response = await client.get("/health/ready")
    assert response.status_code == 503
    assert "did not answer" in response.json()["models"]["fake-model"]["reason"]


async def test_health_adds_recent_requests_and_gpu_fields(
    engine: FakeTextEngine, client: httpx.AsyncClient
) -> None:
    empty = (await client.get("/health")).json()
    assert empty["requests"] == {
        "window_s": 300.0,
        "count": 0,
        "latency_p50_ms": None,
        "latency_p95_ms": None,
        "error_rate": None,
    }
    assert empty["gpu"] is None  # no CUDA in this process
    for _ in range(3):
        await client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    engine.fail_after = 0
    await client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    await client.get("/metrics")
    await client.get("/health/ready")
    body = (await client.get("/health")).json()
    # Probes and scrapes are left out; the failed generation is one 5xx in four.
    assert body["requests"]["count"] == 4
    assert body["requests"]["error_rate"] == 0.25
    assert body["requests"]["latency_p50_ms"] >= 0
    assert body["requests"]["latency_p95_ms"] >= body["requests"]["latency_p50_ms"]
    # The contract's fields are still there, unchanged.
    assert body["status"] == "healthy"
    assert set(body) >= {"status", "version", "models"}


async def test_health_reports_the_requests_waiting_and_running_per_kind() -> None:
    engine = FakeTextEngine(token_delay=0.02)
    image_engine = FakeImageEngine(step_delay=0.02)
    services = make_services(engine, image_engine=image_engine)
    app = create_app(services=services)
    image = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 10}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        idle = (await c.get("/health")).json()
        renders = [
            asyncio.create_task(c.post("/api/v1/images/generate", json=image)) for _ in range(3)
        ]
        story = asyncio.create_task(
            c.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 8})
        )
        await wait_until(lambda: image_of(services).info().waiting == 2)
        await wait_until(lambda: text_of(services).info().running == 1)
        busy = (await c.get("/health")).json()
        await asyncio.gather(story, *renders)
        after = (await c.get("/health")).json()
    assert idle["queues"] == {
        "images": {"waiting": 0, "running": 0},
        "text": {"running": 0},
        "jobs": {},  # no job runner ran in this app (no lifespan): tests/unit/test_jobs.py
    }
    assert busy["queues"] == {
        "images": {"waiting": 2, "running": 1},
        "text": {"running": 1},
        "jobs": {},
    }
    assert after["queues"] == idle["queues"]


@pytest.mark.parametrize(("mode", "served"), [("text", {"text"}), ("image", {"images"})])
async def test_health_queues_leave_out_the_half_not_served(mode: str, served: set[str]) -> None:
    settings = Settings(_env_file=None, generation_mode=mode)  # type: ignore[call-arg]
    app = create_app(services=make_services(settings=settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        queues = (await c.get("/health")).json()["queues"]
    assert set(queues) == served | {"jobs"}


def test_gpu_memory_never_initialises_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class FakeCuda:
        def __init__(self, initialized: bool) -> None:
            self.initialized = initialized

        def is_available(self) -> bool:
            return True

        def is_initialized(self) -> bool:
            return self.initialized

        def device_count(self) -> int:
            return 2

        def current_device(self) -> int:
            return 0

        def mem_get_info(self, index: int) -> tuple[int, int]:
            calls.append(f"mem_get_info({index})")
            return 30 << 30, 80 << 30

        def get_device_name(self, index: int) -> str:
            return "NVIDIA H100"

        def memory_allocated(self, index: int) -> int:
            return 5 << 30

    fake_torch = types.SimpleNamespace(cuda=FakeCuda(initialized=False), _C=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert gpu_memory() is None
    assert calls == []

    # Initialised: only the devices this process has a context on are read.
    fake_torch._C._cuda_hasPrimaryContext = lambda index: index == 1
    fake_torch.cuda = FakeCuda(initialized=True)
    [device] = gpu_memory() or []
    assert calls == ["mem_get_info(1)"]
    assert (device.index, device.used_bytes, device.total_bytes, device.allocated_bytes) == (
        1,
        50 << 30,
        80 << 30,
        5 << 30,
    )

    monkeypatch.delitem(sys.modules, "torch")
    assert gpu_memory() is None
