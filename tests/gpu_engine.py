"""A second Docker engine of the test's own whose GPUs are fake: a stand-in for the
`nvidia-container-runtime-hook` on its PATH makes the engine accept GPU device requests and put the
requested ids into the container's NVIDIA_VISIBLE_DEVICES, as on a GPU machine (no device is
attached). Own data root, exec root, socket and containerd; no bridge, no iptables: nothing of the
machine's engine is touched. The sandbox image is copied in with `docker save | docker load`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import docker

__all__ = ["FakeGpuEngine"]

_HOOK = (
    "#!/bin/sh\n# stand-in for the NVIDIA hook: accept the prestart call, attach nothing\ncat >/dev/null\n"
)


class FakeGpuEngine:
    def __init__(self, image: str) -> None:
        self.image = image
        self.dir = Path(tempfile.mkdtemp(prefix="gpud-", dir="/tmp"))
        self.host = f"unix://{self.dir}/docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def problem(self) -> str | None:
        if os.geteuid() != 0:
            return "a second Docker engine needs root"
        if shutil.which("dockerd") is None:
            return "dockerd is not installed"
        return None

    def start(self, timeout: float = 90) -> FakeGpuEngine:
        bin_dir = self.dir / "bin"
        bin_dir.mkdir()
        hook = bin_dir / "nvidia-container-runtime-hook"
        hook.write_text(_HOOK)
        hook.chmod(0o755)
        log = open(self.dir / "dockerd.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={self.dir}/data",
                f"--exec-root={self.dir}/exec",
                f"--pidfile={self.dir}/dockerd.pid",
                f"--host={self.host}",
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
            ],
            env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._wait(timeout)
            save = subprocess.Popen(["docker", "save", self.image], stdout=subprocess.PIPE)
            load = ["docker", "-H", self.host, "load", "-q"]
            subprocess.run(load, stdin=save.stdout, check=True, timeout=300)
            save.wait(timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().ping()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-GPU engine did not start: {self.log()[-2000:]}") from None
                time.sleep(0.5)

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=120)

    def log(self) -> str:
        path = self.dir / "dockerd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):  # only this engine's own containers
                for c in self.client().containers.list(all=True):
                    c.remove(force=True)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        subprocess.run(["umount", "-R", str(self.dir / "exec")], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
