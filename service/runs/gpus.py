"""GPU inventory and allocation. The pool is pure bookkeeping; detection shells out once."""

from __future__ import annotations

import shutil
import subprocess

__all__ = ["GpuPool", "detect_gpus", "gpu_uuids"]


def _query(fields: str) -> list[list[str]]:
    """nvidia-smi's answer to --query-gpu=FIELDS, one list per GPU; none when it is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[v.strip() for v in line.split(",")] for line in out.splitlines() if line.strip()]


def detect_gpus() -> list[str]:
    """Device indices reported by nvidia-smi; none when it is missing or fails."""
    return [row[0] for row in _query("index")]


def gpu_uuids() -> dict[str, str]:
    """Device index -> UUID, from nvidia-smi."""
    return {row[0]: row[1] for row in _query("index,uuid") if len(row) == 2}


class GpuPool:
    """Hands out distinct device ids; no id is ever held by two experiments at once."""

    def __init__(self, ids: list[str]) -> None:
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate GPU ids in {ids}")
        self.ids = list(ids)
        self._free = list(ids)

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[str] | None:
        if n == 0:
            return []
        if n > len(self._free):
            return None
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    @property
    def free_ids(self) -> list[str]:
        return list(self._free)

    def take(self, ids: list[str]) -> list[str] | None:
        """Exactly `ids` (those a prepared run was made for), or None when any of them is held."""
        if len(set(ids)) != len(ids) or not set(ids) <= set(self._free):
            return None
        self._free = [g for g in self._free if g not in ids]
        return list(ids)

    def release(self, ids: list[str]) -> None:
        for gpu in ids:
            if gpu not in self.ids or gpu in self._free:
                raise ValueError(f"GPU {gpu} was not allocated")
            self._free.append(gpu)
        self._free.sort(key=self.ids.index)
