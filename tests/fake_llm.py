"""An OpenAI-compatible chat server for the tests, on 127.0.0.1: `POST /v1/chat/completions` answers
with whatever the test's script says for the n-th request (a status, headers, a reply text), and
every request is recorded (headers and body) for the test to read."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from typing import Any

# (status, extra headers, reply text or None for an error body)
Answer = tuple[int, dict[str, str], str | None]


class FakeChat:
    def __init__(self, script: Callable[[int, dict[str, Any]], Answer], tokens: int = 100) -> None:
        self.script = script
        self.tokens = tokens
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    n = len(fake.requests) + 1
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, headers, text = fake.script(n, body)
                if text is None:
                    payload = json.dumps({"error": {"message": f"scripted {status}"}}).encode()
                else:
                    payload = json.dumps(
                        {
                            "id": f"chatcmpl-{n}",
                            "object": "chat.completion",
                            "model": body.get("model"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {
                                "prompt_tokens": fake.tokens - 10,
                                "completion_tokens": 10,
                                "total_tokens": fake.tokens,
                            },
                        }
                    ).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def files_reply(description: str, text: str, path: str = "train.py") -> str:
    return f"Here is my proposal.\nDESCRIPTION: {description}\n```file {path}\n{text}```\n"
