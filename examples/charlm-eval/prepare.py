"""Read-only harness for the charlm example: run settings, data and evaluation.

train.py imports from here; it may not be edited by experiments. Everything that
decides the score lives in this file, so a change to train.py can make the model
better or worse but cannot change what "better" means.

Public interface:
    TIME_BUDGET_S, SEED, OUTPUT_DIR   run settings taken from the environment
    VOCAB_SIZE, MAX_CONTEXT           byte vocabulary and the longest usable context
    sample_windows(rng, batch, length) -> int64 array (batch, length + 1), training text only
    evaluate_bpb(predict_logits, context_len) -> validation bits per byte
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

# --- run settings (set by the service; defaults make a hand run work) -------------
TIME_BUDGET_S: float = float(os.environ.get("RATCHET_TIME_BUDGET_S", "15"))
SEED: int = int(os.environ.get("RATCHET_SEED", "0"))
OUTPUT_DIR: str | None = os.environ.get("RATCHET_OUTPUT_DIR") or None

# --- data ---------------------------------------------------------------------------
CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"
VOCAB_SIZE = 256  # raw bytes: no tokenizer, and bits per byte needs no conversion
MAX_CONTEXT = 64  # longest context evaluate_bpb will hand to a model
VAL_FRACTION = 0.1  # the last 10% of the book is held out
EVAL_BYTES = 32_768  # fixed number of held-out bytes that are scored
EVAL_CHUNK = 4_096  # contexts per predict_logits call; bounds evaluation memory


def _load_splits() -> tuple[np.ndarray, np.ndarray]:
    data = np.frombuffer(CORPUS_PATH.read_bytes(), dtype=np.uint8)
    cut = int(len(data) * (1.0 - VAL_FRACTION))
    return data[:cut], data[cut:]


_TRAIN, _VAL = _load_splits()
if len(_VAL) < MAX_CONTEXT + EVAL_BYTES:
    raise RuntimeError("validation split is smaller than the evaluation budget")


def sample_windows(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Random windows of `length + 1` consecutive training bytes, shape (batch, length + 1).

    The last column is the byte to predict from the ones before it; a sequence
    model can use window[:, :-1] as input and window[:, 1:] as targets.
    """
    if not 1 <= length < len(_TRAIN):
        raise ValueError(f"window length must be in [1, {len(_TRAIN) - 1}], got {length}")
    starts = rng.integers(0, len(_TRAIN) - length, size=batch)
    return _TRAIN[starts[:, None] + np.arange(length + 1)].astype(np.int64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def evaluate_bpb(predict_logits: Callable[[np.ndarray], np.ndarray], context_len: int) -> float:
    """Bits per byte of the model on the first EVAL_BYTES bytes of the held-out text.

    predict_logits gets an int64 array (n, context_len) of the bytes preceding each
    target and returns scores of shape (n, VOCAB_SIZE). The scores are treated as
    logits and normalised here, so the result is always a proper probability
    distribution. The scored bytes are the same for every context length: each
    target has MAX_CONTEXT held-out bytes before it, of which the model sees the
    last context_len. Non-finite scores give a non-finite result.
    """
    if not 1 <= context_len <= MAX_CONTEXT:
        raise ValueError(f"context_len must be in [1, {MAX_CONTEXT}], got {context_len}")
    text = _VAL[: MAX_CONTEXT + EVAL_BYTES].astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(text, context_len)
    first = MAX_CONTEXT - context_len  # window i is followed by target text[i + context_len]
    total_nats = 0.0
    for start in range(0, EVAL_BYTES, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, EVAL_BYTES)
        contexts = np.ascontiguousarray(windows[first + start : first + stop])
        targets = text[MAX_CONTEXT + start : MAX_CONTEXT + stop]
        logits = np.asarray(predict_logits(contexts), dtype=np.float64)
        if logits.shape != (stop - start, VOCAB_SIZE):
            raise ValueError(
                f"predict_logits returned shape {logits.shape}, expected {(stop - start, VOCAB_SIZE)}"
            )
        logp = _log_softmax(logits)
        total_nats -= float(logp[np.arange(stop - start), targets].sum())
    return total_nats / (EVAL_BYTES * math.log(2.0))
