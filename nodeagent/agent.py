"""The agent on one node: a Ray actor, pinned to its node, that owns the node's container engine
and runs `sandbox` there. It knows runs by the key the executor gave them, and nothing of loops.

    prepare(key, spec) -> Prepared | Failed        behind the gate, on this node's engine
    execute(key)       -> Output* Exited Output* (Finished | Failed)   streamed as it happens
    cancel(key) / release(key)                     any time, also before the prepare has ended
    sweep(labels)      -> count                    this node's containers and volumes with `labels`
    images(names)      -> [missing]                the images of `names` this node lacks
    report(images, gpu_image) -> NodeFacts         the engine, its runtimes and GPU route, missing images

Every container it makes carries `ratchet.node=<its node>`: nodes may share one engine (on a test
machine they do), and a sweep must never take another node's runs. Long calls (prepare, execute),
slow ones (release, sweep, report) and short ones (ping, cancel) have thread pools of their own, so
a busy node still answers and cancels at once.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator

import msgspec
import ray

from sandbox import PreparedRun, RunResult, Sandbox, SandboxError, Timings

from .protocol import (
    LABEL_NODE,
    AgentInfo,
    Exited,
    Failed,
    Finished,
    NodeFacts,
    Output,
    Prepared,
    decode_spec,
    encode,
)

__all__ = ["CONCURRENCY", "NodeAgent"]

# Threads per kind of call. "run": one per workload streaming its output (a node rarely runs more
# than 64 at once); "prepare": engine work ahead of the gate; "clean": removals, sweeps and the
# doctor's probe, slow under load; the default group: short calls (ping, cancel), which must never
# wait behind a removal: the scheduler pings before it hands a slot on.
CONCURRENCY = {"run": 64, "prepare": 16, "clean": 4}
_CHUNK_BYTES = 256 * 1024  # output sent in one event at most
_CHUNK_WAIT_S = 0.02  # output gathered this long after its first byte before it is sent
_PENDING_BYTES = 8 * 1024 * 1024  # live output held for a slow reader; older output is dropped


class NodeAgent:
    def __init__(self, instance: str, node: str) -> None:
        self.node = node
        self.sandbox = Sandbox(instance=instance, labels={LABEL_NODE: node})
        self._runs: dict[str, PreparedRun] = {}
        self._cancelled: set[str] = set()  # cancel() came before its prepare ended
        self._abandoned: set[str] = set()  # release() came before its prepare ended
        self._lock = threading.Lock()

    def hello(self) -> bytes:
        from ray._private.authentication.authentication_utils import get_authentication_mode_name
        from ray._raylet import get_authentication_mode

        ctx = ray.get_runtime_context()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        return encode(
            AgentInfo(
                node=self.node,
                node_id=ctx.get_node_id(),
                gpus=gpus,
                engine=self.sandbox.ping(),
                pid=os.getpid(),
                auth=get_authentication_mode_name(get_authentication_mode()),
            )
        )

    def ping(self) -> bool:
        return self.sandbox.ping()

    def images(self, names: list[str]) -> list[str]:
        """The images of `names` this node's engine lacks."""
        return [name for name in names if self.sandbox.has_image(name) is False]

    @ray.method(concurrency_group="clean")
    def report(self, images: list[str], gpu_image: str | None) -> bytes:
        """The node's engine as `ratchet doctor` shows it. `gpu_image`: try the nvidia driver with
        a throw-away container of it (only asked for on a node with GPUs)."""
        try:
            probe = self.sandbox.gpu_probe(gpu_image) if gpu_image else self.sandbox.probe()
            missing = self.images(images)
        except SandboxError as exc:
            return encode(NodeFacts(engine=False, problem=str(exc)))
        return encode(
            NodeFacts(
                engine=True,
                engine_version=probe.engine_version,
                runtimes=sorted(probe.runtimes),
                gpu_route=probe.route,
                gpu_reason=probe.reason,
                missing_images=missing,
            )
        )

    @ray.method(concurrency_group="clean")
    def sweep(self, labels: dict[str, str]) -> int | bytes:
        try:
            return self.sandbox.remove_labelled({**labels, LABEL_NODE: self.node})
        except Exception as exc:
            return encode(Failed.of(exc))

    # -- one run -----------------------------------------------------------------------------------

    @ray.method(concurrency_group="prepare")
    def prepare(self, key: str, spec_data: bytes) -> bytes:
        try:
            run = self.sandbox.prepare(decode_spec(spec_data))
        except Exception as exc:
            with self._lock:
                self._abandoned.discard(key)
                self._cancelled.discard(key)
            return encode(Failed.of(exc))
        with self._lock:
            abandoned = key in self._abandoned
            self._abandoned.discard(key)
            if not abandoned:
                self._runs[key] = run
            if key in self._cancelled:
                self._cancelled.discard(key)
                run.cancel()
        if abandoned:  # its caller gave up while it was being made
            run.release()
            return encode(Failed(message="released while it was being prepared", kind="agent"))
        assert run.container_id is not None
        return encode(Prepared(container_id=run.container_id, run_id=run.run_id, timings=run.timings))

    @ray.method(concurrency_group="run", num_returns="streaming")
    def execute(self, key: str) -> Iterator[bytes]:
        run = self._runs.get(key)
        if run is None:
            yield encode(Failed(message=f"no prepared run {key} on this node", kind="agent"))
            return
        events = _Events()
        thread = threading.Thread(target=events.run, args=(run,), name=f"run-{key[:8]}", daemon=True)
        thread.start()
        yield from events.stream()

    def cancel(self, key: str) -> None:
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                self._cancelled.add(key)
        if run is not None:
            run.cancel()

    @ray.method(concurrency_group="clean")
    def release(self, key: str) -> None:
        with self._lock:
            run = self._runs.pop(key, None)
            if run is None:
                self._abandoned.add(key)
            self._cancelled.discard(key)
        if run is not None:
            run.release()

    def runs(self) -> list[str]:
        with self._lock:
            return list(self._runs)


class _Events:
    """Turns one run's callbacks (from its own thread) into a stream of encoded events: output in
    chunks (at most `_CHUNK_BYTES`, gathered for `_CHUNK_WAIT_S`), then the end, then the result."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._pending = 0
        self._dropped = 0
        self._lock = threading.Lock()

    def run(self, run: PreparedRun) -> None:
        try:
            result = run.execute(on_output=self._output, on_exit=self._exit, release=False)
        except BaseException as exc:
            self._queue.put(("failed", exc))
        else:
            self._queue.put(("finished", result))

    def _output(self, data: bytes) -> None:
        with self._lock:
            if self._pending + len(data) > _PENDING_BYTES:
                self._dropped += len(data)  # the reader is far behind: keep the run going
                return
            self._pending += len(data)
        self._queue.put(("output", data))

    def _exit(self, timings: Timings) -> None:
        self._queue.put(("exited", msgspec.structs.replace(timings)))

    def stream(self) -> Iterator[bytes]:
        buf: list[bytes] = []
        size = 0
        first = 0.0
        while True:
            timeout = None if not buf else max(0.0, first + _CHUNK_WAIT_S - time.monotonic())
            try:
                kind, value = self._queue.get(timeout=timeout)
            except queue.Empty:
                kind, value = "flush", None
            if kind == "output":
                assert isinstance(value, bytes)
                if not buf:
                    first = time.monotonic()
                buf.append(value)
                size += len(value)
                if size < _CHUNK_BYTES:
                    continue
            if buf:
                yield self._chunk(buf)
                buf, size = [], 0
            if kind == "exited":
                assert isinstance(value, Timings)
                yield encode(Exited(timings=value))
            elif kind == "finished":
                assert isinstance(value, RunResult)
                yield encode(Finished(result=value))
                return
            elif kind == "failed":
                assert isinstance(value, BaseException)
                yield encode(Failed.of(value))
                return

    def _chunk(self, parts: list[bytes]) -> bytes:
        data = b"".join(parts)
        with self._lock:
            self._pending -= len(data)
            dropped, self._dropped = self._dropped, 0
        if dropped:
            data += f"\n[ratchet: {dropped} bytes of live output dropped: the reader fell behind]\n".encode()
        return encode(Output(data=data))
