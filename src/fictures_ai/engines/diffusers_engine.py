"""The diffusers image engine: any text-to-image pipeline, rendered in a worker thread.

``AutoPipelineForText2Image`` loads a hub id or a local folder (SDXL base on a GPU by default,
the tiny offline pipeline of :mod:`fictures_ai.engines.tiny_pipeline` on a CPU). A diffusers
pipeline object is not thread-safe, so the engine owns an executor of ``IMAGE_MAX_CONCURRENCY``
render threads (one by default), each with its own view of the pipeline: renders run there in
the order they arrive, and the event loop only awaits them. Cancelling the awaiting task stops
the render at the end of the current denoising step.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fictures_ai.engines.base import (
    GeneratedImage,
    ImageEngine,
    ImageGenerationParams,
    ImageModelInfo,
    ProgressCallback,
    centre_crop_box,
    covering_size,
)
from fictures_ai.engines.options import DiffusersEngineOptions
from fictures_ai.engines.tiny_pipeline import (
    TINY_IMAGE_MODEL,
    build_tiny_sdxl_pipeline,
    is_tiny_pipeline,
)
from fictures_ai.errors import (
    GenerationError,
    ModelLoadError,
    ServiceUnavailableError,
)
from fictures_ai.shared import ImageScheduler

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


def resolve_image_model(options: DiffusersEngineOptions) -> ResolvedImageModel:
    """Return the image model to load for ``options``.

    ``options.model`` when set; otherwise SDXL base on a GPU and the tiny random-weight
    pipeline on a CPU, built under ``MODEL_CACHE_DIR`` on first use. Building blocks for 1-2 s:
    call this off the event loop.
    """
    if options.model:
        return describe_source(options.model)
    if resolve_image_device(options) == "cuda":
        return ResolvedImageModel(
            source=DEFAULT_GPU_IMAGE_MODEL, name=DEFAULT_GPU_IMAGE_MODEL, is_tiny=False
        )
    folder = build_tiny_sdxl_pipeline(options.cache_dir)
    return ResolvedImageModel(source=str(folder), name=TINY_IMAGE_MODEL, is_tiny=True)


def describe_source(source: str) -> ResolvedImageModel:
    """Name a hub id by itself, a folder by its last part, the tiny pipeline by its own name."""
    if is_tiny_pipeline(source):
        return ResolvedImageModel(source=source, name=TINY_IMAGE_MODEL, is_tiny=True)
    path = Path(source)
    name = path.name if path.is_dir() else source.rstrip("/")
    return ResolvedImageModel(source=source, name=name, is_tiny=False)


class _RenderCancelled(Exception):
    """Raised inside the step callback to leave the pipeline call at once.

    Setting the pipeline's ``_interrupt`` flag alone only skips the remaining steps: the VAE
    still decodes the latents, which at large sizes takes as long as several steps.
    """


class DiffusersImageEngine(ImageEngine):
    """An :class:`ImageEngine` over one diffusers text-to-image pipeline.

    Build it with :meth:`load`. At most ``max_concurrency`` renders run at once (one thread
    each); further ``generate`` calls queue in arrival order; a call cancelled while queued
    never starts.
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
    ) -> None:
        """Wrap an already loaded and placed ``pipeline``; most callers want :meth:`load`.

        ``torch_threads``, when set, is the number of CPU threads each render thread uses;
        ``max_concurrency`` is how many renders run at once, each in its own thread.
        """
        self._pipeline: Any = pipeline
        self._model = model
        self._device = device
        self._dtype = dtype
        self._closed = False
        self._max_concurrency = max_concurrency
        self._thread_pipelines = threading.local()
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
        )

    async def generate(
        self, params: ImageGenerationParams, *, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        """Render one image in the engine's worker thread and return it as PNG.

        Any width and height are served: the pipeline renders the smallest size it can produce
        that covers them (:meth:`render_size`), and the few pixels over are cropped evenly from
        the edges, so the PNG has exactly the requested size and nothing is stretched.

        Cancelling the awaiting task stops the render after the current denoising step; the
        ``CancelledError`` is re-raised once the worker has let go of the pipeline. Raises
        ``GenerationError`` when the pipeline fails (including running out of memory) and
        ``ServiceUnavailableError`` after :meth:`shutdown`.
        """
        self._check_open()
        cancelled = threading.Event()
        job = self._executor.submit(self._render, params, progress, cancelled)
        render = asyncio.wrap_future(job)
        try:
            # Shielded so that cancelling this task does not abandon a running render: the
            # worker is told to stop and awaited below, so the next render finds the pipeline
            # free and this request's memory released.
            image = await asyncio.shield(render)
        except asyncio.CancelledError:
            cancelled.set()
            if not job.cancel():  # a queued render is dropped; a running one stops after
                await asyncio.gather(render, return_exceptions=True)  # its current step
            raise
        except _RenderCancelled:
            # Only shutdown cancels a render whose task is still waiting for it.
            raise ServiceUnavailableError("The image engine shut down during the render.") from None
        png = await asyncio.to_thread(_encode_png, image)
        return GeneratedImage(png=png, width=image.width, height=image.height, seed=params.seed)

    async def check_health(self) -> None:
        """Return when the engine can render; raise ``ServiceUnavailableError`` after shutdown."""
        self._check_open()

    def model_info(self) -> ImageModelInfo:
        """Describe the pipeline; ``notice`` warns when it is the random-weight tiny one."""
        return ImageModelInfo(
            name=self._model.name,
            framework="diffusers",
            device=self._device,
            dtype=_dtype_name(self._dtype),
            source=self._model.source,
            notice=TINY_PIPELINE_NOTICE if self._model.is_tiny else None,
        )

    async def shutdown(self) -> None:
        """Stop the running render after its current step, fail queued ones, free the memory."""
        if self._closed:
            return
        self._closed = True
        self._pipeline = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        gc.collect()
        if self._device == "cuda":
            import torch

            torch.cuda.empty_cache()
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

    def _render(
        self,
        params: ImageGenerationParams,
        progress: ProgressCallback | None,
        cancelled: threading.Event,
    ) -> Image:
        """Run the pipeline; called in a render thread."""
        import torch

        pipeline = self._thread_pipeline()
        if cancelled.is_set():
            raise _RenderCancelled

        def on_step_end(
            pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            if cancelled.is_set() or self._closed:
                pipe._interrupt = True
                raise _RenderCancelled
            if progress is not None:
                total = getattr(pipe, "num_timesteps", None) or params.num_inference_steps
                progress(step + 1, int(total))
            return callback_kwargs

        # A CPU generator gives the same initial noise for a seed on every device.
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        render_width, render_height = self.render_size(params.width, params.height)
        try:
            result = pipeline(
                prompt=params.prompt,
                negative_prompt=params.negative_prompt,
                width=render_width,
                height=render_height,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=generator,
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
        except _RenderCancelled:
            raise
        except torch.OutOfMemoryError as exc:
            logger.exception("Image render ran out of memory")
            raise GenerationError(
                f"The image pipeline ran out of memory rendering {params.width}x{params.height}. "
                "Try a smaller size, or set IMAGE_VAE_TILING=true, IMAGE_ATTENTION_SLICING=true "
                "or IMAGE_CPU_OFFLOAD=model."
            ) from exc
        except Exception as exc:
            logger.exception("Image render failed")
            raise GenerationError(f"The image pipeline failed: {exc}") from exc
        image: Image = result.images[0]
        if image.size != (params.width, params.height):
            image = image.crop(centre_crop_box(image.size, (params.width, params.height)))
        return image

    def _thread_pipeline(self) -> Any:
        """The pipeline this render thread uses.

        With one render at a time that is the pipeline itself. With more, each thread gets its
        own view of the same components (``from_pipe`` shares the weights, no extra memory)
        with its own copies of the components that hold per-call state, which concurrent
        renders must not share: the scheduler (timesteps, step index) and the tokenizers (a
        fast tokenizer sets padding and truncation on its one Rust object on every call, so
        two threads sharing it get each other's padding or ``RuntimeError: Already borrowed``;
        huggingface/transformers#47085, huggingface/tokenizers#537).
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


def _encode_png(image: Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
