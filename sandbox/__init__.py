"""Run one untrusted command in one hardened container. Knows nothing about loops.

    from sandbox import Sandbox, RunSpec, FileEntry
    result = Sandbox().run(RunSpec(image="ratchet/sandbox:latest", argv=["python3", "x.py"], ...))

Errors: `SpecError` (bad spec, engine untouched), `SandboxError` (the engine failed). What the
workload does — exit codes, OOM, timeout — is data in `RunResult`, never an exception.
"""

from .options import OUTPUT_DIR, WORKSPACE_DIR, container_options
from .runner import LABEL_RUN, LABEL_SANDBOX, PreparedRun, Sandbox, SandboxError
from .spec import RUNSC_MIN_PIDS, FileEntry, Limits, Mount, RunResult, RunSpec, SpecError, Timings

__all__ = [
    "LABEL_RUN",
    "LABEL_SANDBOX",
    "OUTPUT_DIR",
    "RUNSC_MIN_PIDS",
    "WORKSPACE_DIR",
    "FileEntry",
    "Limits",
    "Mount",
    "PreparedRun",
    "RunResult",
    "RunSpec",
    "Sandbox",
    "SandboxError",
    "SpecError",
    "Timings",
    "container_options",
]
