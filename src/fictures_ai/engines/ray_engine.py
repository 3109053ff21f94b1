"""Engines in Ray Serve replicas, reached through deployment handles (``serve --ray``).

To the services these are engines like any other: :class:`RayTextEngine` streams the chunks a
model replica's vLLM engine produces, :class:`RayImageEngine` the progress and the images of a
replica's diffusers pipeline (a batch the render queue formed is one call to one replica).
Ray Serve's router picks the replica (the least busy of two it samples) and replaces dead
ones; what crosses the handle is this package's frozen dataclasses, pickled, and our own
errors, whole (``FicturesError`` pickles its attributes).

Each replica's stream starts with the replica's name, which the response carries as
``X-Fictures-Replica``. A request whose replica dies before it produced anything is sent once
more (to a live replica); one that dies mid-stream ends with ``GenerationError``. Closing a
stream, or ``abort``, cancels the request in its replica, which aborts it in the engine: Ray
Serve propagates the cancellation through the handle (its HTTP proxy alone would not).

Priorities: a text request's travels inside its ``TextGenerationParams`` (``priority``) to the
replica's vLLM scheduler. Image priorities are kept by the render queue of the ingress's
``ImageGenerationService`` in front of this engine: it lets through as many renders (each a
batch of up to ``IMAGE_MAX_BATCH`` images) as the deployment's largest replica count runs at
once, so renders wait there, by priority; only while fewer replicas run (autoscaling, a
replacement starting) do some wait in Ray Serve's router, in arrival order.

The replica side is ``fictures_ai.cluster.replicas``. Ray is imported when an engine is used,
not with this module: it is an optional dependency (``fictures-ai[cluster]``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fictures_ai.engines.base import (
    GeneratedImage,
    ImageEngine,
    ImageGenerationParams,
    ImageLora,
    ImageModelInfo,
    LoraAdapter,
    ProgressCallback,
    StructuredOutputSpec,
    TextChunk,
    TextEngine,
    TextGenerationParams,
    TextModelInfo,
    TextPrompt,
    ToolCallParser,
    ToolDefinition,
)
from fictures_ai.errors import (
    FicturesError,
    GenerationError,
    InvalidRequestError,
    ServiceUnavailableError,
)
from fictures_ai.observability.context import current_request

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-Fictures-Replica"
"""The response header naming the model replica that generated the answer."""

RETRY_AFTER_S = 10
"""What a request told that no replica serves right now is asked to wait."""


def record_replica(name: str) -> None:
    """Name the replica on the response of the request being handled (if any)."""
    request = current_request()
    if request is not None:
        request.response_headers[REPLICA_HEADER] = name


def replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica (its actor or process) is gone, rather than that the
    request failed in it."""
    from ray.exceptions import RayActorError, WorkerCrashedError
    from ray.serve.exceptions import ReplicaUnavailableError

    return isinstance(exc, RayActorError | WorkerCrashedError | ReplicaUnavailableError)


def replica_error(exc: BaseException, *, model: str) -> Exception:
    """What a Ray exception from a replica means here: our own error raised in the replica
    (unwrapped from Ray's ``RayTaskError``), or ``GenerationError`` naming what happened."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError) and isinstance(exc.cause, FicturesError):
        return exc.cause
    if replica_lost(exc):
        return GenerationError(
            f"The replica of '{model}' serving this request stopped ({type(exc).__name__}); "
            "Ray Serve replaces it. Send the request again."
        )
    return GenerationError(f"The replica of '{model}' failed: {exc}")


def no_replica(model: str) -> ServiceUnavailableError:
    """A request whose replica was lost twice before it started: none serves now."""
    return ServiceUnavailableError(
        f"No replica of '{model}' is serving right now (it stopped); Ray Serve is starting "
        "another. Try again shortly.",
        retry_after=RETRY_AFTER_S,
    )


async def _call(response: Any, *, model: str) -> Any:
    """Await a unary handle call, mapping Ray's exceptions onto ours."""
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    try:
        return await response
    except (RayError, RayServeException) as exc:
        raise replica_error(exc, model=model) from exc


class RayTextEngine(TextEngine):
    """A text model served by the replicas of one Ray Serve deployment (``TextModelReplica``)."""

    def __init__(
        self, handle: Any, info: TextModelInfo, *, tool_call_parser: str | None = None
    ) -> None:
        self._handle = handle
        self._info = info
        self._tool_call_parser = tool_call_parser
        self._streams: dict[str, Any] = {}
        self._aborted: set[str] = set()

    @classmethod
    async def connect(cls, handle: Any, *, tool_call_parser: str | None = None) -> RayTextEngine:
        """Ask a replica what it serves (waiting for one to start when none runs yet);
        ``tool_call_parser``: the model's (``TEXT_TOOL_CALL_PARSER``), if any."""
        info = await _call(handle.model_info.remote(), model=handle.deployment_name)
        return cls(handle, info, tool_call_parser=tool_call_parser)

    def _open(self, prompt: TextPrompt, params: TextGenerationParams, request_id: str) -> Any:
        stream = self._handle.options(stream=True).generate.remote(prompt, params, request_id)
        self._streams[request_id] = stream
        return stream

    async def generate(
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str
    ) -> AsyncIterator[TextChunk]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException, RequestCancelledError

        stream = self._open(prompt, params, request_id)
        try:
            try:
                name = await anext(stream)
            except (RayError, RayServeException) as exc:
                if not replica_lost(exc) or request_id in self._aborted:
                    raise
                logger.warning(
                    "The replica of %s taking request %s stopped before it started; sending "
                    "it to another one",
                    self._info.name,
                    request_id,
                )
                stream = self._open(prompt, params, request_id)
                try:
                    name = await anext(stream)
                except (RayError, RayServeException) as again:
                    if replica_lost(again):
                        raise no_replica(self._info.name) from again
                    raise
            record_replica(name)
            async for chunk in stream:
                yield chunk
        except RequestCancelledError:
            if request_id not in self._aborted:
                raise
        except (RayError, RayServeException) as exc:
            raise replica_error(exc, model=self._info.name) from exc
        finally:
            stream.cancel()  # a no-op once the replica's generator finished
            self._streams.pop(request_id, None)
            self._aborted.discard(request_id)

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._aborted.add(request_id)
            stream.cancel()

    async def check_health(self) -> None:
        """Nothing to check here: Ray Serve health-checks every replica (their
        ``check_health``) and replaces dead ones; restarting this view would only cancel the
        requests waiting for the replacement."""
        return

    def model_info(self) -> TextModelInfo:
        return self._info

    async def tokenize(self, prompt: TextPrompt) -> list[int]:
        tokens: list[int] = await _call(self._handle.tokenize.remote(prompt), model=self._info.name)
        return tokens

    async def detokenize(self, token_ids: list[int]) -> str:
        text: str = await _call(self._handle.detokenize.remote(token_ids), model=self._info.name)
        return text

    def check_structured(self, spec: StructuredOutputSpec) -> None:
        """Compile ``spec`` in a replica; blocks (the service calls it in a worker thread)."""
        from ray.exceptions import RayError

        try:
            self._handle.check_structured.remote(spec).result()
        except RayError as exc:
            raise replica_error(exc, model=self._info.name) from exc

    def tool_call_parser(self, tools: tuple[ToolDefinition, ...]) -> ToolCallParser | None:
        """Not here yet: vLLM's parsers read the tokenizer, which only the replicas load.

        Raises ``InvalidRequestError`` for a model with a parser configured, so the client
        learns what works instead of being told to configure one.
        """
        if self._tool_call_parser is None:
            return None
        raise InvalidRequestError(
            f'tool_choice "auto" (TEXT_TOOL_CALL_PARSER={self._tool_call_parser}) is not '
            'available with `serve --ray` yet: send tool_choice "required" or a named '
            "function, which work here, or serve without Ray.",
            param="tool_choice",
        )

    async def add_lora(self, adapter: LoraAdapter) -> None:
        """Check ``adapter`` in one replica (which loads it); every replica loads it on its
        first request that names it, a replica started later included."""
        await _call(self._handle.add_lora.remote(adapter), model=self._info.name)

    async def remove_lora(self, adapter: LoraAdapter) -> None:
        """Nothing to do here: replicas keep an adapter until vLLM evicts it, least recently
        used first, for another (a removed name is refused before it reaches them)."""
        return

    async def shutdown(self) -> None:
        """Nothing to release: the replicas belong to Ray Serve, and each stream is closed by
        the request reading it (Ray Serve drains the ingress before it stops)."""
        return


class RayImageEngine(ImageEngine):
    """An image model served by the replicas of one Ray Serve deployment
    (``ImageModelReplica``). A batch the ingress's render queue formed goes to one replica as
    one call, which renders it as one pipeline call when that replica's engine batches."""

    def __init__(self, handle: Any, info: ImageModelInfo, *, batches: bool = False) -> None:
        self._handle = handle
        self._info = info
        self._batches = batches

    @classmethod
    async def connect(cls, handle: Any) -> RayImageEngine:
        """Ask a replica what it serves and whether it batches (waiting for one to start when
        none runs yet)."""
        name = handle.deployment_name
        info = await _call(handle.model_info.remote(), model=name)
        batches = await _call(handle.batches.remote(), model=name)
        return cls(handle, info, batches=batches)

    @property
    def batches(self) -> bool:
        return self._batches

    async def generate(
        self, params: ImageGenerationParams, *, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        images = await self.generate_batch([params], progress=[progress])
        return images[0]

    async def generate_batch(
        self,
        batch: Sequence[ImageGenerationParams],
        *,
        progress: Sequence[ProgressCallback | None] | None = None,
    ) -> list[GeneratedImage]:
        """Render ``batch`` in one replica; each step it reports reaches every callback. A
        replica lost before its first step: the batch goes once more to another one."""
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        callbacks = [callback for callback in progress or () if callback is not None]
        for attempt in (1, 2):
            stream = self._handle.options(stream=True).render.remote(list(batch))
            started = False
            try:
                async for item in stream:
                    if isinstance(item, str):
                        record_replica(item)
                    elif isinstance(item, list):
                        return item
                    else:
                        started = True
                        for callback in callbacks:
                            callback(*item)
            except (RayError, RayServeException) as exc:
                if not started and replica_lost(exc):
                    if attempt == 2:
                        raise no_replica(self._info.name) from exc
                    logger.warning(
                        "The replica of %s rendering stopped before its first step; sending "
                        "the render to another one",
                        self._info.name,
                    )
                    continue
                raise replica_error(exc, model=self._info.name) from exc
            finally:
                stream.cancel()
            break
        raise GenerationError(f"The replica of '{self._info.name}' ended without an image.")

    async def check_health(self) -> None:
        """Nothing to check here (see ``RayTextEngine.check_health``)."""
        return

    def model_info(self) -> ImageModelInfo:
        return self._info

    async def add_lora(self, lora: ImageLora) -> None:
        """Check ``lora`` in one replica; the others load it on their first render with it."""
        await _call(self._handle.add_lora.remote(lora), model=self._info.name)

    async def shutdown(self) -> None:
        """Nothing to release (see ``RayTextEngine.shutdown``)."""
        return
