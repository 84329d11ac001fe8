"""A small synchronous client for the v1 API, used by the example driver, tests and scripts.

client = RatchetClient("http://127.0.0.1:8080")
loop = client.create_loop(loop_body_from_dir("examples/charlm"))
exp = client.submit(loop["id"], "lower lr", patch=open("lr.patch").read())
client.wait(exp["id"])
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["FINAL_STATUSES", "ApiError", "RatchetClient", "loop_body_from_dir"]

FINAL_STATUSES = frozenset({"keep", "discard", "crash", "timeout", "cancelled", "error"})
# Never part of a workspace sent from a directory: the loop definition and local clutter.
DEFAULT_EXCLUDE = ("ratchet.json", "README.md", "candidates/", "__pycache__/", ".")


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


def loop_body_from_dir(path: str | Path, **overrides: Any) -> dict[str, Any]:
    """The loop definition in `DIR/ratchet.json` plus every other text file of DIR as the workspace.

    `ratchet.json` may hold an `exclude` list of path prefixes to leave out as well.
    """
    root = Path(path)
    spec: dict[str, Any] = json.loads((root / "ratchet.json").read_text())
    exclude = tuple(spec.pop("exclude", ())) + DEFAULT_EXCLUDE
    files: dict[str, str] = {}
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root).as_posix()
        if file.is_file() and not any(rel.startswith(p) or f"/{p}" in f"/{rel}" for p in exclude):
            files[rel] = file.read_text(encoding="utf-8")
    return {**spec, "workspace": {"files": files}, **overrides}


class RatchetClient:
    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(response.status_code, str(detail))
        return response

    def create_loop(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/loops", json=body).json()

    def loop(self, loop_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/loops/{loop_id}").json()

    def submit(
        self,
        loop_id: str,
        description: str,
        *,
        patch: str | None = None,
        files: dict[str, str] | None = None,
        parent: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"description": description}
        for key, value in (("patch", patch), ("files", files), ("parent", parent)):
            if value is not None:
                body[key] = value
        return self._call("POST", f"/v1/loops/{loop_id}/experiments", json=body).json()

    def experiment(self, exp_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/experiments/{exp_id}").json()

    def wait(self, exp_id: str, timeout: float = 3600.0, poll: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            exp = self.experiment(exp_id)
            if exp["status"] in FINAL_STATUSES:
                return exp
            if time.monotonic() > deadline:
                raise TimeoutError(f"experiment {exp_id} still {exp['status']} after {timeout:g} s")
            time.sleep(poll)

    def results(self, loop_id: str) -> str:
        return self._call("GET", f"/v1/loops/{loop_id}/results.tsv").text

    def archive(self, snapshot_id: str) -> bytes:
        return self._call("GET", f"/v1/snapshots/{snapshot_id}/archive").content
