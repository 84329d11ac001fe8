"""Runs one untrusted command in one hardened container.

Lifecycle of a run (each step a small method; removal always happens):
  prepare: create volume -> create container (gated) -> attach -> start -> copy workspace in
  execute: open the gate -> stream the capped log until the gate reports the exit code or the hard
           deadline kills the container -> collect output files and peak memory -> let it exit
  release: remove container and volume, forced, logged on failure, never raised

Three kinds of failure never mix: a bad spec raises `SpecError` before the engine is touched; an
engine failure raises `SandboxError` (translated at one place, `_engine`); whatever the workload
does (non-zero exit, OOM, timeout) is data in the `RunResult`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions

from .archive import read_collected_tar, read_output_tar, workspace_tar
from .egress import EgressDoor, proxy_env
from .gpus import EngineProbe, GpuRoute, GpuUnavailable, gpu_refusal
from .logcap import CappedLog
from .options import INPUT_DIR, MOUNT_POINT, OUTPUT_DIR, WORKSPACE_DIR, container_options, volume_options
from .probe import probe_engine
from .spec import RunResult, RunSpec, Timings
from .stream import ExitHook, FrameReader, OutputTap, Reports, strip_marker

__all__ = ["LABEL_RUN", "LABEL_SANDBOX", "PreparedRun", "Sandbox", "SandboxError"]

log = logging.getLogger("ratchet.sandbox")

LABEL_SANDBOX = "ratchet.sandbox"
LABEL_RUN = "ratchet.run"
_COLLECT_TIMEOUT_S = 30.0
_EXIT_GRACE_S = 10.0
_LOST_GRACE_S = 5.0
_REPORT_GRACE_S = 1.0  # after the collection, for the gate to exit


class SandboxError(RuntimeError):
    """The container engine failed (not the workload): unreachable, image missing, API error.

    `reason` is one of a small fixed set (image_missing, refused, unreachable) so callers can count
    failures by kind without parsing messages."""

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def _engine(action: str) -> Iterator[None]:
    """The one place where engine exceptions become `SandboxError`."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise SandboxError(f"{action}: image not found ({exc.explanation})", "image_missing") from exc
    except docker.errors.APIError as exc:
        raise SandboxError(f"{action}: engine refused: {exc.explanation or exc}") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise SandboxError(f"{action}: engine unreachable: {exc}", "unreachable") from exc


class Sandbox:
    """A handle on one container engine. Thread-safe: runs may proceed in parallel threads."""

    def __init__(self, client: docker.DockerClient | None = None, instance: str = "default") -> None:
        self._client = client
        self.instance = instance
        self._gpu_probe: EngineProbe | None = None
        self._probe_lock = threading.Lock()

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            with _engine("connect"):
                self._client = docker.from_env(timeout=60)
        return self._client

    @property
    def connected(self) -> docker.DockerClient | None:
        """The client, if one was made: removing a run never connects only to find nothing there."""
        return self._client

    def ping(self) -> bool:
        try:
            with _engine("ping"):
                return bool(self.client.ping())
        except SandboxError:
            return False

    def has_image(self, image: str) -> bool | None:
        """Whether the engine holds `image`; None when it cannot tell (unreachable, say)."""
        try:
            with _engine("inspect image"):
                self.client.images.get(image)
            return True
        except SandboxError as exc:
            return False if exc.reason == "image_missing" else None
    def probe(self, image: str | None = None) -> EngineProbe:
        """Asks the engine afresh about itself and its GPU route; with `image`, the `nvidia` device
        driver is tried with a short container of that image (see `sandbox.probe`)."""
        with _engine("probe the engine"):
            return probe_engine(self.client, image, {LABEL_SANDBOX: self.instance})

    def gpu_probe(self, image: str) -> EngineProbe:
        """The probe GPU runs go by: made once, and again while it finds no route (the operator
        may be installing one) or after the engine refused its driver (it restarted without it)."""
        with self._probe_lock:
            if self._gpu_probe is None or self._gpu_probe.route == "none":
                self._gpu_probe = self.probe(image)
            return self._gpu_probe

    def _gpu_route(self, spec: RunSpec) -> GpuRoute:
        if not spec.gpus:
            return "none"
        probe = self.gpu_probe(spec.image)
        refusal = gpu_refusal(probe, spec.runtime)
        if refusal is not None:
            raise GpuUnavailable(refusal)
        return probe.route

    def prepare(self, spec: RunSpec) -> PreparedRun:
        """Start a container behind its gate with the workspace in place; nothing untrusted runs yet."""
        spec = spec.validate()
        run = PreparedRun(self, spec, self._gpu_route(spec))
        try:
            run._prepare()
        except SandboxError as exc:
            run.release()
            if spec.gpus and "device driver" in str(exc):
                with self._probe_lock:
                    self._gpu_probe = None
            raise
        except BaseException:
            run.release()
            raise
        return run

    def run(
        self,
        spec: RunSpec,
        *,
        on_start: Callable[[PreparedRun], None] | None = None,
        on_output: Callable[[bytes], None] | None = None,
    ) -> RunResult:
        """prepare + execute in one call; `on_start` receives the run (e.g. to keep a cancel handle),
        `on_output` the output as it arrives (see `PreparedRun.execute`)."""
        run = self.prepare(spec)
        if on_start is not None:
            try:
                on_start(run)
            except BaseException:
                run.release()
                raise
        return run.execute(on_output=on_output)

    def remove_labelled(self, labels: dict[str, str]) -> int:
        """Force-remove every container and volume carrying all of `labels`; returns how many."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        removed = 0
        with _engine("cleanup"):
            for c in self.client.containers.list(all=True, filters=filters):
                if _remove(lambda c=c: c.remove(force=True)):
                    removed += 1
            for v in self.client.volumes.list(filters=filters):
                if _remove(lambda v=v: v.remove(force=True)):
                    removed += 1
        return removed


def _remove(call: Callable[[], object], tries: int = 20) -> bool:
    """Runs an engine removal; False when the object was already gone. Another removal of the same
    container (a cleanup by label racing a run's own release) answers 409 while it is in progress,
    and its volume stays "in use" until it is done: wait for that rather than leak the volume."""
    for attempt in range(tries):
        try:
            call()
            return True
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code != 409 or attempt == tries - 1:
                raise
            time.sleep(0.1)
    return False


class PreparedRun:
    """One container's life. `execute()` runs it once; `cancel()` may come from any thread."""

    def __init__(self, sandbox: Sandbox, spec: RunSpec, gpu_route: GpuRoute = "none") -> None:
        self.sandbox = sandbox
        self.spec = spec
        self.gpu_route = gpu_route
        self.run_id = uuid.uuid4().hex[:16]
        self.volume = f"ratchet-run-{self.run_id}"
        self.container_id: str | None = None
        self.timings = Timings()
        self._sock: Any = None
        self._raw: socket.socket | None = None
        self._cancel = threading.Event()
        self._reports = Reports()
        self._released = False
        self._lock = threading.Lock()
        self._door: EgressDoor | None = None  # the run's network through its allow-list

    @property
    def labels(self) -> dict[str, str]:
        return {
            **self.spec.labels,
            LABEL_SANDBOX: self.sandbox.instance,
            LABEL_RUN: self.run_id,
        }

    # -- prepare -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        api = self.sandbox.client.api
        env = {**self.spec.env, "RATCHET_OUTPUT_DIR": OUTPUT_DIR, "HOME": "/tmp"}
        if self.spec.inputs:
            env["RATCHET_INPUT_DIR"] = INPUT_DIR
        if self.spec.egress is not None:
            env.update(proxy_env())
        with _engine("create volume"):
            self.sandbox.client.volumes.create(**volume_options(self.spec, self.volume, self.labels))
        opts = container_options(self.spec, self.volume, self.labels, env, self.gpu_route)
        with _engine("create container"):
            self.container_id = self.sandbox.client.containers.create(**opts).id
        self.timings.created = time.time()
        with _engine("attach"):
            self._sock = api.attach_socket(
                self.container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
            )
            self._raw = getattr(self._sock, "_sock", self._sock)
        with _engine("start"):
            api.start(self.container_id)
        # The volume is mounted (by the engine, on the host) only while the container runs, so
        # the workspace goes in after the start, while the gate holds the workload back.
        with _engine("copy workspace"):
            tar = workspace_tar(self.spec.files, inputs=self.spec.inputs)
            if not api.put_archive(self.container_id, MOUNT_POINT, tar):
                raise SandboxError("copy workspace: engine did not accept the archive")
        if self.spec.egress is not None:
            self._door = EgressDoor(self.sandbox.client, self.spec.egress, self.run_id, self.labels)
            with _engine("open egress"):
                try:
                    self._door.open(self.container_id)
                except RuntimeError as exc:
                    raise SandboxError(f"open egress: {exc}") from exc
        self.timings.ready = time.time()

    # -- execute -------------------------------------------------------------------------------

    def execute(
        self,
        on_output: Callable[[bytes], None] | None = None,
        on_exit: Callable[[Timings], None] | None = None,
        release: bool = True,
    ) -> RunResult:
        """Open the gate and see the run through; releases the container unless `release` is False
        (the caller then owes a `release()`, e.g. once nobody waits for it).

        `on_output` is called in this thread with each piece of output (stdout and stderr
        interleaved as received, without the gate's report) as soon as it arrives; its exceptions
        are logged and ignored. It should return quickly: the run's output waits while it runs.
        `on_exit` is called once the workload has ended (exited, killed or cancelled), before its
        outputs are collected: whatever it held besides this container is free from then on."""
        try:
            return self._execute(
                OutputTap(on_output, self.run_id) if on_output is not None else None,
                ExitHook(on_exit, self.run_id, self.timings),
            )
        finally:
            if release:
                self.release()

    def _execute(self, tap: OutputTap | None, exited: ExitHook) -> RunResult:
        if self._cancel.is_set():
            exited.fire()
            return RunResult(
                exit_code=None, cancelled=True, timeout_s=self.spec.timeout_s, timings=self.timings
            )
        assert self._raw is not None and self.container_id is not None
        logbuf = CappedLog(self.spec.limits.log_bytes)
        frames = FrameReader()  # one per run: a chunk may hold frames on both sides of the report
        try:
            with _engine("open gate"):
                self._raw.sendall(b"go\n")
            self.timings.started = time.time()
            # The hard deadline counts from the gate opening, never from the (earlier) prepare.
            deadline = time.monotonic() + self.spec.timeout_s
            outcome = self._pump(frames, logbuf, deadline, until_marker=True, tap=tap)
        finally:
            self.timings.finished = time.time()
            exited.fire()
        result = RunResult(
            exit_code=None,
            timed_out=outcome == "timeout",
            cancelled=outcome == "cancelled",
            exit_reported=outcome == "done",
            timeout_s=self.spec.timeout_s,
            timings=self.timings,
        )
        if outcome == "exited":
            self._check_stream_lost()
        if outcome == "done":
            self._collect(result)
            # stdout and stderr travel separately: drain what is still in flight until the
            # container closes the stream (the gate exits once told the output is collected).
            # The report may be the workload's own: the hard deadline still holds, only moved
            # past the end of the collection (after which the real gate exits at once).
            now = time.monotonic()
            late = max(deadline, now) + _REPORT_GRACE_S
            grace = min(now + _EXIT_GRACE_S, late)
            if self._pump(frames, logbuf, grace, until_marker=False, tap=tap) == "timeout":
                result.timed_out = time.monotonic() >= late
                self.timings.finished = time.time()
                log.warning("run %s: gate did not exit after collection; killed", self.run_id)
        if tap is not None:
            tap.close()
        self._finish(result)
        if self._door is not None:
            result.egress_log = self._door.log()
        # The gate reports once. Another report means the workload wrote one itself to end its
        # run early in the runner's eyes (and keep running past the hard deadline meanwhile).
        result.report_forged = self._reports.count > 1
        text, marker = strip_marker(logbuf.text())
        result.log = text
        result.log_bytes = max(0, logbuf.total - marker)
        result.log_truncated = logbuf.dropped > 0
        return result

    def _pump(
        self,
        frames: FrameReader,
        logbuf: CappedLog,
        deadline: float,
        until_marker: bool,
        tap: OutputTap | None = None,
    ) -> str:
        """Copy the attach stream into the log until the gate reports (if `until_marker`), the
        stream ends, the deadline passes or a cancel arrives."""
        assert self._raw is not None
        while True:
            if self._cancel.is_set():
                self._kill()
                return "cancelled"
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                return "timeout"
            ready, _, _ = select.select([self._raw], [], [], min(left, 0.1))
            if not ready:
                continue
            try:
                data = self._raw.recv(65536)
            except OSError:
                data = b""
            if not data:
                # The stream ended without the gate's report: a kill (ours, when cancelled) or
                # the OOM killer taking PID 1.
                return "cancelled" if self._cancel.is_set() else "exited"
            reported = False
            for stream, payload in frames.feed(data):  # the whole chunk: nothing after the report is lost
                logbuf.write(payload)
                if tap is not None:
                    tap.feed(stream, payload)
                if stream == 2 and self._reports.feed(payload):
                    reported = until_marker
            if tap is not None:
                tap.emit()
            if reported:
                return "done"

    def _check_stream_lost(self) -> None:
        """The output stream ended without the gate's report. When the OOM killer takes PID 1 the
        container ends with it; one still running lost its stream to the engine (restarted, or the
        connection cut): that is the infrastructure failing, never a result of the workload."""
        try:
            with _engine("wait"):
                self.sandbox.client.api.wait(self.container_id, timeout=_LOST_GRACE_S)
        except SandboxError as exc:
            self._kill()
            raise SandboxError(
                f"lost the run's output stream before the workload finished ({exc})", "unreachable"
            ) from exc

    def _collect(self, result: RunResult) -> None:
        """Output files and peak memory, read while the gate keeps the container (and volume) alive."""
        api = self.sandbox.client.api
        cid = self.container_id
        try:
            with _engine("read peak memory"):
                stats = api.stats(cid, stream=False, one_shot=True)
            result.peak_memory_bytes = (stats.get("memory_stats") or {}).get("max_usage")
        except SandboxError as exc:
            log.warning("run %s: %s", self.run_id, exc)
        if self.spec.limits.output_bytes > 0:
            with _engine("collect output"):
                try:
                    chunks, _ = api.get_archive(cid, OUTPUT_DIR)
                except docker.errors.NotFound:
                    chunks = iter(())
                # The output directory cannot outgrow the run's disk: read that far at most, so
                # files after a skipped large one still arrive.
                read_limit = (self.spec.limits.disk_mb + 1) * 1024 * 1024
                files, skipped = read_output_tar(iter(chunks), self.spec.limits.output_bytes, read_limit)
            result.output_files, result.output_skipped = files, skipped
        for path in self.spec.collect:
            self._collect_path(path, result)
        with contextlib.suppress(OSError):
            assert self._raw is not None
            self._raw.sendall(b"collected\n")

    def _collect_path(self, path: str, result: RunResult) -> None:
        """A workspace path as the workload left it (the volume holds at most `disk_mb`)."""
        where = WORKSPACE_DIR if path == "." else f"{WORKSPACE_DIR}/{path}"
        with _engine("collect workspace"):
            try:
                chunks, _ = self.sandbox.client.api.get_archive(self.container_id, where)
            except docker.errors.NotFound:
                return
            cap = self.spec.limits.disk_mb * 1024 * 1024
            archived = where.rsplit("/", 1)[-1]
            files, skipped = read_collected_tar(iter(chunks), path, archived, cap, cap + 1024 * 1024)
        result.workspace_files.update(files)
        result.workspace_skipped.extend(skipped)

    def _finish(self, result: RunResult) -> None:
        """Wait for the container to stop and read the engine's verdict on it."""
        api = self.sandbox.client.api
        with _engine("wait"):
            try:
                api.wait(self.container_id, timeout=_EXIT_GRACE_S)
            except (requests.exceptions.ConnectionError, requests.exceptions.ReadTimeout):
                self._kill()
                api.wait(self.container_id, timeout=_EXIT_GRACE_S)
            state = api.inspect_container(self.container_id)["State"]
        result.exit_code = state.get("ExitCode")
        result.oom_killed = bool(state.get("OOMKilled"))

    # -- cancel / release ----------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the run from any thread: a running workload is killed, a prepared one never starts."""
        self._cancel.set()
        self._kill()

    def _kill(self) -> None:
        if self.container_id is None:
            return
        try:
            self.sandbox.client.api.kill(self.container_id)
        except Exception as exc:  # already gone is fine; anything else is logged, not raised
            log.debug("run %s: kill: %s", self.run_id, exc)

    def release(self) -> None:
        """Remove container and volume. Idempotent; a failed removal is logged, never raised."""
        with self._lock:
            if self._released:
                return
            self._released = True
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self._sock.close()
        if self._door is not None:
            self._door.close()
        client = self.sandbox.connected
        if client is None:
            return
        container_id = self.container_id
        if container_id is not None:
            try:
                _remove(lambda: client.api.remove_container(container_id, force=True, v=True))
            except Exception as exc:
                log.warning("run %s: could not remove container %s: %s", self.run_id, container_id, exc)
        try:
            _remove(lambda: client.api.remove_volume(self.volume, force=True))
        except Exception as exc:
            log.warning("run %s: could not remove volume %s: %s", self.run_id, self.volume, exc)
        self.timings.released = time.time()
