"""Runs one untrusted command in one hardened container.

Lifecycle of a run (each step a small method; removal always happens):
  prepare: create volumes -> create container (gated) -> attach -> start -> copy workspace in
  execute: open the gate -> stream the capped log until the gate reports the exit code or the hard
           deadline kills the container -> collect outputs and peak memory -> let it exit
  release: remove container and volumes, forced, logged on failure, never raised

Failures never mix: a bad spec raises `SpecError` before the engine is touched; an engine failure
`SandboxError` (translated in one place, `_engine`); what the workload does is data in `RunResult`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import docker.errors
import msgspec
import requests.exceptions

from .archive import workspace_tar
from .collect import collect
from .egress import EgressDoor
from .engine import SandboxError, ping, remove_labelled
from .engine import engine_call as _engine
from .engine import remove as _remove
from .gpus import EngineProbe, GpuRoute, GpuUnavailable, gpu_refusal
from .journal import HeadWriter, Journal, RunRecord
from .logcap import CappedLog
from .mounts import cache_volume_name, check_mounts, make_cache_volume, seed_cache
from .options import MOUNT_POINT, container_options, run_env, volume_options
from .probe import probe_engine
from .spec import RunDetached, RunResult, RunSpec, Timings
from .stream import ExitHook, FrameReader, OutputTap, Reports, strip_marker

if TYPE_CHECKING:
    from .adopt import AdoptedRun

__all__ = ["LABEL_RUN", "LABEL_SANDBOX", "PreparedRun", "RunDetached", "Sandbox", "SandboxError"]

log = logging.getLogger("ratchet.sandbox")

LABEL_SANDBOX = "ratchet.sandbox"
LABEL_RUN = "ratchet.run"
_COLLECT_TIMEOUT_S = 30.0
_EXIT_GRACE_S = 10.0
_LOST_GRACE_S = 5.0
_REPORT_GRACE_S = 1.0  # after the collection, for the gate to exit


class Sandbox:
    """A handle on one container engine. Thread-safe: runs may proceed in parallel threads."""

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        instance: str = "default",
        labels: dict[str, str] | None = None,
        journal: Path | None = None,
    ) -> None:
        """`labels`: on every container and volume it makes, probes too (its node's name, say)."""
        self._client = client
        self.instance = instance
        self.labels = dict(labels or {})
        # Where runs record what a later process needs to take them over (`reattach`); None: nowhere.
        self.journal = Journal(journal) if journal is not None else None
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
        """Whether the engine answers within a few seconds (`engine.PING_TIMEOUT_S`)."""
        try:
            return ping(self.client)
        except SandboxError:  # no client could be made
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
            return probe_engine(self.client, image, {**self.labels, LABEL_SANDBOX: self.instance})

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

    def reattach(self) -> list[AdoptedRun]:
        """The runs of this instance that a previous process (with the same journal) left alive,
        taken over; everything else it left is removed. See `sandbox.adopt`."""
        from .adopt import reattach

        return reattach(self)

    def remove_labelled(self, labels: dict[str, str]) -> int:
        """Force-remove every container and volume carrying all of `labels`; returns how many."""
        return remove_labelled(self.client, labels)


class PreparedRun:
    """One container's life. `execute()` runs it once; `cancel()` may come from any thread."""

    def __init__(self, sandbox: Sandbox, spec: RunSpec, gpu_route: GpuRoute = "none") -> None:
        self.sandbox = sandbox
        self.spec = spec
        self.gpu_route = gpu_route
        self.run_id = uuid.uuid4().hex[:16]
        self.volume = f"ratchet-run-{self.run_id}"
        self.cache_volume = cache_volume_name(self.run_id, spec)
        self.container_id: str | None = None
        self.timings = Timings()
        self._sock: Any = None
        self._raw: socket.socket | None = None
        self._cancel = threading.Event()
        self._detach = threading.Event()
        self._head: HeadWriter | None = None  # the output's head, journalled as it arrives
        self._ended_at: float | None = None  # when the workload ended, if known better than "now"
        self._reports = Reports()
        self._released = False
        self._lock = threading.Lock()
        self._door: EgressDoor | None = None  # the run's network through its allow-list

    @property
    def labels(self) -> dict[str, str]:
        return {
            **self.spec.labels,
            **self.sandbox.labels,
            LABEL_SANDBOX: self.sandbox.instance,
            LABEL_RUN: self.run_id,
        }

    # -- prepare -------------------------------------------------------------------------------

    def _prepare(self) -> None:
        api = self.sandbox.client.api
        env = run_env(self.spec, self.cache_volume is not None)
        check_mounts(self.sandbox.client, self.spec)
        with _engine("create volume"):
            self.sandbox.client.volumes.create(**volume_options(self.spec, self.volume, self.labels))
        if self.cache_volume is not None:
            make_cache_volume(self.sandbox.client, self.spec, self.cache_volume, self.labels)
        opts = container_options(self.spec, self.volume, self.labels, env, self.gpu_route, self.cache_volume)
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
        seed_cache(api, self.container_id, self.spec)
        if self.spec.egress is not None:
            self._door = EgressDoor(self.sandbox.client, self.spec.egress, self.run_id, self.labels)
            self._door.open(self.container_id)
        self.timings.ready = time.time()
        self._journal()  # only a run whose workspace is in can be taken over

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
        except RunDetached:
            release = False  # it goes on: another process takes it over
            self._disconnect()  # unread, the engine would hold the workload's output back
            raise
        finally:
            if release:
                self.release()

    def _journal(self, opened_at: float | None = None) -> None:
        """Records what a later process needs to take this run over (nothing without a journal)."""
        if self.sandbox.journal is not None and self.container_id is not None:
            record = RunRecord(
                run_id=self.run_id,
                container_id=self.container_id,
                volume=self.volume,
                cache_volume=self.cache_volume,
                spec=msgspec.structs.replace(self.spec, files=[], inputs=[], cache=b""),
                gpu_route=self.gpu_route,
                opened_at=opened_at,
            )
            self._head = self.sandbox.journal.record(record, self.spec.limits.log_bytes // 2)

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
            outcome, deadline = self._run_workload(frames, logbuf, tap)
        finally:
            self.timings.finished = self._ended_at or time.time()
            exited.fire()
            if self._head is not None:
                self._head.close()
        if outcome == "detached":
            raise RunDetached(f"run {self.run_id} goes on in container {self.container_id}")
        return self._conclude(outcome, deadline, frames, logbuf, tap)

    def _run_workload(
        self, frames: FrameReader, logbuf: CappedLog, tap: OutputTap | None
    ) -> tuple[str, float]:
        """Opens the gate and follows the workload to its end: (how it ended, the monotonic deadline)."""
        assert self._raw is not None
        # Recorded before the gate opens: a restart knows the deadline of a run that may have begun.
        self._journal(opened_at=time.time())
        with _engine("open gate"):
            self._raw.sendall(b"go\n")
        self.timings.started = time.time()
        # The hard deadline counts from the gate opening, never from the (earlier) prepare.
        deadline = time.monotonic() + self.spec.timeout_s
        return self._pump(frames, logbuf, deadline, until_marker=True, tap=tap), deadline

    def _conclude(
        self, outcome: str, deadline: float, frames: FrameReader, logbuf: CappedLog, tap: OutputTap | None
    ) -> RunResult:
        """The workload has ended: its outputs collected, the gate let go, the result put together."""
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
        """Copy the output stream into the log until the gate reports (if `until_marker`), the
        stream ends, the deadline passes, a cancel arrives or the caller detaches."""
        while True:
            if self._cancel.is_set():
                self._kill()
                return "cancelled"
            if self._detach.is_set():
                return "detached"
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                return "timeout"
            data = self._receive(min(left, 0.1))
            if data is None:
                continue
            if not data:
                # The stream ended without the gate's report: a kill (ours, when cancelled) or
                # the OOM killer taking PID 1.
                return "cancelled" if self._cancel.is_set() else "exited"
            reported = False
            for stream, payload in frames.feed(data):  # the whole chunk: nothing after the report is lost
                logbuf.write(payload)
                if self._head is not None:
                    self._head.feed(stream, payload)
                if tap is not None:
                    tap.feed(stream, payload)
                if stream == 2 and self._reports.feed(payload):
                    reported = until_marker
            if tap is not None:
                tap.emit()
            if reported:
                return "done"

    def _receive(self, timeout: float) -> bytes | None:
        """The next bytes of the output stream: None when none came within `timeout`, b"" at its end."""
        assert self._raw is not None
        ready, _, _ = select.select([self._raw], [], [], timeout)
        if not ready:
            return None
        try:
            return self._raw.recv(65536)
        except OSError:
            return b""

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
        """What the run left (`sandbox.collect`), read while the gate keeps the container (and its
        volumes) alive; then it may exit."""
        assert self.container_id is not None
        collect(self.sandbox.client.api, self.container_id, self.spec, result, self.run_id)
        with contextlib.suppress(OSError):
            if self._raw is not None:
                self._raw.sendall(b"collected\n")

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

    def detach(self) -> None:
        """Let go of the run without stopping it, from any thread: `execute` raises `RunDetached`
        and the container goes on behind its gate, for a later `Sandbox.reattach` to take over.
        The caller must not `release` it."""
        self._detach.set()

    def _kill(self) -> None:
        if self.container_id is None:
            return
        try:
            self.sandbox.client.api.kill(self.container_id)
        except Exception as exc:  # already gone is fine; anything else is logged, not raised
            log.debug("run %s: kill: %s", self.run_id, exc)

    def _disconnect(self) -> None:
        for sock in (self._raw, self._sock):  # the raw socket stays open while its wrapper is
            with contextlib.suppress(Exception):
                sock.close()

    def release(self) -> None:
        """Remove container and volumes. Idempotent; a failed removal is logged, never raised."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._disconnect()
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
        for volume in filter(None, (self.volume, self.cache_volume)):
            try:
                _remove(lambda volume=volume: client.api.remove_volume(volume, force=True))
            except Exception as exc:
                log.warning("run %s: could not remove volume %s: %s", self.run_id, volume, exc)
        if self.sandbox.journal is not None:
            self.sandbox.journal.remove(self.run_id)
        self.timings.released = time.time()
