"""``serve --ray`` without a cluster: replica plans, deployment options, the shared-state check,
the models file's Ray fields, errors crossing the handle, and the ingress's registry."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from pathlib import Path

import cloudpickle
import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from fictures_ai.cluster.application import (
    ModelDeployments,
    build_application,
    check_shared_state,
    deployment_name,
    gpus_needed,
    logical_cpus_needed,
    plan_replicas,
)
from fictures_ai.cluster.ingress import RayEngines, _without_echoed_request_id
from fictures_ai.cluster.replicas import coalesce
from fictures_ai.config import Settings
from fictures_ai.engines.base import (
    GeneratedImage,
    ImageGenerationParams,
    ImageModelInfo,
    TextChunk,
    TextModelInfo,
    TokenLogprob,
    merge_chunks,
)
from fictures_ai.engines.ray_engine import RayImageEngine, RayTextEngine, replica_error
from fictures_ai.errors import (
    ConflictError,
    ContextLengthExceededError,
    FicturesError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    RateLimitedError,
    ServiceUnavailableError,
)
from fictures_ai.observability.context import RequestContext, bind_request, unbind_request
from fictures_ai.services.models.registry import build_model_registry
from fictures_ai.services.models.spec import ModelsFileError, ModelSpec

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "deploy/models.example.yaml"


def settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]


def text_spec(**fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": "w", "kind": "text", "source": "x", **fields})


def test_a_model_without_replicas_gets_ray_model_replicas_of_one_cpu() -> None:
    plan = plan_replicas(text_spec(), settings(ray_model_replicas=2), per_replica_capacity=16)
    assert plan.deployment_options() == {
        "max_ongoing_requests": 32,  # twice max_num_seqs: never Ray's 5
        "num_replicas": 2,
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0},
    }


def test_replica_bounds_become_autoscaling_and_resources_the_actor_options() -> None:
    spec = text_spec(
        replicas={"min": 0, "max": 4, "target_ongoing_requests": 24},
        resources={"cpus": 2, "gpus": 1},
        max_ongoing_requests=64,
    )
    options = plan_replicas(spec, settings(), per_replica_capacity=16).deployment_options()
    assert options == {
        "max_ongoing_requests": 64,
        "autoscaling_config": {
            "min_replicas": 0,
            "max_replicas": 4,
            "initial_replicas": 0,
            "target_ongoing_requests": 24.0,
        },
        "ray_actor_options": {"num_cpus": 2.0, "num_gpus": 1.0},
    }


def test_tensor_parallelism_gets_a_packed_placement_group_of_gpu_bundles() -> None:
    plan = plan_replicas(
        text_spec(replicas=2), settings(), per_replica_capacity=64, tensor_parallel_size=4
    )
    options = plan.deployment_options()
    assert options["num_replicas"] == 2
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}
    assert options["placement_group_bundles"] == [{"CPU": 1.0}] + [{"GPU": 1.0}] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    with pytest.raises(ValueError, match="tensor_parallel_size 4 needs 4"):
        plan_replicas(
            text_spec(resources={"gpus": 2}),
            settings(),
            per_replica_capacity=64,
            tensor_parallel_size=4,
        )


def test_the_registry_records_one_deployment_per_base_model() -> None:
    recorder = ModelDeployments(settings(models_file=EXAMPLE, ray_model_replicas=2))
    registry = build_model_registry(settings(models_file=EXAMPLE, ray_model_replicas=2), recorder)
    assert sorted(recorder.deployments) == ["editor", "sd15-sketch", "sketch", "writer"]
    assert recorder.deployments["writer"].name == "model-writer"
    assert deployment_name("Org/Model v2") == "model-Org_Model_v2"
    # The loaders run in the replicas: they must travel there.
    loader = cloudpickle.loads(cloudpickle.dumps(recorder.deployments["writer"].loader))
    assert loader.args[0].served_model_name == "writer"  # type: ignore[attr-defined]
    # What the ingress lets run at once is every replica's worth.
    writer = registry.find("writer")
    assert writer.capacity == 2 * settings().text_max_num_seqs
    assert registry.find("sketch").capacity == 2


def test_tensor_parallel_models_run_vllm_workers_on_ray() -> None:
    recorder = ModelDeployments(settings())
    build_model_registry(settings(text_tensor_parallel_size=2), recorder)
    (text,) = [d for d in recorder.deployments.values() if d.kind == "text"]
    options = text.loader.args[0]  # type: ignore[union-attr]
    assert options.distributed_executor_backend == "ray"
    assert text.plan.deployment_options()["placement_group_bundles"][1:] == [{"GPU": 1.0}] * 2


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"replicas": 0}, "replicas: at least 1"),
        ({"replicas": {"min": 3, "max": 2}}, "min (3) is above max (2)"),
        ({"replicas": {"max": 2, "target_ongoing_requests": 0}}, "greater than 0"),
        ({"resources": {"gpus": -1}}, "greater than or equal to 0"),
        ({"resources": {"tpus": 1}}, "Extra inputs are not permitted"),
        ({"max_ongoing_requests": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_replica_fields_are_refused_with_the_field(
    tmp_path: Path, entry: dict[str, object], message: str
) -> None:
    path = tmp_path / "models.yaml"
    fields = ", ".join(f"{key}: {value}" for key, value in entry.items())
    path.write_text(f"models:\n  - {{name: a, kind: text, source: x, {fields}}}\n")
    with pytest.raises(ModelsFileError, match=r"models\[0\] \(a\)") as error:
        build_model_registry(settings(models_file=path))
    assert message in str(error.value)


def test_an_adapter_cannot_have_replicas_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n  - {name: a, kind: text, source: x}\n"
        "  - {name: b, kind: text, base: a, lora: /tmp, replicas: 2}\n"
    )
    with pytest.raises(ModelsFileError, match="replicas: an adapter runs on its base model's"):
        build_model_registry(settings(models_file=path))


def test_several_ingress_replicas_need_shared_keys_jobs_and_limits() -> None:
    check_shared_state(settings(ray_ingress_replicas=1))
    with pytest.raises(ValueError, match="DATABASE_URL=postgresql") as error:
        check_shared_state(settings(ray_ingress_replicas=2, rate_limit_per_minute=10))
    assert "REDIS_URL=redis" in str(error.value)
    with pytest.raises(ValueError, match="SQLite file"):
        check_shared_state(settings(ray_ingress_replicas=2, database_url="sqlite:////tmp/keys.db"))
    check_shared_state(
        settings(
            ray_ingress_replicas=3,
            database_url="postgresql://fictures@db/fictures",
            rate_limit_per_minute=10,
            redis_url="redis://cache:6379/0",
        )
    )
    with pytest.raises(ValueError, match="API keys and jobs are in an SQLite file"):
        check_shared_state(settings(ray_ingress_replicas=2, require_api_key=False))
    with pytest.raises(ValueError, match="RAY_INGRESS_REPLICAS=2"):
        build_application(settings(ray_ingress_replicas=2))


def test_the_application_asks_ray_for_a_cpu_per_model_replica_and_half_for_the_ingress() -> None:
    assert logical_cpus_needed(settings(ray_model_replicas=2)) == 2 * 2 + 0.5
    assert logical_cpus_needed(settings(models_file=EXAMPLE)) == 4 + 0.5


async def test_the_ingress_registry_serves_the_handles_and_refuses_unloads() -> None:
    recorder = ModelDeployments(settings(models_file=EXAMPLE))
    build_model_registry(settings(models_file=EXAMPLE), recorder)
    handles = {name: object() for name in recorder.deployments}
    engines = RayEngines(handles, dict.fromkeys(recorder.deployments, 3))
    registry = build_model_registry(settings(models_file=EXAMPLE, ray_model_replicas=3), engines)
    writer = registry.find("writer")
    assert writer.capacity == 3 * settings().text_max_num_seqs
    assert writer.lazy.name == "writer"
    with pytest.raises(ConflictError, match="runs on Ray Serve replicas"):
        await registry.unload("editor")


ERRORS: list[FicturesError] = [
    InvalidRequestError("bad", param="top_p", value=3),
    ContextLengthExceededError(prompt_tokens=10, max_tokens=5, max_model_len=12),
    ModelNotFoundError("nope", kind="text", available=["writer"]),
    ConflictError("busy", model="writer"),
    RateLimitedError("slow down", retry_after=7),
    ServiceUnavailableError("later", retry_after=3),
    ModelLoadError("broken", model="writer", retry_after=5),
    GenerationError("failed"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda error: type(error).__name__)
def test_errors_cross_the_handle_whole(error: FicturesError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_an_error_raised_in_a_replica_is_ours_again_and_a_dead_replica_a_generation_error() -> None:
    cause = InvalidRequestError("bad schema", param="response_format")
    wrapped = RayTaskError("generate", "traceback", cause)
    assert replica_error(wrapped, model="writer") is cause
    lost = replica_error(ActorDiedError(), model="writer")
    assert isinstance(lost, GenerationError)
    assert "replica of 'writer' serving this request stopped" in lost.message


async def test_the_ingress_drops_its_request_id_header_only_when_ray_adds_the_same() -> None:
    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        await send(  # type: ignore[operator]
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-request-id", b"ours"), (b"x-fictures-replica", b"r1")],
            }
        )

    for incoming, kept in ((b"ours", []), (b"theirs", [(b"x-request-id", b"ours")])):
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)  # noqa: B023

        scope = {"type": "http", "headers": [(b"x-request-id", incoming)]}
        await _without_echoed_request_id(app)(scope, None, send)  # type: ignore[arg-type]
        assert sent[0]["headers"] == [*kept, (b"x-fictures-replica", b"r1")]


def test_tool_choice_auto_is_refused_plainly_on_ray_when_the_model_has_a_parser() -> None:
    info = TextModelInfo(name="writer", framework="vLLM", max_model_len=4096, source="x")
    assert RayTextEngine(object(), info).tool_call_parser(()) is None
    with pytest.raises(InvalidRequestError, match="not available with `serve --ray`") as error:
        RayTextEngine(object(), info, tool_call_parser="hermes").tool_call_parser(())
    assert error.value.param == "tool_choice"


def chunk(n: int, *, last: bool = False, logprob: float | None = None) -> TextChunk:
    return TextChunk(
        delta=f"t{n} ",
        prompt_tokens=3,
        completion_tokens=n,
        finish_reason="length" if last else None,
        logprobs=(TokenLogprob(token=f"t{n}", logprob=logprob),) if logprob is not None else None,
        token_ids=[n],
    )


def test_merged_chunks_say_what_the_chunks_said() -> None:
    merged = merge_chunks([chunk(1, logprob=-0.5), chunk(2), chunk(3, last=True, logprob=-1.0)])
    assert merged.delta == "t1 t2 t3 "
    assert list(merged.token_ids) == [1, 2, 3]
    assert merged.completion_tokens == 3
    assert merged.finish_reason == "length"
    assert merged.logprobs is not None
    assert [item.logprob for item in merged.logprobs] == [-0.5, -1.0]


async def timed(
    steps: list[tuple[float, TextChunk]], closed: list[bool] | None = None
) -> AsyncIterator[TextChunk]:
    """Each chunk after its pause (seconds)."""
    try:
        for pause, item in steps:
            await asyncio.sleep(pause)
            yield item
    finally:
        if closed is not None:
            closed.append(True)


async def collect(chunks: AsyncIterator[TextChunk]) -> list[list[int]]:
    return [list(item.token_ids) async for item in chunks]


async def test_a_fast_stream_is_sent_a_few_tokens_per_message() -> None:
    steps = [(0.0, chunk(n, last=n == 10)) for n in range(1, 11)]
    # The first goes at once; the rest came within the window, and the last closes it.
    assert await collect(coalesce(timed(steps), 0.05)) == [[1], list(range(2, 11))]


async def test_a_slow_stream_is_sent_token_by_token_and_a_pause_flushes_the_window() -> None:
    slow = [(0.03, chunk(n, last=n == 3)) for n in range(1, 4)]
    assert await collect(coalesce(timed(slow), 0.01)) == [[1], [2], [3]]
    paused = [(0.0, chunk(1)), (0.0, chunk(2)), (0.3, chunk(3, last=True))]
    # 2 waits for the window (50 ms), not for 3, which comes 300 ms later.
    assert await collect(coalesce(timed(paused), 0.05)) == [[1], [2], [3]]


async def test_closing_the_coalesced_stream_closes_the_engines_and_errors_follow_the_tokens() -> (
    None
):
    closed: list[bool] = []
    stream = coalesce(timed([(0.0, chunk(n)) for n in range(1, 100)], closed), 0.05)
    assert [item.completion_tokens async for item in _first(stream)] == [1]
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed == [True]

    async def failing() -> AsyncIterator[TextChunk]:
        yield chunk(1)
        yield chunk(2)
        raise GenerationError("engine died")

    seen: list[list[int]] = []

    async def read_all() -> None:
        async for item in coalesce(failing(), 0.05):
            seen.append(list(item.token_ids))

    with pytest.raises(GenerationError, match="engine died"):
        await read_all()
    assert seen == [[1], [2]]  # what came before the error is sent first


async def _first(stream: AsyncIterator[TextChunk]) -> AsyncIterator[TextChunk]:
    yield await anext(stream)


def test_gpus_needed_counts_each_models_first_replicas(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  - {name: a, kind: text, source: x, replicas: {min: 2, max: 4}, resources: {gpus: 1}}\n"
        "  - {name: b, kind: text, source: x, replicas: {min: 0, max: 2}, resources: {gpus: 1}}\n"
        "  - {name: c, kind: text, source: x}\n"
    )
    assert gpus_needed(settings(models_file=path, generation_mode="text")) == 2


def test_replicas_that_are_neither_a_count_nor_bounds_say_what_they_may_be(
    tmp_path: Path,
) -> None:
    path = tmp_path / "models.yaml"
    path.write_text('models:\n  - {name: a, kind: text, source: x, replicas: "two"}\n')
    with pytest.raises(ModelsFileError, match=r"replicas: a count \(2\) or bounds"):
        build_model_registry(settings(models_file=path))


class FakeRenderStream:
    """What ``handle.options(stream=True).render.remote(batch)`` returns: the replica's items
    (an exception among them is raised there), and ``cancel``."""

    def __init__(self, items: list[object]) -> None:
        self._items = iter(items)
        self.cancelled = False

    def __aiter__(self) -> FakeRenderStream:
        return self

    async def __anext__(self) -> object:
        item = next(self._items, StopAsyncIteration())
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeImageHandle:
    """A deployment handle whose replicas answer ``render`` with ``attempts``, one per call."""

    def __init__(self, *attempts: list[object]) -> None:
        self._attempts = list(attempts)
        self.batches: list[list[ImageGenerationParams]] = []
        self.streams: list[FakeRenderStream] = []

    def options(self, *, stream: bool) -> FakeImageHandle:
        assert stream
        return self

    @property
    def render(self) -> FakeImageHandle:
        return self

    def remote(self, batch: list[ImageGenerationParams]) -> FakeRenderStream:
        self.batches.append(batch)
        self.streams.append(FakeRenderStream(self._attempts.pop(0)))
        return self.streams[-1]


IMAGE_INFO = ImageModelInfo(
    name="painter", framework="diffusers", device="cpu", dtype="float32", source="x"
)


async def test_a_batch_is_one_replica_call_and_every_request_sees_its_steps() -> None:
    images = [GeneratedImage(png=b"a", width=8, height=8, seed=1), GeneratedImage(b"b", 8, 8, 2)]
    handle = FakeImageHandle(["model-painter#r1", (1, 2), (2, 2), images])
    engine = RayImageEngine(handle, IMAGE_INFO, batches=True)
    steps: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
    request = RequestContext(request_id="r")
    token = bind_request(request)
    try:
        batch = [
            ImageGenerationParams(prompt="a", seed=1),
            ImageGenerationParams(prompt="b", seed=2),
        ]
        got = await engine.generate_batch(
            batch,
            progress=[lambda *step: steps[0].append(step), lambda *step: steps[1].append(step)],
        )
    finally:
        unbind_request(token)
    assert got == images
    assert handle.batches == [batch]
    assert steps == ([(1, 2), (2, 2)], [(1, 2), (2, 2)])
    assert request.response_headers["X-Fictures-Replica"] == "model-painter#r1"
    assert engine.batches
    assert handle.streams[0].cancelled


async def test_a_batch_whose_replica_died_before_its_first_step_goes_to_another() -> None:
    image = GeneratedImage(png=b"a", width=8, height=8, seed=1)
    handle = FakeImageHandle(["model-painter#r1", ActorDiedError()], ["model-painter#r2", [image]])
    engine = RayImageEngine(handle, IMAGE_INFO)
    assert await engine.generate(ImageGenerationParams(prompt="a", seed=1)) == image
    assert len(handle.batches) == 2
    # Lost after a step: the render is not sent again.
    handle = FakeImageHandle(["model-painter#r1", (1, 2), ActorDiedError()])
    with pytest.raises(GenerationError, match="serving this request stopped"):
        await RayImageEngine(handle, IMAGE_INFO).generate(ImageGenerationParams(prompt="a", seed=1))
    assert len(handle.batches) == 1
