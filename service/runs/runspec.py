"""What a run is, as pure functions: the training `RunSpec` of an experiment, the trusted
evaluation's `RunSpec` after it, a command proposer's `RunSpec`, and their `RunResult`s judged into
the outcome the state machine decides on. No I/O, no clock: the scheduler does the waiting, this
module the meaning."""

from __future__ import annotations

import msgspec

from sandbox import CACHE_DIR, INPUT_DIR, WORKSPACE_DIR, Egress, FileEntry, Limits, Mount

from ..models import DatasetMount, ExperimentView, LoopConfig, LoopView
from ..proposal_models import CommandProposer
from ..rules.caches import OFFLINE_ENV, cache_env
from ..rules.datasets import FLAG, source_of
from ..rules.decisions import Outcome
from ..rules.evaluate import EVAL_SEPARATOR, TRAIN_OUTPUT, eval_tree, prefixed
from ..rules.extract import Extracted, extract_metrics, implausible
from ..rules.patches import is_editable
from ..settings import Settings
from ..state.transitions import Finished
from .executor import RunResult, RunSpec, SpecError

__all__ = [
    "Judged",
    "cache_mb",
    "combined_log",
    "eval_spec",
    "judge",
    "mounts",
    "proposer_spec",
    "succeeded",
    "train_spec",
]


def mounts(field: str, wanted: list[DatasetMount], declared: dict[str, str]) -> list[Mount]:
    """The loop's dataset names as the operator's sources. A name the service no longer declares
    (it was restarted without it) makes the run unable to start: the reason says what to pass."""
    found = []
    for d in wanted:
        source = source_of(declared, d.name)
        if source is None:
            raise SpecError(
                f"{field}: dataset {d.name!r} is not declared on this service any more;"
                f" restart it with `--dataset {d.name}=PATH` ({FLAG})"
            )
        found.append(Mount(source=source, target=d.target))
    return found


def cache_mb(settings: Settings) -> int:
    """A run's cache directory: room for the loop's cache and as much again for what the run adds
    (only up to the bound is ever kept); 0 when caches are off."""
    return 2 * settings.cache_max_mb if settings.cache_max_mb else 0


def train_spec(
    exp: ExperimentView,
    loop: LoopView,
    tree: dict[str, bytes],
    executable: set[str],
    *,
    gpus: list[str],
    attempt: int,
    instance: str,
    settings: Settings,
    cache: bytes = b"",
    fill_cache: bool = False,
) -> RunSpec:
    """The experiment's own run: its snapshot's files (the editable ones writable), the loop's
    command, limits, image and datasets, a private copy of the loop's `cache` (returned when this
    run is the trusted one that fills it), the GPU ids it was given, and labels that name it."""
    cfg: LoopConfig = loop.config
    if cfg.evaluate is not None and cfg.evaluate.mounts:
        raise SpecError(
            "evaluate.mounts (host paths or volumes from the API body) is no longer mounted; the"
            f" operator declares the data with {FLAG} and the loop is created again naming it in"
            " evaluate.datasets"
        )
    res = cfg.resources
    files = [
        FileEntry(path=p, data=d, writable=is_editable(p, cfg.editable), executable=p in executable)
        for p, d in tree.items()
    ]
    caching = settings.cache_max_mb > 0
    env = {
        **OFFLINE_ENV,
        **(cache_env(CACHE_DIR) if caching else {}),
        **cfg.env,
        "RATCHET_TIME_BUDGET_S": f"{cfg.time_budget_s:g}",
        "RATCHET_EXPERIMENT_ID": exp.id,
        "RATCHET_LOOP_ID": loop.id,
    }
    if exp.seed is not None:
        env["RATCHET_SEED"] = str(exp.seed)
    return RunSpec(
        image=cfg.image or settings.default_image,
        argv=list(cfg.command),
        files=files,
        env=env,
        mounts=mounts("datasets", cfg.datasets, settings.datasets),
        limits=Limits(
            cpus=res.cpus,
            memory_mb=res.memory_mb,
            pids=res.pids,
            disk_mb=res.disk_mb,
            log_bytes=settings.log_bytes,
            cache_mb=cache_mb(settings),
        ),
        cache=cache if caching else b"",
        collect_cache=caching and fill_cache,
        gpus=gpus,
        runtime=cfg.runtime or settings.runtime,
        timeout_s=cfg.hard_timeout_s,
        labels={
            "ratchet.loop": loop.id,
            "ratchet.experiment": exp.id,
            "ratchet.instance": instance,
            "ratchet.attempt": str(attempt),
        },
    )


def eval_spec(
    train: RunSpec, cfg: LoopConfig, tree: dict[str, bytes], result: RunResult, datasets: dict[str, str]
) -> RunSpec:
    """The trusted evaluation: the non-editable files (read-only), the training output
    (read-only, under train_output/), the evaluation's own datasets (`datasets`: the declared ones)
    and hard timeout, and a fresh copy of the loop's cache (never kept)."""
    ev = cfg.evaluate
    assert ev is not None
    files_tree, _ = eval_tree(tree, cfg.editable, result.output_files)
    execs = {f.path for f in train.files if f.executable}
    files = [FileEntry(path=p, data=d, writable=False, executable=p in execs) for p, d in files_tree.items()]
    env = {**train.env, "RATCHET_TRAIN_OUTPUT_DIR": f"{WORKSPACE_DIR}/{TRAIN_OUTPUT}"}
    return msgspec.structs.replace(
        train,
        argv=list(ev.command),
        files=files,
        env=env,
        mounts=mounts("evaluate.datasets", ev.datasets, datasets),
        collect_cache=False,
        timeout_s=ev.timeout_s,
        labels={**train.labels, "ratchet.phase": "evaluate"},
    )


def proposer_spec(
    proposal: str,
    number: int,
    parent: str,
    loop: LoopView,
    proposer: CommandProposer,
    tree: dict[str, bytes],
    executable: set[str],
    context: dict[str, bytes],
    *,
    attempt: int,
    instance: str,
    settings: Settings,
) -> RunSpec:
    """A command proposer's run: a writable copy of the parent workspace (its harness read-only, as
    for a candidate), the context files read-only in $RATCHET_CONTEXT_DIR, its own limits and no
    GPU, the whole workspace collected afterwards, and egress only through its allow-list."""
    cfg = loop.config
    res = proposer.resources
    files = [
        FileEntry(path=p, data=d, writable=is_editable(p, cfg.editable), executable=p in executable)
        for p, d in tree.items()
    ]
    env = {
        **proposer.env,
        "RATCHET_CONTEXT_DIR": INPUT_DIR,
        "RATCHET_LOOP_ID": loop.id,
        "RATCHET_PROPOSAL_ID": proposal,
        "RATCHET_PROPOSAL_NUMBER": str(number),
        "RATCHET_PARENT": parent,
    }
    egress = None
    if proposer.network is not None:
        image = settings.proposer_proxy_image or settings.default_image
        egress = Egress(allow=list(proposer.network.allow), network=settings.proposer_network, image=image)
    return RunSpec(
        image=proposer.image or cfg.image or settings.default_image,
        argv=list(proposer.command),
        files=files,
        inputs=[FileEntry(path=p, data=d) for p, d in context.items()],
        collect=["."],
        egress=egress,
        env=env,
        limits=Limits(
            cpus=res.cpus,
            memory_mb=res.memory_mb,
            pids=res.pids,
            disk_mb=res.disk_mb,
            log_bytes=settings.log_bytes,
        ),
        runtime=cfg.runtime or settings.runtime,
        timeout_s=proposer.timeout_s,
        labels={
            "ratchet.loop": loop.id,
            "ratchet.proposal": proposal,
            "ratchet.instance": instance,
            "ratchet.attempt": str(attempt),
        },
    )


def succeeded(result: RunResult) -> bool:
    return result.exit_code == 0 and not (result.oom_killed or result.timed_out or result.cancelled)


def combined_log(result: RunResult, evaluation: RunResult | None) -> str:
    """The experiment's log: the training run's, then the evaluation's after a separator line
    (and a line naming any training output the evaluation did not get)."""
    text = result.log
    if evaluation is not None:
        sep = "" if not text or text.endswith("\n") else "\n"
        left_out = _left_out(result)
        note = f"[ratchet: {left_out}]\n" if left_out else ""
        text = f"{text}{sep}{EVAL_SEPARATOR}\n{note}{evaluation.log}"
    return text


def _left_out(result: RunResult) -> str | None:
    """The training output the evaluation went without, said so that a failure's reason explains
    itself: a checkpoint over the cap is the usual one."""
    if not result.output_skipped:
        return None
    names = ", ".join(result.output_skipped[:5]) + (" …" if len(result.output_skipped) > 5 else "")
    cap = Limits().output_bytes / 1024**2
    return (
        f"training output left out of {TRAIN_OUTPUT}/ (over the {cap:g} MiB output cap, or not a"
        f" regular file): {names}"
    )


class Judged(msgspec.Struct, kw_only=True, frozen=True):
    outcome: Outcome  # what the deciding run did, with its metric: `decisions.decide`'s input
    finished: Finished  # what the experiment records about itself, whatever the verdict
    unparsable: bool  # the metric was reported, but not as a number


def judge(
    cfg: LoopConfig, result: RunResult, evaluation: RunResult | None, log: str, tail_bytes: int
) -> Judged:
    """The outcome of an experiment's runs. Without an evaluation phase the training run decides;
    with one, a failed training run decides (never its metric), else the evaluation does. The hard
    timeout in the outcome is the one the deciding run was held to."""
    trained = extract_metrics(result.log, result.output_files.get("metrics.json"))
    if cfg.evaluate is None:
        judged, phase, source, metrics = result, None, trained, trained.metrics
    elif evaluation is None:
        judged, phase, metrics = result, None, prefixed(trained.metrics)
        source = Extracted(problem="evaluation did not run")
    else:
        judged, phase = evaluation, "evaluation"
        source = extract_metrics(evaluation.log, evaluation.output_files.get("metrics.json"))
        metrics = {**source.metrics, **prefixed(trained.metrics)}
    value, problem = _metric(cfg, source)
    outcome = Outcome(
        exit_code=judged.exit_code,
        oom_killed=judged.oom_killed,
        timed_out=judged.timed_out,
        cancelled=judged.cancelled,
        exit_reported=judged.exit_reported,
        report_forged=judged.report_forged,
        metric=value,
        metric_problem=problem,
        timeout_s=judged.timeout_s,
        memory_mb=cfg.resources.memory_mb,
        phase=phase,
        note=_left_out(result) if evaluation is not None else None,
    )
    finished = Finished(
        metrics=metrics,
        memory_gb=_memory_gb(trained.metrics, result),
        workload_seconds=result.workload_seconds,
        log_tail=_tail(log, tail_bytes),
    )
    name = cfg.metric.name
    unparsable = name in source.non_numeric or name in source.metrics
    return Judged(outcome=outcome, finished=finished, unparsable=unparsable)


def _metric(cfg: LoopConfig, source: Extracted) -> tuple[float | None, str | None]:
    """The loop's metric from what the deciding run reported, or why there is none to believe."""
    spec = cfg.metric
    value = source.metrics.get(spec.name)
    problem = source.problem
    if value is not None and (why := implausible(spec.name, value, spec.min_value, spec.max_value)):
        value, problem = None, why
    if value is None and problem is None:
        bad = source.non_numeric.get(spec.name)
        where = "metrics.json" if source.source == "metrics.json" else "summary block"
        problem = (
            f"{spec.name} in the {where} is {bad}, not a number"
            if bad is not None
            else f"metric {spec.name!r} missing from the {where}"
        )
    return value, problem


def _tail(text: str, n: int) -> str:
    data = text.encode("utf-8", errors="replace")[-n:] if n else b""
    return data.decode("utf-8", errors="replace")


def _memory_gb(metrics: dict[str, float], result: RunResult) -> float | None:
    if "peak_vram_mb" in metrics:
        return metrics["peak_vram_mb"] / 1024
    if result.peak_memory_bytes is not None:
        return result.peak_memory_bytes / 1024**3
    return None
