"""The `results.tsv` ledger: header and rows in the reference format. Pure: no I/O."""

from __future__ import annotations

from ..models import FAILED, Status

__all__ = ["LEDGER_STATUSES", "header", "row"]

# Statuses that appear in the ledger; a timeout counts as a crash there. Cancelled and
# infrastructure errors are not results of the candidate and are left out.
LEDGER_STATUSES = tuple(s.value for s in Status if s in {Status.keep, Status.discard, *FAILED})


def header(metric_name: str) -> str:
    return f"commit\t{_clean(metric_name)}\tmemory_gb\tstatus\tdescription\n"


def row(
    snapshot_id: str, status: str, metric: float | None, memory_gb: float | None, description: str
) -> str:
    shown = "crash" if status == "timeout" else status
    if shown == "crash":
        value, mem = 0.0, 0.0
    else:
        value, mem = metric or 0.0, memory_gb or 0.0
    return f"{snapshot_id[:7]}\t{value:.6f}\t{mem:.1f}\t{shown}\t{_clean(description)}\n"


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())
