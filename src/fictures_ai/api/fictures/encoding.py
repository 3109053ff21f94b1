"""The events of the Fictures surface's streams, written from precomputed pieces.

``/api/v1/text/stream``: ``{text, delta, model, tokens_used, finish_reason, done}`` per engine
chunk (``text`` is cumulative, as the contract asks); ``/api/v1/images/stream``: ``{queued:
true, position, step: 0, total_steps, done: false}`` while the render waits for a slot (when it
starts to wait and each time its place changes), ``{step, total_steps, done: false}`` per
denoising step, then the image response with ``done: true``. A queued event carries ``step: 0``
so that clients that only read ``step``/``total_steps``/``done`` see "not started yet" in it.
Both streams end with ``data: [DONE]`` (``api.sse.stream_events``).
"""

from __future__ import annotations

import base64
import json

from fictures_ai.api.errors import ErrorReply
from fictures_ai.api.fictures.protocol import contract_finish_reason
from fictures_ai.api.sse import encode_json_string, sse_event
from fictures_ai.engines.base import GeneratedImage, TextChunk
from fictures_ai.observability.tracing import child_span
from fictures_ai.services.image_generation import QueuePosition, RenderProgress


def png_data_url(png: bytes) -> str:
    """``data:image/png;base64,...`` of a PNG, as the contract's ``image_url``."""
    # Its own span: for a large image the base64 step is a visible share of the request.
    with child_span("image.encode", {"fictures.png_bytes": len(png)}):
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class TextEventEncoder:
    """Writes the events of one ``/text/stream`` response and keeps the text so far.

    Per token only the texts are JSON-encoded; the rest of the event is precomputed. The
    cumulative ``text`` the contract asks for makes each event grow with the stream.
    """

    _NOT_DONE = b',"finish_reason":null,"done":false}\n\n'

    def __init__(self, model: str) -> None:
        self.model = model
        self.text = ""
        self.tokens = 0
        self._middle = b',"model":' + json.dumps(model).encode() + b',"tokens_used":'

    def event(self, chunk: TextChunk) -> bytes:
        """The event of one engine chunk."""
        self.text += chunk.delta
        self.tokens = chunk.completion_tokens
        finish = contract_finish_reason(chunk.finish_reason)
        tail = (
            self._NOT_DONE
            if finish is None
            else b',"finish_reason":"' + finish.encode() + b'","done":true}\n\n'
        )
        return (
            b'data: {"text":'
            + encode_json_string(self.text).encode()
            + b',"delta":'
            + encode_json_string(chunk.delta).encode()
            + self._middle
            + str(self.tokens).encode()
            + tail
        )

    def end(self) -> bytes:
        """Nothing: the last chunk's event already says ``done``."""
        return b""

    def error(self, reply: ErrorReply) -> bytes:
        """The last event of a stream that failed after it started."""
        return sse_event(
            {
                "text": self.text,
                "delta": "",
                "model": self.model,
                "tokens_used": self.tokens,
                "finish_reason": "error",
                "done": True,
                "error": reply.message,
            }
        )


class ImageEventEncoder:
    """Writes the events of one ``/images/stream`` response; ``total_steps`` is what a queued
    event says of the render to come (the request's ``num_inference_steps``)."""

    def __init__(self, model: str, *, total_steps: int) -> None:
        self.model = model
        self.total_steps = total_steps

    def event(self, item: QueuePosition | RenderProgress | GeneratedImage) -> bytes:
        """A queued event per place in the queue, a progress event per denoising step; the
        image response last."""
        if isinstance(item, QueuePosition):
            return sse_event(
                {
                    "queued": True,
                    "position": item.position,
                    "step": 0,
                    "total_steps": self.total_steps,
                    "done": False,
                }
            )
        if isinstance(item, RenderProgress):
            return sse_event({"step": item.step, "total_steps": item.total_steps, "done": False})
        return sse_event(
            {
                "image_url": png_data_url(item.png),
                "model": self.model,
                "width": item.width,
                "height": item.height,
                "seed": item.seed,
                "done": True,
            }
        )

    def end(self) -> bytes:
        """Nothing: the image event already says ``done``."""
        return b""

    def error(self, reply: ErrorReply) -> bytes:
        """The last event of a render that failed (before or after its first step)."""
        return sse_event({"error": reply.message, "done": True})
