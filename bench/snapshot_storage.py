"""Snapshot storage: a chain of accepted one-line edits to a ~30 KB train.py in a workspace of a
few files, stored three ways in the same run:

- one .tar.gz per snapshot (what downloading every archive would keep; the baseline),
- content addressing alone (every changed file stored whole, zlib; Ratchet before deltas),
- the snapshot store as the service uses it (each changed file a delta against its parent's version,
  chains cut by a full copy every `MAX_CHAIN` versions).

    .venv/bin/python bench/snapshot_storage.py [--edits 1000] [--reads 30]

Prints the bytes each takes (file sizes, and blocks allocated on disk) and their ratio to the
tar.gz baseline, then the time to read back a whole snapshot from a fresh store (empty cache):
the newest, the deepest in its delta chain, next to reading the same snapshot stored whole.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from service.state.snapshots import MAX_CHAIN, Manifest, SnapshotStore

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["examples/charlm/train.py", "examples/charlm/prepare.py", "examples/charlm-eval/prepare.py"]


def workspace() -> dict[str, bytes]:
    """train.py of ~30 KB built from the examples' real Python, plus the harness and instructions."""
    code = b"".join((ROOT / p).read_bytes() for p in SOURCES)
    train = b""
    part = 0
    while len(train) < 30_000:  # distinct copies, so compression cannot just point back one copy
        train += code.replace(b"def ", f"def v{part}_".encode())
        part += 1
    return {
        "train.py": train[:30_000].rsplit(b"\n", 1)[0] + b"\n",
        "prepare.py": (ROOT / "examples/charlm/prepare.py").read_bytes(),
        "program.md": b"# Goal\nLower val_bpb. Edit train.py only.\n" * 20,
    }


def one_line_edit(data: bytes, rng: random.Random, n: int) -> bytes:
    lines = data.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    lines[i] = f"LEARNING_RATE = {rng.uniform(1e-4, 1e-2):.6f}  # edit {n}\n".encode()
    return b"".join(lines)


def disk(root: Path) -> tuple[int, int]:
    """(sum of file sizes, bytes of blocks allocated) under root."""
    size = blocks = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            size, blocks = size + st.st_size, blocks + st.st_blocks * 512
    return size, blocks


def read_time(root: Path, manifest: Manifest, reads: int) -> float:
    """Median seconds to read the whole snapshot from a fresh store (nothing cached in-process)."""
    times = []
    for _ in range(reads):
        store = SnapshotStore(root)
        t0 = time.perf_counter()
        store.load_tree(manifest)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--reads", type=int, default=30)
    args = ap.parse_args()
    rng = random.Random(42)
    with tempfile.TemporaryDirectory(prefix="ratchet-snapshots-") as tmp:
        tars, whole_root, delta_root = Path(tmp) / "tars", Path(tmp) / "whole", Path(tmp) / "delta"
        tars.mkdir()
        whole, delta = SnapshotStore(whole_root), SnapshotStore(delta_root)
        tree = workspace()
        first_size, first_total = len(tree["train.py"]), sum(map(len, tree.values()))
        parent = delta.put_tree(tree)
        plain = whole.put_tree(tree)
        manifests = [(parent, plain)]
        put_times = []
        for n in range(1, args.edits + 1):
            tree = {**tree, "train.py": one_line_edit(tree["train.py"], rng, n)}
            t0 = time.perf_counter()
            parent = delta.put_tree(tree, parent=parent)
            put_times.append(time.perf_counter() - t0)
            plain = whole.put_tree(tree)
            manifests.append((parent, plain))
            (tars / f"{n}.tar.gz").write_bytes(whole.archive(plain))
        (tars / "0.tar.gz").write_bytes(whole.archive(manifests[0][1]))
        sizes = {"tar.gz per snapshot": disk(tars), "whole blobs": disk(whole_root)}
        sizes["deltas"] = disk(delta_root)
        base_size, base_blocks = sizes["tar.gz per snapshot"]
        print(
            f"{args.edits} accepted one-line edits of a {first_size} B train.py"
            f" ({len(tree)} files, {first_total} B); MAX_CHAIN={MAX_CHAIN}"
        )
        print(f"{'stored as':<22}{'bytes':>12}{'x tar.gz':>10}{'disk blocks':>14}{'x tar.gz':>10}")
        for name, (size, blocks) in sizes.items():
            print(f"{name:<22}{size:>12}{size / base_size:>10.3f}{blocks:>14}{blocks / base_blocks:>10.3f}")

        depths = [delta.depth(next(e.blob for e in m.files if e.path == "train.py")) for m, _ in manifests]
        deepest = max(range(len(manifests)), key=lambda i: (depths[i], i))
        newest = len(manifests) - 1
        base_read = read_time(whole_root, manifests[newest][1], args.reads)
        print(f"\n{'read one snapshot':<36}{'depth':>7}{'p50 ms':>9}{'x whole':>9}")
        print(f"{'newest, stored whole':<36}{0:>7}{base_read * 1e3:>9.2f}{1.0:>9.2f}")
        for label, i in (("newest, deltas", newest), ("deepest in its chain, deltas", deepest)):
            t = read_time(delta_root, manifests[i][0], args.reads)
            print(f"{label:<36}{depths[i]:>7}{t * 1e3:>9.2f}{t / base_read:>9.2f}")
        print(f"\nput_tree with a delta: p50 {statistics.median(put_times) * 1e3:.2f} ms (fsyncs included)")


if __name__ == "__main__":
    main()
