"""Run one untrusted command in one hardened container. Knows nothing about loops.

    from sandbox import Sandbox, RunSpec, FileEntry
    result = Sandbox().run(RunSpec(image="ratchet/sandbox:latest", argv=["python3", "x.py"], ...))

Errors: `SpecError` (bad spec, no container made; its `GpuUnavailable` when the engine has no way
to attach the GPUs a spec asks for), `SandboxError` (the engine failed). What the workload does —
exit codes, OOM, timeout — is data in `RunResult`, never an exception. A spec may add read-only
`inputs` beside the workspace, `collect` workspace paths back after the run, and `egress`: network
through an allow-listing proxy and nothing else (see `sandbox.egress`). `Sandbox.probe()` says what
the engine is and how it attaches GPUs (an `EngineProbe`). With a journal directory, a run outlives
the process that started it: `Sandbox.reattach()` in the next one takes it over (`sandbox.adopt`).
"""

from .egress import PROXY_URL
from .gpus import EngineProbe, GpuRoute, GpuUnavailable
from .options import CACHE_DIR, HOME_DIR, INPUT_DIR, OUTPUT_DIR, WORKSPACE_DIR, container_options
from .runner import LABEL_RUN, LABEL_SANDBOX, PreparedRun, RunDetached, Sandbox, SandboxError
from .spec import RUNSC_MIN_PIDS, Egress, FileEntry, Limits, Mount, RunResult, RunSpec, SpecError, Timings

__all__ = [
    "CACHE_DIR",
    "HOME_DIR",
    "INPUT_DIR",
    "LABEL_RUN",
    "LABEL_SANDBOX",
    "OUTPUT_DIR",
    "PROXY_URL",
    "RUNSC_MIN_PIDS",
    "WORKSPACE_DIR",
    "Egress",
    "EngineProbe",
    "FileEntry",
    "GpuRoute",
    "GpuUnavailable",
    "Limits",
    "Mount",
    "PreparedRun",
    "RunDetached",
    "RunResult",
    "RunSpec",
    "Sandbox",
    "SandboxError",
    "SpecError",
    "Timings",
    "container_options",
]
