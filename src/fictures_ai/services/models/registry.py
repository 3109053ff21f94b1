"""``ModelRegistry``: the models one server serves, by name, and their life cycle.

Each base model has its own generation service (and so its own lazily loaded engine); a LoRA
adapter is a name that runs on its base model's engine with the adapter chosen per request
(vLLM's ``LoRARequest`` for text, diffusers' adapter weights for images). The registry
resolves the ``model`` of a request (name, alias or, when none is given, the default of its
kind), loads and unloads models (on first use, at start-up, by an admin, after ``keep_alive_s``
idle), and keeps the loaded models under ``MODEL_MEMORY_BUDGET_GB``: loads run one at a time,
each measured (``memory.MemoryProbe``), and before a load that would pass the budget, idle
unpinned models are unloaded, least recently used first. A model with requests in flight is
never unloaded (``LazyModel.use``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from fictures_ai.config import Settings
from fictures_ai.engines.base import (
    ImageEngine,
    ImageGenerationParams,
    ImageLora,
    LoraAdapter,
    TextEngine,
    TextGenerationParams,
)
from fictures_ai.errors import (
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from fictures_ai.observability.metrics import EngineSnapshot, Metrics
from fictures_ai.services.engine_factory import (
    EngineLoaders,
    LocalEngines,
    default_image_source,
    image_device,
    image_engine_options,
    image_model_display_name,
    image_model_notice,
    override_options,
    text_engine_options,
)
from fictures_ai.services.image_generation import ImageGenerationService
from fictures_ai.services.model_loader import LOAD_RETRY_AFTER_S, LazyModel, LoadState
from fictures_ai.services.models.memory import GIB, MemoryProbe
from fictures_ai.services.models.spec import (
    LoadPolicy,
    ModelKind,
    ModelsFileError,
    ModelSpec,
    check_bundled,
    check_model_name,
    load_models_file,
)
from fictures_ai.services.text_generation import TextGenerationService

logger = logging.getLogger(__name__)

GenerationService = TextGenerationService | ImageGenerationService
EngineT = TypeVar("EngineT", TextEngine, ImageEngine)

REAP_INTERVAL_S = 1.0
"""How often idle models are checked against their ``keep_alive_s``."""


@dataclass(eq=False, kw_only=True)
class RegisteredModel:
    """One name clients can pass as ``model``: a base model with its own engine, or a LoRA
    adapter on one (``base`` set)."""

    name: str
    kind: ModelKind
    source: str
    """What it is made from: the base model's source, or the adapter's path."""
    service: GenerationService
    """The service of the engine it runs on (an adapter's is its base's)."""
    aliases: tuple[str, ...] = ()
    default: bool = False
    load: LoadPolicy = "lazy"
    keep_alive_s: float | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    base: RegisteredModel | None = None
    text_lora: LoraAdapter | None = None
    image_lora: ImageLora | None = None
    declared: bool = True
    """From the models file or the settings; False for adapters registered at run time."""
    adapter_error: str | None = None
    """Why the adapter could not be loaded into its base's engine (it is unusable then)."""
    capacity: int = 1
    """Requests its engine runs at once (vLLM's ``max_num_seqs``, the image renders)."""
    max_model_len: int | None = None
    device: str | None = None
    notice: str | None = None
    measured_bytes: int | None = None
    """What the last load cost (bytes), kept after an unload to foresee the next one."""
    lora_enabled: bool = False
    """A text base model whose engine serves LoRA adapters (vLLM's ``enable_lora``)."""

    @property
    def lazy(self) -> LazyModel[Any]:
        """The engine holder of the model it runs on."""
        return self.service.model

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """What the listings say about one model."""

    name: str
    kind: ModelKind
    source: str
    parent: str | None
    """The base model of an adapter (OpenAI's and vLLM's ``parent``)."""
    aliases: tuple[str, ...]
    default: bool
    load: LoadPolicy
    keep_alive_s: float | None
    state: LoadState
    reason: str | None
    """Why it is ``failed`` (the load's or the adapter's error)."""
    memory_bytes: int | None
    """What the loaded engine costs (bytes, measured after its load); None when not loaded."""
    last_used: float | None
    """When a request last used it (Unix time, seconds); None if none has."""
    in_flight: int
    max_model_len: int | None
    device: str | None
    notice: str | None


@dataclass(frozen=True, slots=True)
class TextTarget:
    """The text model a request resolved to: its service, its adapter, its defaults."""

    name: str
    service: TextGenerationService
    lora: LoraAdapter | None
    defaults: Mapping[str, Any]

    def params(self, params: TextGenerationParams) -> TextGenerationParams:
        """``params`` running through this model's adapter (if it is one)."""
        return params if self.lora is None else replace(params, lora=self.lora)


@dataclass(frozen=True, slots=True)
class ImageTarget:
    """The image model a request resolved to, and the adapters a request may add by name."""

    name: str
    service: ImageGenerationService
    loras: tuple[ImageLora, ...]
    adapters: Mapping[str, ImageLora]
    """The adapters declared on the same base model, by name (for a request's ``loras``)."""
    defaults: Mapping[str, Any]

    def params(
        self, params: ImageGenerationParams, requested: Sequence[tuple[str, float]] = ()
    ) -> ImageGenerationParams:
        """``params`` with this model's adapters and the ``(name, weight)`` pairs a request
        asked for (``loras``; this model's own adapter named again: the request's weight wins).

        Raises ``InvalidRequestError`` (``loras[i].name``) for a name that is no adapter of
        this model's base, or one listed twice.
        """
        chosen = {lora.name: lora for lora in self.loras}
        for index, (name, weight) in enumerate(requested):
            if any(other == name for other, _ in requested[:index]):
                raise InvalidRequestError(
                    f"loras[{index}].name: '{name}' is listed twice; give each adapter once",
                    param=f"loras[{index}].name",
                )
            adapter = self.adapters.get(name)
            if adapter is None:
                available = ", ".join(sorted(self.adapters)) or "none"
                raise InvalidRequestError(
                    f"loras[{index}].name: '{name}' is not an adapter of '{self.name}' "
                    f"(adapters here: {available})",
                    param=f"loras[{index}].name",
                )
            chosen[name] = replace(adapter, weight=weight)
        return replace(params, loras=tuple(chosen.values())) if chosen else params


class ModelRegistry:
    """Every model this server serves, by name and alias (see the module docstring)."""

    def __init__(
        self,
        models: Sequence[RegisteredModel],
        *,
        budget_bytes: int | None = None,
        probe: MemoryProbe | None = None,
        preload_all: bool = False,
        remote: bool = False,
    ) -> None:
        """``models`` come from :func:`build_model_registry` (or tests); ``budget_bytes``
        bounds what the loaded models cost together (None: no bound); ``preload_all`` loads
        the lazy models at start-up too (``PRELOAD_MODELS``); ``remote``: the engines run in
        Ray Serve replicas, which Ray places and scales, so this process neither measures,
        unloads nor reaps them."""
        self._models: dict[str, RegisteredModel] = {}
        self._names: dict[str, RegisteredModel] = {}
        for model in models:
            self._add(model)
        self._budget_bytes = budget_bytes
        self._probe = probe or MemoryProbe.for_this_machine()
        self._preload_all = preload_all
        self._remote = remote
        self._load_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        # Adapters registered at run time get ids after those of the models file.
        declared = [model.text_lora.id for model in models if model.text_lora is not None]
        self._adapter_ids = itertools.count(max(declared, default=0) + 1)
        self._reserved: set[str] = set()
        for model in self.bases():
            model.lazy.on_idle = self._idle.set
            model.lazy.wrap_loader(functools.partial(self._loader, model))

    # -- names ----------------------------------------------------------------------------

    def _add(self, model: RegisteredModel) -> None:
        for name in (model.name, *model.aliases):
            if name in self._names:
                raise ValueError(f"the model name '{name}' is taken")
            self._names[name] = model
        self._models[model.name] = model

    def _remove(self, model: RegisteredModel) -> None:
        for name in (model.name, *model.aliases):
            self._names.pop(name, None)
        self._models.pop(model.name, None)

    def models(self, kind: ModelKind | None = None) -> list[RegisteredModel]:
        """The models in declaration order (adapters registered at run time last)."""
        return [model for model in self._models.values() if kind is None or model.kind == kind]

    def bases(self) -> list[RegisteredModel]:
        """The models with an engine of their own."""
        return [model for model in self._models.values() if not model.is_adapter]

    def kinds(self) -> set[ModelKind]:
        """The kinds of model this server serves."""
        return {model.kind for model in self._models.values()}

    def default(self, kind: ModelKind) -> RegisteredModel | None:
        """The model a request of ``kind`` without ``model`` uses."""
        models = self.models(kind)
        return next((model for model in models if model.default), models[0] if models else None)

    def find(self, name: str) -> RegisteredModel:
        """The model ``name`` names (its name or an alias), of any kind.

        Raises ``ModelNotFoundError`` listing every model.
        """
        model = self._names.get(name)
        if model is None:
            raise ModelNotFoundError(name, kind="served", available=list(self._models))
        return model

    def resolve(self, name: str | None, kind: ModelKind) -> RegisteredModel:
        """The ``kind`` model a request names (None: the default one).

        Raises ``ModelNotFoundError`` listing the models of ``kind``.
        """
        model = self.default(kind) if name is None else self._names.get(name)
        if model is None or model.kind != kind:
            available = [model.name for model in self.models(kind)]
            raise ModelNotFoundError(name or "(default)", kind=kind, available=available)
        return model

    def text(self, name: str | None) -> TextTarget:
        """The text model a request names, ready to use. Raises ``ModelNotFoundError``, and
        ``ServiceUnavailableError`` for an adapter that failed to load into its base."""
        model = self.resolve(name, "text")
        _check_adapter(model)
        assert isinstance(model.service, TextGenerationService)
        return TextTarget(model.name, model.service, model.text_lora, self._defaults(model))

    def image(self, name: str | None) -> ImageTarget:
        """The image model a request names, ready to use (as :meth:`text`)."""
        model = self.resolve(name, "image")
        _check_adapter(model)
        assert isinstance(model.service, ImageGenerationService)
        base = model.base or model
        adapters = {
            other.name: other.image_lora
            for other in self.models("image")
            if other.base is base and other.image_lora is not None
        }
        loras = (model.image_lora,) if model.image_lora is not None else ()
        return ImageTarget(model.name, model.service, loras, adapters, self._defaults(model))

    @staticmethod
    def _defaults(model: RegisteredModel) -> Mapping[str, Any]:
        if model.base is None:
            return model.defaults
        return {**model.base.defaults, **model.defaults}

    # -- listings -------------------------------------------------------------------------

    def status(self, model: RegisteredModel) -> ModelStatus:
        """How ``model`` stands now (an adapter: as its base, unless it failed itself)."""
        lazy = model.lazy
        state, reason = lazy.state, lazy.last_error if lazy.state is LoadState.FAILED else None
        if model.adapter_error is not None:
            state, reason = LoadState.FAILED, model.adapter_error
        device, notice = model.device, model.notice
        if isinstance(model.service, ImageGenerationService):  # the loaded pipeline's own word
            info = model.service.info()
            device, notice = info.device, info.notice
        return ModelStatus(
            name=model.name,
            kind=model.kind,
            source=model.source,
            parent=model.base.name if model.base is not None else None,
            aliases=model.aliases,
            default=model.default,
            load=(model.base or model).load,
            keep_alive_s=(model.base or model).keep_alive_s,
            state=state,
            reason=reason,
            memory_bytes=lazy.memory_bytes if model.base is None else None,
            last_used=lazy.last_used,
            in_flight=lazy.in_flight,
            max_model_len=model.max_model_len,
            device=device,
            notice=notice,
        )

    def statuses(self, kind: ModelKind | None = None) -> list[ModelStatus]:
        """Every model of ``kind`` (None: all), as :meth:`status` describes it."""
        return [self.status(model) for model in self.models(kind)]

    def engine_snapshots(self) -> list[EngineSnapshot]:
        """Each engine's state for the metrics (read at scrape time)."""
        snapshots = []
        for model in self.bases():
            service = model.service
            info = service.info()
            # vLLM queues inside its scheduler: waiting text requests count as running here,
            # and its own split comes in the engine's stats.
            waiting = getattr(info, "waiting", None)
            snapshots.append(
                EngineSnapshot(
                    engine=model.kind,
                    model=model.name,
                    state=info.state.value,
                    states=[state.value for state in LoadState],
                    running=info.running,
                    waiting=waiting,
                    waiting_for_load=info.waiting_for_load,
                    load_seconds=info.load_seconds,
                    load_failures=info.load_failures,
                    memory_bytes=info.memory_bytes,
                    last_used=info.last_used,
                    engine_stats=getattr(info, "engine_stats", None),
                )
            )
        return snapshots

    def instrument(self, metrics: Metrics) -> None:
        """Every engine records its figures in ``metrics`` under its ``model`` label."""
        for model in self.bases():
            model.service.instrument(metrics)
            metrics.engine_capacity.labels(model.kind, model.name).set(model.capacity)

    # -- load, unload, budget -------------------------------------------------------------

    async def load(self, name: str) -> ModelStatus:
        """Load ``name`` (an adapter: its base) now; returns its status once loaded.

        Raises ``ModelNotFoundError``, ``ModelLoadError`` when it cannot load, and
        ``ServiceUnavailableError`` when the budget cannot make room for it.
        """
        model = self.find(name)
        await model.service.initialize()
        return self.status(model)

    async def unload(self, name: str) -> ModelStatus:
        """Unload ``name``'s engine now and free its memory.

        Raises ``ModelNotFoundError``; ``ConflictError`` for an adapter (its base's engine
        serves other names), a pinned model, a model with requests in flight or one loading.
        """
        model = self.find(name)
        if model.base is not None:
            removal = (
                "it is declared in the models file"
                if model.declared
                else f"remove it with DELETE /api/v1/models/{model.name}"
            )
            raise ConflictError(
                f"'{model.name}' is an adapter on '{model.base.name}', whose engine it shares: "
                f"unload '{model.base.name}' to free the memory ({removal}).",
                model=model.name,
            )
        if model.load == "pinned":
            raise ConflictError(
                f"'{model.name}' is pinned (load: pinned): it is never unloaded.", model=model.name
            )
        if self._remote:
            raise ConflictError(
                f"'{model.name}' runs on Ray Serve replicas, which Ray starts and stops: size "
                "it with `replicas` in the models file ({min: 0, max: N} scales it to nothing "
                "while unused) or RAY_MODEL_REPLICAS, and redeploy.",
                model=model.name,
            )
        await model.lazy.unload()
        return self.status(model)

    def _loader(
        self, model: RegisteredModel, load: Callable[[], Awaitable[EngineT]]
    ) -> Callable[[], Awaitable[EngineT]]:
        """``load`` run one at a time, within the budget, measured, with the model's adapters
        added to the fresh engine."""

        async def measured_load() -> EngineT:
            if self._remote:  # Ray places the replicas by their resources
                engine = await load()
                await self._add_adapters(model, engine)
                return engine
            async with self._load_lock:
                await self._make_room(model, model.measured_bytes or 0, loading=True)
                before = await asyncio.to_thread(self._probe.used_bytes)
                engine = await load()
                after = await asyncio.to_thread(self._probe.used_bytes)
                model.measured_bytes = max(after - before, 0)
                model.lazy.memory_bytes = model.measured_bytes
                logger.info(
                    "%s uses %.2f GiB (%s, measured across its load)",
                    model.name,
                    model.measured_bytes / GIB,
                    "GPU memory" if self._probe.kind == "gpu" else "process-tree RSS",
                )
                await self._make_room(model, 0, loading=False)
            await self._add_adapters(model, engine)
            return engine

        return measured_load

    def _loaded_bytes(self, excluding: RegisteredModel | None = None) -> int:
        return sum(
            model.lazy.memory_bytes or 0
            for model in self.bases()
            if model is not excluding and model.lazy.engine is not None
        )

    async def _make_room(self, model: RegisteredModel, needed: int, *, loading: bool) -> None:
        """Unload idle unpinned models, least recently used first, until the loaded models
        (``model`` included, at ``needed`` bytes more) fit the budget.

        Before a load that cannot fit, raises ``ServiceUnavailableError`` naming the models
        that hold the memory (unless no other model is loaded: a model larger than the budget
        alone still loads, with a warning). After a load, logs what is still over.
        """
        budget = self._budget_bytes
        if budget is None:
            return

        def over() -> int:
            own = 0 if loading else model.lazy.memory_bytes or 0
            return self._loaded_bytes(excluding=model) + own + needed - budget

        while over() > 0:
            idle = [
                other
                for other in self.bases()
                if other is not model and other.load != "pinned" and other.lazy.idle
            ]
            if not idle:
                break
            victim = min(idle, key=lambda other: other.lazy.idle_since)
            logger.info(
                "Unloading %s (idle, least recently used) to keep the models under "
                "MODEL_MEMORY_BUDGET_GB=%.2f while loading %s",
                victim.name,
                budget / GIB,
                model.name,
            )
            try:
                await victim.lazy.unload()
            except ConflictError:  # a request took it meanwhile
                continue
        excess = over()
        if excess <= 0:
            return
        holders = [
            f"{other.name} ({(other.lazy.memory_bytes or 0) / GIB:.2f} GiB, "
            f"{'pinned' if other.load == 'pinned' else f'{other.lazy.in_flight} in flight'})"
            for other in self.bases()
            if other is not model and other.lazy.engine is not None
        ]
        if loading and holders:
            raise ServiceUnavailableError(
                f"Loading '{model.name}' (about {needed / GIB:.2f} GiB) would pass "
                f"MODEL_MEMORY_BUDGET_GB={budget / GIB:.2f}, and the models holding memory are "
                f"busy or pinned: {', '.join(holders)}. Try again once they are idle.",
                retry_after=LOAD_RETRY_AFTER_S,
            )
        logger.warning(
            "The loaded models use %.2f GiB over MODEL_MEMORY_BUDGET_GB=%.2f (%s)",
            excess / GIB,
            budget / GIB,
            ", ".join(holders) or f"{model.name} alone is larger than the budget",
        )

    # -- adapters at run time -------------------------------------------------------------

    async def register_adapter(self, name: str, *, base: str, lora: str) -> ModelStatus:
        """Register the text LoRA adapter ``lora`` (an absolute local path or a ``bundled:``
        name) on ``base`` under ``name``, as vLLM's runtime adapter loading does.

        The adapter is loaded into the base's engine (loading the base if needed) before the
        name exists, so a bad adapter is refused here and never reaches a request; a failed
        registration leaves the name free.

        Raises ``ConflictError`` for a taken name, ``ModelNotFoundError`` for an unknown
        base, ``InvalidRequestError`` for an adapter the engine refuses (or a base that is an
        image model, an adapter, or has LoRA off), and what loading the base raises.
        """
        try:
            check_model_name(name)
        except ValueError as exc:
            raise InvalidRequestError(f"name: {exc}", param="name") from None
        if name in self._names or name in self._reserved:
            raise ConflictError(f"The model name '{name}' is taken.", model=name)
        parent = self.find(base)
        if parent.kind != "text" or parent.base is not None:
            raise InvalidRequestError(
                f"base: '{base}' is not a text base model; adapters registered at run time are "
                "text LoRA adapters on a text model (image adapters are declared in the models "
                "file).",
                param="base",
            )
        if not parent.lora_enabled:
            raise InvalidRequestError(
                f"base: LoRA adapters are off for the text model '{parent.name}': set "
                "'enable_lora: true' in its options in the models file (or TEXT_ENABLE_LORA=true "
                "without one) and restart the server.",
                param="base",
            )
        try:
            check_bundled(lora, "text", "lora")
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="lora") from None
        if not (lora.startswith("bundled:") or Path(lora).is_absolute()):
            raise InvalidRequestError(
                f"lora: '{lora}' must be an absolute path on the server, or a bundled: name.",
                param="lora",
            )
        service = parent.service
        assert isinstance(service, TextGenerationService)
        adapter = LoraAdapter(name=name, id=next(self._adapter_ids), path=lora)
        self._reserved.add(name)
        try:
            async with service.model.use() as engine:
                await engine.add_lora(adapter)
        finally:
            self._reserved.discard(name)
        model = RegisteredModel(
            name=name,
            kind="text",
            source=lora,
            service=service,
            base=parent,
            text_lora=adapter,
            declared=False,
            max_model_len=parent.max_model_len,
        )
        self._add(model)
        logger.info("Registered the LoRA adapter %s on %s (%s)", name, base, lora)
        return self.status(model)

    async def remove_adapter(self, name: str) -> None:
        """Remove an adapter registered at run time and free its slot in the engine.

        Raises ``ModelNotFoundError``; ``ConflictError`` for a base model, an adapter
        declared in the models file, or one with requests in flight.
        """
        model = self.find(name)
        if model.base is None:
            raise ConflictError(
                f"'{model.name}' is a base model: base models are unloaded "
                f"(POST /api/v1/models/{model.name}/unload), not removed.",
                model=model.name,
            )
        if model.declared or model.text_lora is None:
            raise ConflictError(
                f"'{model.name}' is declared in the models file; remove it there (only adapters "
                "registered at run time are removed here).",
                model=model.name,
            )
        service = model.service
        assert isinstance(service, TextGenerationService)
        busy = service.adapter_requests(model.text_lora.id)
        if busy:
            raise ConflictError(
                f"'{model.name}' has requests in flight ({busy}); remove it once they finish.",
                model=model.name,
            )
        self._remove(model)
        service.forget_adapter(model.text_lora.id)
        engine = service.model.engine
        if engine is not None:
            await engine.remove_lora(model.text_lora)
        logger.info("Removed the LoRA adapter %s", model.name)

    async def _add_adapters(self, base: RegisteredModel, engine: TextEngine | ImageEngine) -> None:
        """Load the adapters on ``base`` into its fresh engine; one that fails is marked
        failed (with the engine's reason) and the base serves on."""
        for model in self.models(base.kind):
            if model.base is not base:
                continue
            try:
                if isinstance(engine, TextEngine) and model.text_lora is not None:
                    await engine.add_lora(model.text_lora)
                elif isinstance(engine, ImageEngine) and model.image_lora is not None:
                    await engine.add_lora(model.image_lora)
            except InvalidRequestError as exc:
                model.adapter_error = exc.message
                logger.error("The adapter %s cannot be used: %s", model.name, exc.message)
            else:
                model.adapter_error = None

    # -- running ----------------------------------------------------------------------------

    async def run(self, health_interval_s: float) -> None:
        """Supervise the engines, unload models idle past ``keep_alive_s`` and preload the
        ``preload``/``pinned`` models, until cancelled (the app's lifespan)."""
        tasks = [
            asyncio.create_task(
                model.service.supervise(health_interval_s), name=f"supervise {model.name}"
            )
            for model in self.bases()
        ]
        tasks.append(asyncio.create_task(self._preload(), name="preload models"))
        try:
            await self._reap()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _preload(self) -> None:
        for model in self.bases():
            if model.load == "lazy" and not self._preload_all:
                continue
            try:
                await model.service.initialize()
            except Exception:
                logger.warning("Preloading %s failed; requests will retry the load", model.name)

    async def _reap(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
            # arrives as the event is set (the app's shutdown right after a request ends).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REAP_INTERVAL_S):
                    await self._idle.wait()
            self._idle.clear()
            if self._remote:
                continue
            now = time.monotonic()
            for model in self.bases():
                keep_alive = model.keep_alive_s
                lazy = model.lazy
                if keep_alive is None or model.load == "pinned" or not lazy.idle:
                    continue
                if now - lazy.idle_since >= keep_alive:
                    logger.info("Unloading %s: unused for %.0f s", model.name, keep_alive)
                    try:
                        await lazy.unload()
                    except ConflictError:  # a request took it meanwhile
                        continue

    async def shutdown(self) -> None:
        """Release every engine (the app's lifespan end)."""
        for model in self.bases():
            await model.service.shutdown()


def _check_adapter(model: RegisteredModel) -> None:
    """Raise ``ServiceUnavailableError`` for an adapter its base's engine refused."""
    if model.adapter_error is not None and model.base is not None:
        raise ServiceUnavailableError(
            f"The adapter '{model.name}' could not be loaded into '{model.base.name}': "
            f"{model.adapter_error}",
            retry_after=LOAD_RETRY_AFTER_S,
        )


# -- building ---------------------------------------------------------------------------------


def build_model_registry(settings: Settings, engines: EngineLoaders | None = None) -> ModelRegistry:
    """The registry ``settings`` describe: the models file's models, or one text and one image
    model from the ``TEXT_``/``IMAGE_`` settings; only the kinds ``GENERATION_MODE`` serves.
    ``engines`` says where each base model's engine comes from (default: this process).

    Raises ``ModelsFileError`` (entry and field named) or ``ValueError`` (settings that cannot
    work on this machine).
    """
    if settings.models_file is not None:
        specs = load_models_file(settings.models_file).models
    else:
        specs = _specs_from_settings(settings)
    served = {"text": settings.serves_text, "image": settings.serves_images}
    specs = [spec for spec in specs if served[spec.kind]]
    engines = engines or LocalEngines()
    bases: dict[str, RegisteredModel] = {}
    models: list[RegisteredModel] = []
    adapter_ids = itertools.count(1)
    with_adapters = {spec.base for spec in specs if spec.base is not None}
    for index, spec in enumerate(specs):
        try:
            if spec.base is None:
                model = _base_model(
                    spec, settings, engines, has_adapters=spec.name in with_adapters
                )
                bases[spec.name] = model
            else:
                model = _adapter(spec, bases[spec.base], next(adapter_ids))
        except ValueError as exc:
            where = f"MODELS_FILE={settings.models_file}: models[{index}] ({spec.name}): "
            raise ModelsFileError((where if settings.models_file else "") + str(exc)) from None
        models.append(model)
    budget = settings.model_memory_budget_gb
    return ModelRegistry(
        models,
        budget_bytes=int(budget * GIB) if budget is not None and not engines.remote else None,
        # Remote engines are loaded already (Ray starts the replicas): connect at start-up.
        preload_all=settings.preload_models or engines.remote,
        remote=engines.remote,
    )


def _specs_from_settings(settings: Settings) -> list[ModelSpec]:
    """Today's behaviour as a models file: the ``TEXT_``/``IMAGE_`` models, default, lazy
    (``PRELOAD_MODELS`` preloads them), never unloaded."""
    specs = []
    if settings.serves_text:
        options = text_engine_options(settings)
        specs.append(
            ModelSpec(name=options.display_name, kind="text", source=options.model, default=True)
        )
    if settings.serves_images:
        image_options = image_engine_options(settings)
        device = image_device(image_options)
        source = image_options.model or default_image_source(device)
        name = image_model_display_name(image_options, device)
        specs.append(ModelSpec(name=name, kind="image", source=source, default=True))
    return specs


def _base_model(
    spec: ModelSpec, settings: Settings, engines: EngineLoaders, *, has_adapters: bool
) -> RegisteredModel:
    """A base model with its own service and engine options (the settings', then the entry's
    ``options``); ``has_adapters``: the file declares adapters on it. Its capacity is that of
    all the engines ``engines`` serves it with."""
    common: dict[str, Any] = {
        "name": spec.name,
        "kind": spec.kind,
        "source": spec.source or "",
        "aliases": tuple(spec.aliases),
        "default": spec.default,
        "load": spec.load,
        "keep_alive_s": spec.keep_alive_s,
        "defaults": dict(spec.defaults),
    }
    if spec.kind == "text":
        settings_options = text_engine_options(settings)
        # An entry that picks another speculative method than draft_model does not inherit
        # TEXT_SPECULATIVE_MODEL (only draft_model takes one).
        method = spec.options.get("speculative_method", "draft_model")
        if method != "draft_model" and "speculative_model" not in spec.options:
            settings_options = replace(
                settings_options, speculative_method="none", speculative_model=None
            )
        text_options = override_options(
            replace(
                settings_options,
                model=spec.source or "",
                served_model_name=spec.name,
                # vLLM serves adapters only with LoRA on: a base the file gives adapters has it.
                enable_lora=settings_options.enable_lora or has_adapters,
            ),
            spec.options,
        )
        text_loader = engines.text(spec, text_options)
        replicas = engines.replicas(spec)
        text = TextGenerationService(
            model_name=spec.name,
            max_model_len=text_options.max_model_len,
            loader=text_loader,
            max_pending=settings.text_max_pending,
            timeout_s=settings.request_timeout_s,
            response_cache_bytes=settings.response_cache_max_bytes,
        )
        return RegisteredModel(
            **common,
            service=text,
            capacity=text_options.max_num_seqs * replicas,
            max_model_len=text_options.max_model_len,
            lora_enabled=text_options.enable_lora,
        )
    image_options = override_options(
        replace(image_engine_options(settings), model=spec.source or None), spec.options
    )
    device = image_device(image_options)
    notice = image_model_notice(image_options, device)
    image_loader = engines.image(spec, image_options)
    replicas = engines.replicas(spec)
    image = ImageGenerationService(
        model_name=spec.name,
        device=device,
        max_concurrency=image_options.max_concurrency * replicas,
        loader=image_loader,
        max_queue=settings.image_max_queue,
        timeout_s=settings.request_timeout_s,
        notice=notice,
        response_cache_bytes=settings.response_cache_max_bytes,
        max_batch=settings.image_max_batch,
        batch_wait_s=settings.image_batch_wait_ms / 1000,
    )
    return RegisteredModel(
        **common,
        service=image,
        capacity=image_options.max_concurrency * replicas,
        device=device,
        notice=notice,
    )


def _adapter(spec: ModelSpec, base: RegisteredModel, adapter_id: int) -> RegisteredModel:
    lora = spec.lora or ""
    model = RegisteredModel(
        name=spec.name,
        kind=spec.kind,
        source=lora,
        service=base.service,
        aliases=tuple(spec.aliases),
        default=spec.default,
        defaults=dict(spec.defaults),
        base=base,
        max_model_len=base.max_model_len,
        device=base.device,
        notice=base.notice,
    )
    if spec.kind == "text":
        model.text_lora = LoraAdapter(name=spec.name, id=adapter_id, path=lora)
    else:
        weight = 1.0 if spec.lora_weight is None else spec.lora_weight
        model.image_lora = ImageLora(name=spec.name, path=lora, weight=weight)
    return model
