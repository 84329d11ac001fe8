"""A real HTTP receiver for webhook tests, on 127.0.0.1: it records every request and answers as
its path says: `/ok` 200, `/fail-N` 500 to the first N attempts of each delivery then 200,
`/down` always 500, `/gone` 404, `/hold` 500 until `release()` is called."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Received:
    def __init__(self, path: str, headers: dict[str, str], body: bytes, status: int) -> None:
        self.path, self.headers, self.body, self.status = path, headers, body, status
        self.at = time.time()

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.path} {self.status} {self.headers.get('x-ratchet-event')}>"


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.attempts: Counter[tuple[str, str]] = Counter()
        self.held = True
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                status = receiver.answer(self.path, self.headers.get("x-ratchet-delivery", ""))
                with receiver.lock:
                    receiver.requests.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, delivery: str) -> int:
        with self.lock:
            self.attempts[(path, delivery)] += 1
            n = self.attempts[(path, delivery)]
        if path == "/ok":
            return 200
        if path.startswith("/fail-"):
            return 500 if n <= int(path.removeprefix("/fail-")) else 200
        if path == "/gone":
            return 404
        if path == "/hold":
            return 500 if self.held else 200
        return 500

    def release(self) -> None:
        self.held = False

    def got(self, path: str, status: int | None = 200) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path and (status is None or r.status == status)]

    def wait(self, path: str, pred: Any = None, timeout: float = 60, status: int | None = 200) -> Received:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.got(path, status):
                if pred is None or pred(r):
                    return r
            time.sleep(0.1)
        raise AssertionError(f"nothing matching on {path} within {timeout} s; got {self.requests}")

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
