"""The diffusers image engine: any text-to-image pipeline, rendered in a worker thread.

``AutoPipelineForText2Image`` loads a hub id, a local folder or one of the tiny offline
pipelines of :mod:`fictures_ai.engines.tiny_pipeline` (SDXL base on a GPU by default, the tiny
SDXL pipeline on a CPU). A diffusers pipeline object is not thread-safe, so the engine owns an
executor of ``IMAGE_MAX_CONCURRENCY`` render threads (one by default), each with its own view
of the pipeline: renders run there in the order they arrive, and the event loop only awaits
them. Cancelling the awaiting task stops the render at the end of the current denoising step.
A batch of renders that share size, steps, guidance and adapters (``generate_batch``) is one
pipeline call with a list of prompts and one seeded generator per image.

LoRA adapters (``ImageLora``) are loaded into the pipeline once, by name, and activated per
render. The render threads share the denoiser's modules, and diffusers keeps the active
adapters and their weights on those modules, so a gate (:class:`_AdapterGate`) lets only
renders with the same adapters and weights run at once, in arrival order.
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import ctypes.util
import gc
import io
import itertools
import logging
import math
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fictures_ai.engines.base import (
    GeneratedImage,
    ImageEngine,
    ImageGenerationParams,
    ImageLora,
    ImageModelInfo,
    ProgressCallback,
    centre_crop_box,
    covering_size,
)
from fictures_ai.engines.options import DiffusersEngineOptions
from fictures_ai.engines.tiny_image_lora import build_tiny_sdxl_lora
from fictures_ai.engines.tiny_pipeline import (
    TINY_IMAGE_MODEL,
    TINY_SD15_IMAGE_MODEL,
    build_tiny_sd15_pipeline,
    build_tiny_sdxl_pipeline,
    tiny_pipeline_name,
)
from fictures_ai.errors import (
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    ServiceUnavailableError,
)
from fictures_ai.shared import (
    BUNDLED_TINY_SD15,
    BUNDLED_TINY_SDXL,
    BUNDLED_TINY_SDXL_LORA,
    ImageScheduler,
)

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image


logger = logging.getLogger(__name__)

DEFAULT_GPU_IMAGE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
"""The image model served on a GPU when ``IMAGE_MODEL_NAME`` is unset."""

TINY_PIPELINE_NOTICE = (
    "This is the tiny offline test pipeline: it has random weights and draws noise, not "
    f"pictures. For real images set IMAGE_MODEL_NAME={DEFAULT_GPU_IMAGE_MODEL} on a machine "
    "with a GPU."
)


@dataclass(frozen=True, slots=True)
class ResolvedImageModel:
    """Which image model to load: ``source`` (hub id or folder) and the ``name`` to report."""

    source: str
    name: str
    is_tiny: bool


def resolve_image_device(options: DiffusersEngineOptions) -> str:
    """Return ``"cuda"`` or ``"cpu"``: the configured device, or CUDA when torch sees one."""
    if options.device != "auto":
        return options.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_image_dtype(options: DiffusersEngineOptions, device: str) -> torch.dtype:
    """Return the pipeline dtype: the configured one, or float16 on CUDA and float32 on CPU."""
    import torch

    name = options.dtype
    if name == "auto":
        name = "float16" if device == "cuda" else "float32"
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def validate_image_options(options: DiffusersEngineOptions, device: str) -> None:
    """Raise ``ValueError`` with a clear message for options that cannot work on ``device``.

    Meant for start-up, before any model is loaded, so a misconfiguration never surfaces as a
    failed request. ``device`` is the resolved device (see :func:`resolve_image_device`).
    """
    if device == "cpu" and options.cpu_offload != "none":
        raise ValueError(
            f"IMAGE_CPU_OFFLOAD={options.cpu_offload} needs a GPU: it moves idle parts "
            "of the pipeline from the accelerator to main memory, and on the CPU everything "
            "already lives there. Set IMAGE_CPU_OFFLOAD=none."
        )
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                "IMAGE_DEVICE=cuda, but torch sees no CUDA device (is this the CPU build of "
                "torch, or is CUDA_VISIBLE_DEVICES empty?). Set IMAGE_DEVICE=auto or cpu."
            )


_BUNDLED_PIPELINES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    BUNDLED_TINY_SDXL: (TINY_IMAGE_MODEL, build_tiny_sdxl_pipeline),
    BUNDLED_TINY_SD15: (TINY_SD15_IMAGE_MODEL, build_tiny_sd15_pipeline),
}
"""The bundled image sources: the name each reports and the function that builds it."""


def resolve_image_model(options: DiffusersEngineOptions) -> ResolvedImageModel:
    """Return the image model to load for ``options``, with ``source`` a hub id or a folder.

    ``options.model`` when set (``BUNDLED_TINY_SDXL`` and ``BUNDLED_TINY_SD15`` are built under
    ``options.cache_dir`` on first use); otherwise SDXL base on a GPU and the tiny SDXL
    pipeline on a CPU. Building blocks for 1-2 s: call this off the event loop.
    """
    model = options.model
    if not model and resolve_image_device(options) == "cuda":
        return ResolvedImageModel(
            source=DEFAULT_GPU_IMAGE_MODEL, name=DEFAULT_GPU_IMAGE_MODEL, is_tiny=False
        )
    if not model or model in _BUNDLED_PIPELINES:
        name, build = _BUNDLED_PIPELINES[model or BUNDLED_TINY_SDXL]
        return ResolvedImageModel(source=str(build(options.cache_dir)), name=name, is_tiny=True)
    return describe_source(model)


def describe_source(source: str) -> ResolvedImageModel:
    """Name an image source without loading or building it: a hub id by itself, a folder by
    its last part, a bundled source or a tiny pipeline folder by the tiny pipeline's name.

    ``source`` is returned as given (a bundled source stays unbuilt: see
    :func:`resolve_image_model`); ``is_tiny`` says whether the pipeline has random weights.
    """
    bundled = _BUNDLED_PIPELINES.get(source)
    tiny_name = bundled[0] if bundled else tiny_pipeline_name(source)
    if tiny_name:
        return ResolvedImageModel(source=source, name=tiny_name, is_tiny=True)
    path = Path(source)
    name = path.name if path.is_dir() else source.rstrip("/")
    return ResolvedImageModel(source=source, name=name, is_tiny=False)


class _RenderCancelled(Exception):
    """Raised inside the step callback to leave the pipeline call at once.

    Setting the pipeline's ``_interrupt`` flag alone only skips the remaining steps: the VAE
    still decodes the latents, which at large sizes takes as long as several steps.
    """


AdapterKey = tuple[tuple[str, float], ...]
"""The adapters of one render and their weights, sorted by name; ``()`` is the base model."""


class _AdapterGate:
    """Admits renders in arrival order so that renders running at once share one adapter set.

    Each render enters with a key (its :data:`AdapterKey`). A render is admitted when it is
    first in line and either nothing runs (it then *leads*: its ``setup`` loads and activates
    its adapters before anyone joins) or the running renders have its key and their leader
    has finished ``setup``. So renders with one key run together; another key waits until the
    running ones finish; and a render that arrives while another key waits queues behind it,
    even if its own key is running, so no key starves. A key no other equals (a fresh
    ``object()``) runs alone: loading an adapter into the shared modules is such a step.

    Thread-based rather than asyncio-based: a render waits in the render thread it was given
    (the executor hands out threads in arrival order too), so the gate belongs to no event
    loop and the engine may be awaited from any.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._line: deque[object] = deque()
        self._running = 0
        self._key: Hashable = None
        self._settled = False
        self._closed = False

    def enter(
        self, key: Hashable, *, cancelled: threading.Event, setup: Callable[[], None]
    ) -> None:
        """Block until admitted with ``key``; the caller must :meth:`leave` afterwards.

        A leader runs ``setup`` first; if it raises, the render is not admitted (no
        :meth:`leave` then) and the exception propagates. Raises ``_RenderCancelled`` when
        ``cancelled`` is set or the gate closes while waiting; the render's place in line is
        given up either way.
        """
        ticket = object()
        with self._condition:
            self._line.append(ticket)
            try:
                while True:
                    if cancelled.is_set() or self._closed:
                        raise _RenderCancelled
                    if self._line[0] is ticket and (
                        self._running == 0 or (self._settled and self._key == key)
                    ):
                        break
                    self._condition.wait()
            finally:
                self._line.remove(ticket)
                self._condition.notify_all()  # the next in line may be admitted now
            leads = self._running == 0
            self._running += 1
            if leads:
                self._key, self._settled = key, False
        if not leads:
            return
        try:
            setup()
        except BaseException:
            self.leave()
            raise
        with self._condition:
            self._settled = True
            self._condition.notify_all()

    def leave(self) -> None:
        """End an admitted render's turn."""
        with self._condition:
            self._running -= 1
            self._condition.notify_all()

    def interrupt(self) -> None:
        """Wake the waiting renders to look at their ``cancelled`` events again."""
        with self._condition:
            self._condition.notify_all()

    def close(self) -> None:
        """Fail every waiting and later :meth:`enter` with ``_RenderCancelled``."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()


@dataclass(frozen=True, slots=True)
class _LoadedLora:
    """An adapter in the pipeline: as requested (``lora.path`` may name a bundled adapter),
    the file or folder it was loaded from, and its name inside the pipeline (``adapter``)."""

    lora: ImageLora
    path: str
    adapter: str


_T = TypeVar("_T")


class DiffusersImageEngine(ImageEngine):
    """An :class:`ImageEngine` over one diffusers text-to-image pipeline.

    Build it with :meth:`load`. At most ``max_concurrency`` renders run at once (one thread
    each); further ``generate`` calls queue in arrival order; a call cancelled while queued
    never starts. Renders with different LoRA adapters or weights never overlap: they take
    turns through :class:`_AdapterGate`, in arrival order.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        model: ResolvedImageModel,
        device: str,
        dtype: torch.dtype,
        torch_threads: int | None = None,
        max_concurrency: int = 1,
        cache_dir: Path | None = None,
    ) -> None:
        """Wrap an already loaded and placed ``pipeline``; most callers want :meth:`load`.

        ``torch_threads``, when set, is the number of CPU threads each render thread uses;
        ``max_concurrency`` is how many renders run at once, each in its own thread;
        ``cache_dir`` is where bundled adapters (``BUNDLED_TINY_SDXL_LORA``) are built (None:
        they are refused).
        """
        self._pipeline: Any = pipeline
        self._model = model
        self._device = device
        self._dtype = dtype
        self._closed = False
        self._max_concurrency = max_concurrency
        self._cache_dir = cache_dir
        self._thread_pipelines = threading.local()
        self._gate = _AdapterGate()
        # Both change only in a gate turn that runs alone (a leader's setup): no lock needed.
        self._loras: dict[str, _LoadedLora] = {}
        self._adapter_ids = itertools.count()
        self._applied: AdapterKey | None = ()  # the adapters active on the modules; None: unknown
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrency,
            thread_name_prefix="diffusers-render",
            initializer=_set_torch_threads,
            initargs=(torch_threads,),
        )

    @classmethod
    async def load(cls, options: DiffusersEngineOptions) -> DiffusersImageEngine:
        """Load the pipeline of ``options`` in a worker thread and return the engine.

        Raises ``ModelLoadError`` when the options cannot work on this machine or the pipeline
        fails to load.
        """
        _set_torch_threads(options.torch_threads)
        device = resolve_image_device(options)
        name_for_errors = options.model or "default image model"
        try:
            validate_image_options(options, device)
        except ValueError as exc:
            raise ModelLoadError(str(exc), model=name_for_errors) from exc
        resolved = await asyncio.to_thread(resolve_image_model, options)
        dtype = resolve_image_dtype(options, device)
        if device == "cpu" and _dtype_name(dtype) == "float16":
            logger.warning(
                "IMAGE_DTYPE=float16 on the CPU is very slow; bfloat16 or float32 is faster"
            )
        if resolved.is_tiny:
            logger.warning("Image model: %s", TINY_PIPELINE_NOTICE)
        logger.info(
            "Loading image model %s on %s (%s)", resolved.source, device, _dtype_name(dtype)
        )
        try:
            pipeline = await asyncio.to_thread(
                _load_pipeline, resolved.source, options=options, device=device, dtype=dtype
            )
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load the image model '{resolved.source}': {exc}", model=resolved.name
            ) from exc
        logger.info("Image model %s ready", resolved.name)
        return cls(
            pipeline,
            model=resolved,
            device=device,
            dtype=dtype,
            torch_threads=options.torch_threads,
            max_concurrency=options.max_concurrency,
            cache_dir=options.cache_dir,
        )

    async def generate(
        self, params: ImageGenerationParams, *, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        """Render one image in the engine's worker thread and return it as PNG.

        Any width and height are served: the pipeline renders the smallest size it can produce
        that covers them (:meth:`render_size`), and the few pixels over are cropped evenly from
        the edges, so the PNG has exactly the requested size and nothing is stretched.

        ``params.loras`` not loaded yet are loaded first (as :meth:`add_lora` loads them); the
        render then runs with exactly those adapters at their weights (none: the base model),
        after the running renders with other adapters finish.

        Cancelling the awaiting task stops the render after the current denoising step; the
        ``CancelledError`` is re-raised once the worker has let go of the pipeline. Raises
        ``InvalidRequestError`` (``param="loras"``) for an adapter that cannot be used (the
        pipeline is unchanged then), ``GenerationError`` when the pipeline fails (including
        running out of memory) and ``ServiceUnavailableError`` after :meth:`shutdown`.
        """
        images = await self.generate_batch([params], progress=[progress])
        return images[0]

    async def generate_batch(
        self,
        batch: Sequence[ImageGenerationParams],
        *,
        progress: Sequence[ProgressCallback | None] | None = None,
    ) -> list[GeneratedImage]:
        """Render ``batch`` in one pipeline call: a list of prompts (and negative prompts)
        and one CPU ``torch.Generator`` per image, seeded with its own seed, so that each
        image's initial noise is the one it gets alone. What stays the same for the whole
        call (size, steps, guidance scale, adapters) must be equal: ``ValueError`` otherwise
        (:meth:`ImageGenerationParams.batch_key`).

        ``progress`` callbacks are each called after every denoising step of the call. As
        :meth:`generate` otherwise: cancelling stops the whole call after its current step.
        """
        if not batch:
            return []
        first = batch[0]
        if any(params.batch_key() != first.batch_key() for params in batch[1:]):
            raise ValueError("The renders of one batch must share size, steps, guidance and LoRAs.")
        self._check_open()
        _check_loras(first.loras)
        for lora in first.loras:
            self._check_not_loaded_elsewhere(lora)
        callbacks = [callback for callback in progress or () if callback is not None]
        cancelled = threading.Event()
        images = await self._in_render_thread(
            self._render, tuple(batch), callbacks, cancelled=cancelled
        )
        pngs = await asyncio.to_thread(lambda: [_encode_png(image) for image in images])
        return [
            GeneratedImage(png=png, width=image.width, height=image.height, seed=params.seed)
            for png, image, params in zip(pngs, images, batch, strict=True)
        ]

    @property
    def batches(self) -> bool:
        """True: a batch is one pipeline call."""
        return True

    async def add_lora(self, lora: ImageLora) -> None:
        """Load ``lora`` into the pipeline under ``lora.name`` now, so that renders naming it
        start without loading it; adding a loaded name again with the same path is a no-op.

        ``lora.path`` is a LoRA weights file (``.safetensors``), a folder holding one, or
        ``BUNDLED_TINY_SDXL_LORA`` (built under the engine's cache folder); nothing is
        downloaded. Loading changes modules the renders use, so it waits, in line with them,
        until no render runs. ``lora.weight`` plays no part here: each render gives its own.

        Raises ``InvalidRequestError`` (``param="loras"``) when the path is missing or
        unreadable, the weights do not fit this pipeline (another architecture), the name is
        loaded from another path, or the pipeline takes no adapters; the pipeline is exactly as
        before then. ``ServiceUnavailableError`` after :meth:`shutdown`.
        """
        self._check_open()
        _check_loras((lora,))
        if self._check_not_loaded_elsewhere(lora):
            return
        cancelled = threading.Event()
        await self._in_render_thread(self._add_lora, lora, cancelled=cancelled)

    async def check_health(self) -> None:
        """Return when the engine can render; raise ``ServiceUnavailableError`` after shutdown."""
        self._check_open()

    def model_info(self) -> ImageModelInfo:
        """Describe the pipeline; ``notice`` warns when it is a random-weight tiny one."""
        return ImageModelInfo(
            name=self._model.name,
            framework="diffusers",
            device=self._device,
            dtype=_dtype_name(self._dtype),
            source=self._model.source,
            notice=TINY_PIPELINE_NOTICE if self._model.is_tiny else None,
        )

    async def shutdown(self) -> None:
        """Stop the running render after its current step, fail waiting ones, free the memory.

        Once it returns, the pipeline, its adapters and the render threads are gone and the
        freed memory is handed back to the operating system (glibc's ``malloc_trim``), so the
        process's resident size falls back to about what it was before :meth:`load`.
        """
        if self._closed:
            return
        self._closed = True
        self._gate.close()
        self._pipeline = None
        self._loras = {}
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        # The render threads' pipeline views died with the threads; drop the holder too.
        self._thread_pipelines = threading.local()
        await asyncio.to_thread(_release_memory, self._device)
        logger.info("Image engine shut down")

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceUnavailableError("The image engine has shut down.")

    def render_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the pipeline renders for a request of ``width`` x ``height`` pixels.

        A multiple of the VAE's scale factor (8 for SDXL), doubled for transformer models,
        which pack 2x2 latent patches (Flux, SD3, Qwen-Image: 16).
        """
        pipeline = self._pipeline
        multiple = int(getattr(pipeline, "vae_scale_factor", 8))
        if getattr(pipeline, "transformer", None) is not None:
            multiple *= 2
        return covering_size(width, height, multiple=multiple)

    async def _in_render_thread(
        self, function: Callable[..., _T], *args: Any, cancelled: threading.Event
    ) -> _T:
        """Run ``function(*args, cancelled)`` in a render thread and await its result.

        Cancelling the awaiting task sets ``cancelled`` (which the function watches: in the
        gate's line and at each denoising step) and waits until the thread lets go.
        """
        try:
            job = self._executor.submit(function, *args, cancelled)
        except RuntimeError:  # the executor shut down since _check_open
            raise ServiceUnavailableError("The image engine has shut down.") from None
        future = asyncio.wrap_future(job)
        try:
            # Shielded so that cancelling this task does not abandon a running render: the
            # worker is told to stop and awaited below, so the next render finds the pipeline
            # free and this request's memory released.
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()
            self._gate.interrupt()  # a render waiting in the gate's line leaves it
            if not job.cancel():  # a queued job is dropped; a running one stops after
                await asyncio.gather(future, return_exceptions=True)  # its current step
            raise
        except _RenderCancelled:
            # Only shutdown cancels a job whose task is still waiting for it.
            raise ServiceUnavailableError(
                "The image engine shut down during the request."
            ) from None

    def _render(
        self,
        batch: tuple[ImageGenerationParams, ...],
        progress: list[ProgressCallback],
        cancelled: threading.Event,
    ) -> list[Image]:
        """Load and activate the batch's adapters (one set for all), then run the pipeline;
        called in a render thread."""
        loras = batch[0].loras
        # Resolved before the gate: building the bundled adapter must not hold up renders.
        paths = {
            lora.name: self._resolve_lora_path(lora)
            for lora in loras
            if lora.name not in self._loras
        }
        key = _adapter_key(loras)
        self._gate.enter(key, cancelled=cancelled, setup=lambda: self._activate(loras, paths, key))
        try:
            return self._run_pipeline(batch, progress, cancelled)
        finally:
            self._gate.leave()

    def _add_lora(self, lora: ImageLora, cancelled: threading.Event) -> None:
        """Load ``lora`` in a gate turn of its own; called in a render thread."""
        path = self._resolve_lora_path(lora)
        # A key equal to no other: the load runs while no render does.
        self._gate.enter(object(), cancelled=cancelled, setup=lambda: self._load_lora(lora, path))
        self._gate.leave()

    def _run_pipeline(
        self,
        batch: tuple[ImageGenerationParams, ...],
        progress: list[ProgressCallback],
        cancelled: threading.Event,
    ) -> list[Image]:
        """Run the pipeline once for ``batch`` with the adapters already active; called in a
        render thread."""
        import torch

        pipeline = self._thread_pipeline()
        if cancelled.is_set():
            raise _RenderCancelled
        params = batch[0]

        def on_step_end(
            pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            if cancelled.is_set() or self._closed:
                pipe._interrupt = True
                raise _RenderCancelled
            total = getattr(pipe, "num_timesteps", None) or params.num_inference_steps
            for callback in progress:
                callback(step + 1, int(total))
            return callback_kwargs

        # One CPU generator per image: diffusers draws each image's initial noise from its
        # own generator when given a list, so an image does not depend on its batch, and a
        # CPU generator gives the same noise for a seed on every device.
        generators = [torch.Generator(device="cpu").manual_seed(item.seed) for item in batch]
        render_width, render_height = self.render_size(params.width, params.height)
        negative = (
            None if params.negative_prompt is None else [item.negative_prompt for item in batch]
        )
        try:
            result = pipeline(
                prompt=[item.prompt for item in batch],
                negative_prompt=negative,
                width=render_width,
                height=render_height,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=generators,
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
        except _RenderCancelled:
            raise
        except torch.OutOfMemoryError as exc:
            logger.exception("Image render ran out of memory")
            raise GenerationError(
                f"The image pipeline ran out of memory rendering {len(batch)} image(s) of "
                f"{params.width}x{params.height}. Try a smaller size or IMAGE_MAX_BATCH, or set "
                "IMAGE_VAE_TILING=true, IMAGE_ATTENTION_SLICING=true or IMAGE_CPU_OFFLOAD=model."
            ) from exc
        except Exception as exc:
            logger.exception("Image render failed")
            raise GenerationError(f"The image pipeline failed: {exc}") from exc
        images: list[Image] = list(result.images)
        size = (params.width, params.height)
        return [
            image if image.size == size else image.crop(centre_crop_box(image.size, size))
            for image in images
        ]

    def _thread_pipeline(self) -> Any:
        """The pipeline this render thread uses.

        With one render at a time that is the pipeline itself. With more, each thread gets its
        own view of the same components (``from_pipe`` shares the weights, no extra memory)
        with its own copies of the components that hold per-call state, which concurrent
        renders must not share: the scheduler (timesteps, step index) and the tokenizers (a
        fast tokenizer sets padding and truncation on its one Rust object on every call, so
        two threads sharing it get each other's padding or ``RuntimeError: Already borrowed``;
        huggingface/transformers#47085, huggingface/tokenizers#537). The adapters are state
        of the shared denoiser and text encoders: the gate keeps them the same for every
        render running at once.
        """
        if self._pipeline is None:
            raise ServiceUnavailableError("The image engine has shut down.")
        if self._max_concurrency == 1:
            return self._pipeline
        view = getattr(self._thread_pipelines, "pipeline", None)
        if view is None:
            from transformers import PreTrainedTokenizerBase

            base = self._pipeline
            per_call_state = {
                name: copy.deepcopy(component)
                for name, component in base.components.items()
                if name == "scheduler" or isinstance(component, PreTrainedTokenizerBase)
            }
            view = type(base).from_pipe(base, **per_call_state)
            view.set_progress_bar_config(disable=True)
            self._thread_pipelines.pipeline = view
        return view

    def _live_pipeline(self) -> Any:
        if self._pipeline is None:
            raise ServiceUnavailableError("The image engine has shut down.")
        return self._pipeline

    def _check_not_loaded_elsewhere(self, lora: ImageLora) -> bool:
        """Whether ``lora.name`` is loaded (from ``lora.path``); ``InvalidRequestError`` when
        it is loaded from another path."""
        loaded = self._loras.get(lora.name)
        if loaded is None:
            return False
        if loaded.lora.path != lora.path:
            raise InvalidRequestError(
                f"LoRA '{lora.name}' is already loaded from '{loaded.lora.path}', not "
                f"'{lora.path}': an adapter name stands for one set of weights per engine. "
                "Give the other adapter its own name.",
                param="loras",
                value=lora.name,
            )
        return True

    def _resolve_lora_path(self, lora: ImageLora) -> str:
        """The local file or folder to load ``lora`` from, building the bundled adapter.

        Raises ``InvalidRequestError`` when there is nothing at the path (checked here so that
        diffusers never goes looking for it on the Hugging Face hub).
        """
        if lora.path == BUNDLED_TINY_SDXL_LORA:
            if self._cache_dir is None:
                raise InvalidRequestError(
                    f"LoRA '{lora.name}': this image engine has no cache folder to build "
                    f"{BUNDLED_TINY_SDXL_LORA} in.",
                    param="loras",
                    value=lora.path,
                )
            try:
                return str(build_tiny_sdxl_lora(self._cache_dir))
            except OSError as exc:
                logger.exception("Could not build %s", BUNDLED_TINY_SDXL_LORA)
                raise GenerationError(
                    f"Could not build {BUNDLED_TINY_SDXL_LORA} under {self._cache_dir}: {exc}"
                ) from exc
        path = Path(lora.path).expanduser()
        if not path.exists():
            raise InvalidRequestError(
                f"LoRA '{lora.name}': there is no file or folder '{lora.path}' on the image "
                "server. Give the path of a LoRA weights file (.safetensors) or of the folder "
                f"holding it, or {BUNDLED_TINY_SDXL_LORA}.",
                param="loras",
                value=lora.path,
            )
        return str(path)

    def _activate(
        self, loras: tuple[ImageLora, ...], paths: dict[str, str], key: AdapterKey
    ) -> None:
        """Load what is missing of ``loras`` and make ``key`` the active adapters; a gate
        leader's setup, so no render runs meanwhile."""
        for lora in loras:
            if not self._check_not_loaded_elsewhere(lora):
                self._load_lora(lora, paths.get(lora.name) or self._resolve_lora_path(lora))
        if self._applied == key:
            return
        pipeline = self._live_pipeline()
        self._applied = None
        try:
            if self._loras:  # without adapters the modules are the base model's as loaded
                if key:
                    pipeline.enable_lora()
                    pipeline.set_adapters(
                        [self._loras[name].adapter for name, _ in key],
                        adapter_weights=[weight for _, weight in key],
                    )
                else:
                    pipeline.disable_lora()
        except Exception as exc:
            logger.exception("Could not activate the LoRA adapters %s", key)
            raise GenerationError(f"Could not activate the LoRA adapters: {exc}") from exc
        self._applied = key

    def _load_lora(self, lora: ImageLora, path: str) -> None:
        """Load ``lora`` from ``path`` into the pipeline, checking that all of its weights
        found their layers; on any failure remove what was loaded and raise
        ``InvalidRequestError``. Runs alone in the gate."""
        if self._check_not_loaded_elsewhere(lora):
            return
        pipeline = self._live_pipeline()
        if not hasattr(pipeline, "load_lora_weights"):
            raise InvalidRequestError(
                f"LoRA '{lora.name}': the image model {self._model.name} "
                f"({type(pipeline).__name__}) takes no LoRA adapters.",
                param="loras",
                value=lora.name,
            )
        # The name inside the pipeline: peft keys each adapter's layers by it in module
        # dictionaries, which refuse a '.' and names of module attributes ('to', 'train').
        adapter = f"a{next(self._adapter_ids)}_{re.sub(r'[^0-9A-Za-z_]', '_', lora.name)[:48]}"
        logger.info("Loading LoRA %s from %s (adapter %s)", lora.name, path, adapter)
        self._applied = None  # loading activates the new adapter on its modules
        try:
            expected = _lora_tensor_count(pipeline, path)
            pipeline.load_lora_weights(path, adapter_name=adapter, local_files_only=True)
            found = _adapter_tensor_count(pipeline, adapter)
            if found < expected:
                raise ValueError(
                    f"{expected - found} of its {expected} weight tensors match no layer of "
                    "this model"
                )
        except Exception as exc:
            self._remove_adapter(adapter)
            reason = _load_failure_reason(exc)
            logger.warning(
                "LoRA %s (%s) cannot be used with %s: %s", lora.name, path, self._model.name, reason
            )
            raise InvalidRequestError(
                f"LoRA '{lora.name}' ({lora.path}) cannot be used with the image model "
                f"{self._model.name} ({type(pipeline).__name__}): {reason}. Check that it is "
                "a LoRA weights file diffusers reads, trained for this model's architecture.",
                param="loras",
                value=lora.path,
            ) from exc
        self._loras[lora.name] = _LoadedLora(lora=lora, path=path, adapter=adapter)

    def _remove_adapter(self, name: str) -> None:
        """Take a half-loaded adapter ``name`` out of the pipeline again."""
        pipeline = self._live_pipeline()
        try:
            if not self._loras:
                # The first adapter: unwrapping every LoRA layer gives back the very modules
                # the pipeline was loaded with.
                pipeline.unload_lora_weights()
            elif any(name in names for names in pipeline.get_list_adapters().values()):
                pipeline.delete_adapters([name])
        except Exception:
            logger.exception("Could not remove the half-loaded LoRA %s", name)


def _load_pipeline(
    source: str, *, options: DiffusersEngineOptions, device: str, dtype: torch.dtype
) -> Any:
    """Load, configure and place the pipeline (blocking; runs in a worker thread)."""
    import torch
    from diffusers import AutoPipelineForText2Image

    _set_torch_threads(options.torch_threads)
    # fp16 weight files only pay off when computing in half precision; for float32 they would
    # throw away precision the default files keep.
    half = dtype in (torch.float16, torch.bfloat16)
    variant = "fp16" if half and _has_fp16_variant(source) else None
    try:
        pipeline = AutoPipelineForText2Image.from_pretrained(  # type: ignore[no-untyped-call]
            source, dtype=dtype, use_safetensors=True, variant=variant
        )
    except (OSError, ValueError) as exc:
        if variant is None:
            raise
        logger.info("No usable fp16 variant of %s (%s); loading the default weights", source, exc)
        pipeline = AutoPipelineForText2Image.from_pretrained(  # type: ignore[no-untyped-call]
            source, dtype=dtype, use_safetensors=True
        )
    pipeline.set_progress_bar_config(disable=True)
    _set_scheduler(pipeline, options.scheduler)
    if options.cpu_offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif options.cpu_offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)
    if options.attention_slicing:
        pipeline.enable_attention_slicing()
    # The pipeline-level enable_vae_* methods are gone in diffusers 0.42; the VAE keeps them.
    if options.vae_slicing:
        pipeline.vae.enable_slicing()
    if options.vae_tiling:
        pipeline.vae.enable_tiling()
    if options.compile:
        denoiser = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"
        logger.info("Compiling the %s with torch.compile (the first image is slow)", denoiser)
        setattr(pipeline, denoiser, torch.compile(getattr(pipeline, denoiser)))
    return pipeline


def _set_scheduler(pipeline: Any, name: ImageScheduler) -> None:
    """Replace the pipeline's scheduler by ``name``'s, keeping its training config."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
    )

    current = type(pipeline.scheduler).__name__
    if current.startswith("FlowMatch"):
        # Flow-matching models (SD3, Flux) only work with their own kind of scheduler.
        logger.warning(
            "Keeping the model's %s: IMAGE_SCHEDULER=%s does not apply to flow-matching models",
            current,
            name,
        )
        return
    config = pipeline.scheduler.config
    if name == "dpm_multistep":
        scheduler = DPMSolverMultistepScheduler.from_config(config)  # type: ignore[no-untyped-call]
    elif name == "dpm_2m_karras":
        scheduler = DPMSolverMultistepScheduler.from_config(  # type: ignore[no-untyped-call]
            config, use_karras_sigmas=True, algorithm_type="dpmsolver++"
        )
    elif name == "euler":
        scheduler = EulerDiscreteScheduler.from_config(config)  # type: ignore[no-untyped-call]
    elif name == "euler_ancestral":
        scheduler = EulerAncestralDiscreteScheduler.from_config(config)  # type: ignore[no-untyped-call]
    else:
        scheduler = LCMScheduler.from_config(config)  # type: ignore[no-untyped-call]
    pipeline.scheduler = scheduler


def _has_fp16_variant(source: str) -> bool:
    """Whether ``source`` ships ``*.fp16.safetensors`` files; True when that cannot be told."""
    path = Path(source)
    if path.is_dir():
        return any(path.glob("*/*.fp16.safetensors"))
    try:
        from huggingface_hub import list_repo_files

        return any(".fp16." in name for name in list_repo_files(source))
    except Exception:
        # Offline or unknown to the hub API: try the variant, and fall back if it is missing.
        logger.debug("Could not list the files of %s", source, exc_info=True)
        return True


def _set_torch_threads(threads: int | None) -> None:
    """Set torch's CPU thread count, in the calling thread as well as for new threads.

    torch keeps the count per thread once a thread has run an operation, so a worker thread
    that already ran torch code ignores a later ``set_num_threads`` made in another thread:
    each thread that renders or loads sets it itself.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)


def _check_loras(loras: tuple[ImageLora, ...]) -> None:
    """Refuse empty adapter names, names given twice, and weights that are not finite numbers
    (``InvalidRequestError``, ``param="loras"``)."""
    names: set[str] = set()
    for lora in loras:
        if not lora.name:
            raise InvalidRequestError(
                "A LoRA adapter needs a name (its name is how renders ask for it).",
                param="loras",
                value=lora.name,
            )
        if lora.name in names:
            raise InvalidRequestError(
                f"LoRA '{lora.name}' is given twice; give each adapter once, with one weight.",
                param="loras",
                value=lora.name,
            )
        if not math.isfinite(lora.weight):
            raise InvalidRequestError(
                f"LoRA '{lora.name}' has weight {lora.weight}; the weight must be a finite "
                "number (1.0: the adapter as trained).",
                param="loras",
                value=lora.weight,
            )
        names.add(lora.name)


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
    r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _load_failure_reason(exc: Exception) -> str:
    """One line saying why diffusers could not load a LoRA, short enough for an error body."""
    text = " ".join(str(exc).split())
    mismatches = _SIZE_MISMATCH.findall(text)
    if mismatches:
        layer, in_file, in_model = mismatches[0]
        return (
            f"{len(mismatches)} of its tensors do not have the shapes of this model's layers "
            f"(first: {layer} is {in_file} in the file, {in_model} in the model), so it was "
            "trained for another architecture"
        )
    return text[:400] or type(exc).__name__


def _adapter_key(loras: tuple[ImageLora, ...]) -> AdapterKey:
    # Sorted: the order adapters are summed in changes the last bits of the result, and the
    # same set asked in another order is the same render.
    return tuple(sorted((lora.name, float(lora.weight)) for lora in loras))


def _lora_tensor_count(pipeline: Any, path: str) -> int:
    """How many weight tensors the LoRA at ``path`` holds, in diffusers' reading of it."""
    result = pipeline.lora_state_dict(path, local_files_only=True)
    state_dict = result[0] if isinstance(result, tuple) else result
    return len(state_dict)


def _adapter_tensor_count(pipeline: Any, name: str) -> int:
    """How many LoRA weight tensors of adapter ``name`` the pipeline's modules hold.

    peft names them ``<layer>.lora_A.<name>.weight``, ``<layer>.lora_B.<name>.bias``,
    ``<layer>.lora_embedding_A.<name>``...; diffusers drops the tensors of a file that match
    no layer with only a log line, so comparing the counts tells whether all of them landed.
    """
    pattern = re.compile(rf"\.lora_\w+\.{re.escape(name)}(?:\.|$)")
    count = 0
    for component in pipeline.components.values():
        if hasattr(component, "named_parameters"):
            count += sum(1 for key, _ in component.named_parameters() if pattern.search(key))
    return count


def _release_memory(device: str) -> None:
    """Collect the dropped pipeline and hand freed heap pages back to the operating system.

    glibc keeps freed memory in its arenas for reuse (most weight tensors are below its
    adaptive mmap threshold once a few have been freed), so without ``malloc_trim`` the
    process's resident size stays near its peak after the pipeline is gone.
    """
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6")
            trim = libc.malloc_trim
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            logger.debug("No malloc_trim in this C library", exc_info=True)
            return
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        trim(0)


def _encode_png(image: Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
