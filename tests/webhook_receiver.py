"""A real webhook receiver on 127.0.0.1 for tests: records what arrives, answers as told."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the receiver read it off the socket: headers with lower-case names."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """An HTTP server in a thread. ``statuses`` are the answers to give, in order (the last
    repeats); a 3xx answer carries ``Location: <url>/elsewhere``."""

    def __init__(self, statuses: list[int], ssl_context: ssl.SSLContext | None = None) -> None:
        self.statuses = statuses
        self.requests: list[ReceivedRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                self._record()

            def do_GET(self) -> None:  # noqa: N802
                self._record()

            def _record(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                receiver.requests.append(ReceivedRequest(self.command, self.path, headers, body))
                index = min(len(receiver.requests), len(receiver.statuses)) - 1
                status = receiver.statuses[index]
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", f"{receiver.url}/elsewhere")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                """Quiet: the tests assert on ``requests``."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        scheme = "http" if ssl_context is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"


@contextmanager
def webhook_receiver(
    statuses: list[int] | None = None, *, ssl_context: ssl.SSLContext | None = None
) -> Iterator[WebhookReceiver]:
    """A running :class:`WebhookReceiver` (answering 204 unless told otherwise), over TLS
    with ``ssl_context`` (a server context)."""
    receiver = WebhookReceiver(statuses or [204], ssl_context)
    thread = threading.Thread(
        target=receiver.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(timeout=5)
