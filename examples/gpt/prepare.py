"""Fixed harness of the gpt example: the dataset, the tokenizer, the data loader and `val_bpb`.

Experiments edit train.py only. Everything that decides the score lives here, so an edit can make
the model better or worse but cannot change what "better" means.

Build the dataset once (a tokenizer trained here, then token shards), from the repository root:

    python3 examples/gpt/prepare.py                 # into ~/.cache/ratchet-gpt
    python3 examples/gpt/prepare.py --data-dir DIR  # or GPT_DATA_DIR=DIR

It needs only Python 3 and NumPy (tiktoken, when installed, encodes faster and is cross-checked),
downloads nothing, and does nothing when the directory already holds this dataset. Training reads
the directory and never writes to it, so it can be mounted read-only.

Public interface for train.py (these import torch; building the dataset does not):
    TIME_BUDGET_S, SEED, OUTPUT_DIR, DATA_DIR      run settings from the environment
    MAX_SEQ_LEN                                    longest sequence; evaluation uses exactly this
    Tokenizer.load()                               .vocab_size, .encode(text), .decode(ids)
    make_dataloader(batch, seq_len, device)        endless (x, y) batches of training tokens
    evaluate_bpb(model, batch, device)             bits per byte on the held-out tokens
    cpu_count()                                    CPUs this process may use (cgroup quota aware)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

# Nothing in this example downloads anything; make the libraries that would say so at once.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# --- run settings (set by Ratchet; the defaults make a hand run work) ------------------
TIME_BUDGET_S: float = float(os.environ.get("RATCHET_TIME_BUDGET_S", "300"))
SEED: int = int(os.environ.get("RATCHET_SEED", "42"))
OUTPUT_DIR: str | None = os.environ.get("RATCHET_OUTPUT_DIR") or None


def _default_data_dir() -> Path:
    """$GPT_DATA_DIR, else ~/.cache/ratchet-gpt. When HOME points elsewhere (a sandbox may set
    HOME=/tmp), the account's own home from /etc/passwd is tried as well, where a dataset mounted
    for the user is found."""
    if os.environ.get("GPT_DATA_DIR"):
        return Path(os.environ["GPT_DATA_DIR"])
    here = Path.home() / ".cache" / "ratchet-gpt"
    try:
        import pwd

        account = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "ratchet-gpt"
    except (ImportError, KeyError):
        return here
    return account if not here.exists() and account.exists() else here


DATA_DIR = _default_data_dir()

# --- dataset constants (fixed: changing any of them makes a different dataset) ----------
FORMAT_VERSION = 1
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "charlm" / "data" / "corpus.txt"
VOCAB_SIZE = 1024  # 256 byte tokens + 768 merges
# Pre-tokenization: words with their leading space, numbers, punctuation runs, whitespace.
# ASCII classes only, so Python's `re` and tiktoken's regex engine split identically; other
# bytes fall into the punctuation class and stay byte-level.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
VAL_FRACTION = 0.1  # the last tenth of the corpus is held out
MAX_SEQ_LEN = 256  # context length; evaluation always scores windows of exactly this length
EVAL_TOKENS = 16 * MAX_SEQ_LEN * 4  # held-out tokens scored by evaluate_bpb (fixed)


# ============================================================================================
# Tokenizer: byte-level BPE, trained here
# ============================================================================================


def _pairs(word: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    return pairwise(word)


def train_bpe(text: str, vocab_size: int) -> list[tuple[int, int]]:
    """Merges of a byte-level BPE, most frequent adjacent pair first, ties to the smaller pair.

    Counts are kept per distinct word and updated only for the words a merge touches, so the
    whole book trains in seconds in pure Python.
    """
    words = Counter(re.findall(SPLIT_PATTERN, text))
    seqs: list[list[int]] = [list(w.encode("utf-8")) for w in words]
    freqs = list(words.values())
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for p in _pairs(tuple(seq)):
            pair_counts[p] += freqs[i]
            where[p].add(i)
    merges: list[tuple[int, int]] = []
    for new_id in range(256, vocab_size):
        if not pair_counts:
            break
        best = max(pair_counts.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
        merges.append(best)
        for i in list(where.pop(best, ())):
            seq, f = seqs[i], freqs[i]
            for p in _pairs(tuple(seq)):
                pair_counts[p] -= f
                if pair_counts[p] <= 0:
                    del pair_counts[p]
            merged, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(seq[j])
                    j += 1
            seqs[i] = merged
            for p in _pairs(tuple(merged)):
                pair_counts[p] += f
                where[p].add(i)
    return merges


class Tokenizer:
    """Byte-level BPE with a fixed split pattern; encodes with tiktoken when it is installed."""

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = [tuple(m) for m in merges]
        self.token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self.vocab_size = len(self.token_bytes)
        self._ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        self._cache: dict[str, list[int]] = {}
        self._tiktoken = self._make_tiktoken()

    @classmethod
    def load(cls, data_dir: Path | None = None) -> Tokenizer:
        path = (data_dir or DATA_DIR) / "tokenizer.json"
        if not path.exists():
            sys.exit(f"no dataset at {path.parent}: run `python3 prepare.py` first (see README.md)")
        return cls([tuple(m) for m in json.loads(path.read_text())["merges"]])

    def _make_tiktoken(self) -> Any:
        try:
            import tiktoken
        except ImportError:
            return None
        ranks = {tok: i for i, tok in enumerate(self.token_bytes)}
        return tiktoken.Encoding(name="ratchet-gpt", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={})

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = list(word.encode("utf-8"))
            while len(ids) > 1:
                ranked = [(self._ranks.get(p, math.inf), k) for k, p in enumerate(_pairs(tuple(ids)))]
                rank, k = min(ranked)
                if rank == math.inf:
                    break
                ids[k : k + 2] = [int(rank)]
            self._cache[word] = ids
        return ids

    def encode_python(self, text: str) -> list[int]:
        return [t for w in re.findall(SPLIT_PATTERN, text) for t in self._encode_word(w)]

    def encode(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return self.encode_python(text)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


# ============================================================================================
# Building the dataset (once)
# ============================================================================================


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dataset_ready(data_dir: Path, corpus: Path) -> bool:
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("format_version") == FORMAT_VERSION and meta.get("vocab_size") == VOCAB_SIZE
            and meta.get("corpus_sha256") == _sha256(corpus))


def build_dataset(data_dir: Path, corpus: Path) -> dict[str, Any]:
    """Tokenizer + train/val shards into a fresh directory, then renamed into place."""
    t0 = time.time()
    text = corpus.read_text(encoding="utf-8")
    cut = int(len(text) * (1.0 - VAL_FRACTION))
    train_text, val_text = text[:cut], text[cut:]
    print(f"corpus: {corpus} ({len(text):,} characters)")

    merges = train_bpe(train_text, VOCAB_SIZE)  # the tokenizer never sees the held-out text
    tok = Tokenizer(merges)
    print(f"tokenizer: {tok.vocab_size} tokens trained in {time.time() - t0:.1f}s")
    train_ids = np.asarray(tok.encode(train_text), dtype=np.uint16)
    val_ids = np.asarray(tok.encode(val_text), dtype=np.uint16)
    if tok._tiktoken is not None and tok.encode_python(val_text[:20_000]) != tok.encode(val_text[:20_000]):
        raise RuntimeError("tiktoken and the reference encoder disagree; the tokenizer is broken")
    if tok.decode(val_ids.tolist()) != val_text:
        raise RuntimeError("the tokenizer does not round-trip the held-out text")
    if len(val_ids) < EVAL_TOKENS + 1:
        raise RuntimeError(f"held-out split has {len(val_ids)} tokens, evaluation needs {EVAL_TOKENS + 1}")

    tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(json.dumps(
        {"pattern": SPLIT_PATTERN, "vocab_size": tok.vocab_size, "merges": merges}))
    train_ids.tofile(tmp / "train.bin")
    val_ids.tofile(tmp / "val.bin")
    meta = {
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "corpus": corpus.name,
        "corpus_sha256": _sha256(corpus),
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "bytes_per_token": round(len(text.encode("utf-8")) / (len(train_ids) + len(val_ids)), 3),
        "files": {f: _sha256(tmp / f) for f in ("tokenizer.json", "train.bin", "val.bin")},
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for p in tmp.iterdir():
        p.chmod(0o644)  # readable by the sandbox user whoever built it
    tmp.chmod(0o755)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    tmp.rename(data_dir)
    print(f"dataset: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({meta['bytes_per_token']} bytes/token) in {data_dir}, {time.time() - t0:.1f}s")
    return meta


# ============================================================================================
# Runtime utilities for train.py (torch is imported here, not at module level)
# ============================================================================================


def _load_split(split: str) -> np.ndarray:
    path = DATA_DIR / f"{split}.bin"
    if not path.exists():
        sys.exit(f"no dataset at {DATA_DIR}: run `python3 prepare.py` first (see README.md)")
    return np.fromfile(path, dtype=np.uint16).astype(np.int64)


def cpu_count() -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup's CPU quota.

    A container limited to 1 CPU still sees every core; running a thread per core under the
    quota makes each step slower, not faster.
    """
    n = len(os.sched_getaffinity(0))
    quota, period = -1, 0
    try:  # cgroup v2, then v1
        q, p = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        quota, period = (-1 if q == "max" else int(q)), int(p)
    except (OSError, ValueError):
        try:
            quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota > 0 and period > 0:
        n = min(n, max(1, math.floor(quota / period + 0.5)))
    return n


def make_dataloader(batch: int, seq_len: int, device: Any) -> Iterator[tuple[Any, Any]]:
    """Endless (x, y) batches of `seq_len` training tokens at random offsets, seeded by SEED.

    y is x shifted by one token. Only ever reads the training split.
    """
    import torch

    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise ValueError(f"seq_len must be in [1, {MAX_SEQ_LEN}], got {seq_len}")
    data = torch.from_numpy(_load_split("train"))
    gen = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(seq_len + 1)
    cuda = torch.device(device).type == "cuda"
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        rows = data[starts[:, None] + offsets]
        if cuda:
            rows = rows.pin_memory().to(device, non_blocking=True)
        yield rows[:, :-1], rows[:, 1:]


def evaluate_bpb(model: Any, batch: int, device: Any) -> float:
    """Bits per byte on the first EVAL_TOKENS held-out tokens, in windows of MAX_SEQ_LEN.

    `model(x, y, reduction="none")` must return the cross-entropy in nats of every target token,
    shape (B, T) or (B*T,). Nats are summed and divided by the UTF-8 bytes those targets stand
    for, so the score does not depend on the tokenizer. Non-finite losses give a non-finite score.
    """
    import torch

    tok = Tokenizer.load()
    token_bytes = torch.tensor([len(b) for b in tok.token_bytes], dtype=torch.float64)
    val = torch.from_numpy(_load_split("val")[: EVAL_TOKENS + 1])
    x_all = val[:-1].view(-1, MAX_SEQ_LEN)
    y_all = val[1:].view(-1, MAX_SEQ_LEN)
    total_nats, total_bytes = 0.0, 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x_all), batch):
            x, y = x_all[i : i + batch].to(device), y_all[i : i + batch].to(device)
            loss = model(x, y, reduction="none").reshape(-1).double().cpu()
            if loss.numel() != y.numel():
                raise ValueError(f"model returned {loss.numel()} losses for {y.numel()} targets")
            total_nats += float(loss.sum())
            total_bytes += float(token_bytes[y.reshape(-1).cpu()].sum())
    model.train(was_training)
    return total_nats / (math.log(2.0) * total_bytes)


# ============================================================================================


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the gpt example's dataset (tokenizer + shards).")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR,
                    help=f"where to write it (default: $GPT_DATA_DIR or ~/.cache/ratchet-gpt: {DATA_DIR})")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                    help="UTF-8 text to train on (default: the book of examples/charlm)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the dataset is there")
    args = ap.parse_args(argv)
    if not args.corpus.is_file():
        print(f"error: corpus {args.corpus} not found", file=sys.stderr)
        return 2
    if not args.force and dataset_ready(args.data_dir, args.corpus):
        print(f"dataset already prepared in {args.data_dir} (--force rebuilds it)")
        return 0
    build_dataset(args.data_dir, args.corpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
