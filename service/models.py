"""The one schema: API bodies, stored records and the OpenAPI document all come from these Structs."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from .ops_models import WebhookSpec
from .proposal_models import ProposerSpec, ProposerView

__all__ = [
    "FAILED",
    "FINAL",
    "RUN_OVER",
    "AcceptanceSpec",
    "CacheView",
    "CandidateCreate",
    "DatasetMount",
    "DatasetView",
    "ErrorBody",
    "EvalMount",
    "EvaluateSpec",
    "ExperimentPage",
    "ExperimentView",
    "LoopConfig",
    "LoopCreate",
    "LoopView",
    "MetricSpec",
    "RerunCreate",
    "Resources",
    "Scope",
    "SnapshotView",
    "Status",
    "TokenCreate",
    "TokenCreated",
    "TokenView",
    "Workspace",
    "hard_timeout_s",
]

Name = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Glob = Annotated[str, Meta(min_length=1, max_length=256)]
Arg = Annotated[str, Meta(min_length=1, max_length=4096)]
EnvKey = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Seconds = Annotated[float, Meta(gt=0, le=7 * 24 * 3600)]


class Status(StrEnum):
    """Experiment status. Every change goes through `service.transitions`."""

    queued = "queued"  # waiting for a slot
    running = "running"  # holds a slot: its container is being made, runs, or is being judged
    keep = "keep"  # finished, metric improved: its snapshot became the loop's best
    discard = "discard"  # finished, metric did not improve
    crash = "crash"  # the candidate failed: non-zero exit, OOM, missing or non-finite metric
    timeout = "timeout"  # killed at the hard wall-clock deadline
    cancelled = "cancelled"  # cancelled by a user, or by stopping its loop
    error = "error"  # the infrastructure failed, not the candidate
    # noise-aware acceptance only:
    confirming = "confirming"  # its first run looked better; its confirmation runs decide (no slot)
    measured = "measured"  # a repeat run of a candidate: its value counts towards that candidate's mean


FINAL = frozenset(
    {
        Status.keep,
        Status.discard,
        Status.crash,
        Status.timeout,
        Status.cancelled,
        Status.error,
        Status.measured,
    }
)
RUN_OVER = FINAL | {Status.confirming}  # the experiment's own run has ended (its log is complete)
FAILED = frozenset({Status.crash, Status.timeout})  # the candidate failed (`error` is the machine's)


def hard_timeout_s(time_budget_s: float, timeout_s: float | None) -> float:
    """The hard kill: `timeout_s` when set, else twice the budget plus 30 s of start-up."""
    return timeout_s if timeout_s is not None else 2 * time_budget_s + 30.0


class LoopState(StrEnum):
    active = "active"  # queued experiments are dispatched
    paused = "paused"  # nothing new starts; running experiments finish
    stopped = "stopped"  # final: queued and running experiments were cancelled


class BaselineState(StrEnum):
    pending = "pending"  # no baseline has finished yet: candidates wait
    ok = "ok"  # a baseline succeeded and founded the best
    failed = "failed"  # the last baseline failed: no candidate is judged until one succeeds


class Runtime(StrEnum):
    """The container runtime of a loop's runs."""

    runc = "runc"  # the engine's default runtime
    runsc = "runsc"  # gVisor: a user-space kernel between the workload and the host


class MetricSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")] = (
        "val_bpb"
    )
    direction: Literal["minimize", "maximize"] = "minimize"
    min_delta: Annotated[float, Meta(ge=0)] = 0.0
    # The plausible range: a value outside it is a forged or broken metric (crash), never a keep.
    min_value: float | None = None
    max_value: float | None = None


class Resources(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    gpus: Annotated[int, Meta(ge=0, le=64)] = 0
    cpus: Annotated[float, Meta(gt=0, le=1024)] = 1.0
    memory_mb: Annotated[int, Meta(ge=64, le=4 * 1024 * 1024)] = 2048
    pids: Annotated[int, Meta(ge=16, le=1_000_000)] = 256
    disk_mb: Annotated[int, Meta(ge=1, le=1024 * 1024)] = 512


class Workspace(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Either `files` ({path: text}) or `archive` (base64 of a .tar.gz)."""

    files: dict[str, str] | None = None
    archive: str | None = None


class EvalMount(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Removed: a host path or volume named in the API body. Refused in new loops (422); kept so
    loops stored before can still be read. Use `datasets`."""

    source: Annotated[str, Meta(min_length=1, max_length=4096)]
    target: Annotated[str, Meta(min_length=2, max_length=4096, pattern=r"^/")]


class DatasetMount(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Read-only data the operator declared (`ratchet serve --dataset NAME=PATH`), by name, and
    where the run sees it: an absolute path, e.g. under the sandbox user's home
    (`/home/sandbox/.cache/NAME`, which `~/.cache/NAME` finds). Never over /sandbox (workspace,
    output, harness files), /tmp, the home itself or a system directory."""

    name: Annotated[str, Meta(min_length=1, max_length=4096)]
    target: Annotated[str, Meta(min_length=1, max_length=4096)]


class EvaluateSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A trusted evaluation phase: after a successful training run, `command` runs in a second
    container holding only the non-editable files, the training output (read-only, under
    `train_output/`) and its own `datasets` (training never gets them). The loop's metric comes from
    this phase alone."""

    command: Annotated[list[Arg], Meta(min_length=1, max_length=256)]
    datasets: Annotated[list[DatasetMount], Meta(max_length=16)] = []  # the evaluation's own
    mounts: Annotated[list[EvalMount], Meta(max_length=16)] = []  # removed: see EvalMount
    timeout_s: Seconds = 300.0


class AcceptanceSpec(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """When a successful candidate is kept. `strict`: better than the best so far on one run.
    `confirm` and `significant` re-run a candidate that looks better and keep it only when the mean
    of its runs beats the best's mean by `k` standard errors of the measured noise. Unset numbers
    take the rule's defaults (see the README, "Trusting the ledger")."""

    rule: Literal["strict", "confirm", "significant"] = "strict"
    baseline_runs: Annotated[int, Meta(ge=1, le=50)] | None = None  # the baseline, repeated with seeds
    confirm_runs: Annotated[int, Meta(ge=0, le=20)] | None = None  # extra runs of a promising candidate
    k: Annotated[float, Meta(ge=0, le=10)] | None = None  # standard errors the mean must win by
    remeasure_runs: Annotated[int, Meta(ge=0, le=1000)] | None = None  # idle slots re-run the best up to this


class LoopConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A loop's settings as stored, with every default resolved."""

    name: Name
    editable: list[Glob] = msgspec.field(default_factory=lambda: ["train.py"])
    image: Annotated[str, Meta(min_length=1, max_length=512)] | None = None  # default: the service's
    command: Annotated[list[Arg], Meta(min_length=1, max_length=256)] = msgspec.field(
        default_factory=lambda: ["python3", "train.py"]
    )
    metric: MetricSpec = MetricSpec()
    time_budget_s: Seconds = 300.0
    timeout_s: Seconds | None = None  # hard kill; default: twice the budget plus 30 s of start-up
    resources: Resources = Resources()
    env: dict[EnvKey, Annotated[str, Meta(max_length=4096)]] = {}
    max_experiments: Annotated[int, Meta(ge=1)] | None = None
    runtime: Runtime | None = None  # default: the service's setting
    evaluate: EvaluateSpec | None = None  # a trusted evaluation phase; the metric comes from it
    acceptance: AcceptanceSpec = AcceptanceSpec()
    datasets: Annotated[list[DatasetMount], Meta(max_length=16)] = []  # read-only, for training runs
    proposer: ProposerSpec | None = None  # who proposes candidates; None: REST submitters (v1)
    deadline: datetime | None = None  # after it, no new candidate is taken (RFC 3339, with a zone)

    @property
    def hard_timeout_s(self) -> float:
        return hard_timeout_s(self.time_budget_s, self.timeout_s)


class LoopCreate(LoopConfig, kw_only=True, frozen=True, forbid_unknown_fields=True):
    workspace: Workspace
    # Told of the loop's events; kept apart from its config, so no view ever shows a secret.
    webhooks: Annotated[list[WebhookSpec], Meta(max_length=8)] = []

    def config(self) -> LoopConfig:
        fields = {f: getattr(self, f) for f in LoopConfig.__struct_fields__}
        return LoopConfig(**fields)


class CacheView(msgspec.Struct, kw_only=True):
    """A loop's cache: what its trusted baseline run left in its cache directory (compile caches,
    downloads), stored by the service; every run gets a private writable copy of it."""

    state: Literal["filled", "too_large"]  # too_large: the run left more than RATCHET_CACHE_MAX_MB
    bytes: int  # content size
    files: int
    experiment: str  # the baseline run that filled it
    filled_at: float


class DatasetView(msgspec.Struct, kw_only=True):
    """A dataset the operator declared; loops name it in `datasets`."""

    name: str


class LoopView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    state: LoopState
    baseline: BaselineState
    baseline_reason: str | None = None
    config: LoopConfig
    root_snapshot: str
    best_snapshot: str | None = None
    best_metric: float | None = None
    best_experiment: str | None = None
    best_runs: int | None = None  # successful runs behind best_metric (their mean)
    noise_sd: float | None = None  # run-to-run standard deviation, pooled over repeated runs
    counts: dict[str, int] = {}
    created_at: float
    cache: CacheView | None = None  # none yet (filled by the first successful baseline run)
    state_reason: str | None = None  # why the loop was paused, when Ratchet paused it
    proposer: ProposerView | None = None  # its proposer's progress, when it has one


class CandidateCreate(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A candidate edit: a unified diff (`patch`) or whole files (`files`), against `parent`."""

    description: Annotated[str, Meta(min_length=1, max_length=2000)]
    patch: str | None = None
    files: dict[str, str] | None = None
    parent: Annotated[str, Meta(pattern=r"^[0-9a-f]{7,64}$")] | None = None  # default: the loop's best


class ExperimentView(msgspec.Struct, kw_only=True):
    id: str
    loop_id: str
    number: int  # 1 for the first experiment of its loop (the baseline)
    kind: Literal["baseline", "candidate"]
    description: str
    status: Status
    reason: str | None = None
    parent: str | None = None
    snapshot: str
    commit: str
    metric: float | None = None
    metrics: dict[str, float] = {}
    memory_gb: float | None = None
    exit_code: int | None = None
    gpus: list[str] = []
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    workload_seconds: float | None = None
    log_tail: str | None = None
    rerun_of: str | None = None  # the experiment this one re-runs
    seed: int | None = None  # passed to the workload as RATCHET_SEED
    repeat_of: str | None = None  # the candidate this run repeats (confirmation, noise or re-measure)
    runs: int | None = None  # a candidate's successful runs so far (its own and its repeats')
    mean: float | None = None  # the mean metric over those runs: what its verdict and the ledger use
    attempts: int = 0  # times it was started: >1 after a restart or a container engine failure
    node: str | None = None  # where it runs or ran (the executor's node; "local" on one machine)
    proposal_id: str | None = None  # the proposer run that made this candidate
    # In the answer to a submission only: the candidate had already run in this loop as this
    # experiment (this very one), so nothing new was queued.
    duplicate_of: str | None = None


class RerunCreate(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Run an experiment's snapshot again; `seed` reaches the workload as `RATCHET_SEED`."""

    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None


class ExperimentPage(msgspec.Struct, kw_only=True):
    items: list[ExperimentView]
    next_after: int | None = None  # pass as ?after= for the next page; null on the last page


class SnapshotView(msgspec.Struct, kw_only=True):
    id: str
    commit: str
    experiment_id: str
    number: int
    metric: float | None
    description: str
    finished_at: float | None


class Health(msgspec.Struct, kw_only=True):
    status: str
    database: bool | None = None
    engine: bool | None = None
    detail: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every 4xx and 5xx answer: `detail` says what was wrong and how to fix it."""

    status_code: int
    detail: str
    errors: list[dict[str, str]] | None = None  # for 400: one entry per offending field


class Scope(StrEnum):
    """What an API token may do. `admin` implies the others."""

    read = "read"  # view loops, experiments, ledgers, snapshots, logs and pages
    submit = "submit"  # submit candidates and re-runs (to the token's loops, if it names any)
    admin = "admin"  # create and control loops, cancel experiments, manage tokens


LoopRef = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class TokenCreate(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A new API token. `loops` (names or ids) restricts where it may submit; null: every loop."""

    name: Name
    scopes: Annotated[list[Scope], Meta(min_length=1, max_length=3)]
    loops: Annotated[list[LoopRef], Meta(min_length=1, max_length=256)] | None = None


class TokenView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    scopes: list[Scope]
    loops: list[str] | None = None
    created_at: float
    last_used_at: float | None = None


class TokenCreated(TokenView, kw_only=True):
    secret: str  # shown only in this answer; only its hash is stored
