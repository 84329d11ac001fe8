"""Trusted evaluation for charlm-eval: scores the parameters training saved on held-out text.

Not editable by experiments, and it never imports train.py: the model's forward pass is
defined here, and its sizes are read from the checkpoint's shapes. The held-out text is
mounted at /heldout for this phase only; the training container never sees it.
"""

from __future__ import annotations

import math
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
MAX_CONTEXT = 64
EVAL_BYTES = 32_768
EVAL_CHUNK = 4_096
MAX_CHECKPOINT_BYTES = 64 * 1024 * 1024
HELDOUT = os.environ.get("RATCHET_HELDOUT", "/heldout/valid.txt")
NAMES = ("emb", "w1", "b1", "w2", "b2")


def fail(why: str) -> None:
    print(f"evaluation refused: {why}", file=sys.stderr)
    sys.exit(1)


def load_params() -> dict[str, np.ndarray]:
    path = os.path.join(os.environ["RATCHET_TRAIN_OUTPUT_DIR"], "params.npz")
    if not os.path.isfile(path):
        fail("no params.npz in the training output")
    if os.path.getsize(path) > MAX_CHECKPOINT_BYTES:
        fail(f"params.npz is larger than {MAX_CHECKPOINT_BYTES} bytes")
    try:
        with np.load(path, allow_pickle=False) as z:
            if sorted(z.files) != sorted(NAMES):
                fail(f"params.npz holds {sorted(z.files)}, expected {sorted(NAMES)}")
            params = {k: np.asarray(z[k]) for k in NAMES}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        fail(f"params.npz is unreadable: {exc}")
    for k, v in params.items():
        if v.dtype != np.float32:
            fail(f"{k} has dtype {v.dtype}, expected float32")
        if not np.isfinite(v).all():
            fail(f"{k} holds non-finite values")
    emb, w1, b1, w2, b2 = (params[k] for k in NAMES)
    if emb.ndim != 2 or emb.shape[0] != VOCAB_SIZE or emb.shape[1] < 1:
        fail(f"emb has shape {emb.shape}")
    embed = emb.shape[1]
    if w1.ndim != 2 or w1.shape[0] % embed or not 1 <= w1.shape[0] // embed <= MAX_CONTEXT:
        fail(f"w1 has shape {w1.shape}")
    hidden = w1.shape[1]
    if b1.shape != (hidden,) or w2.shape != (hidden, VOCAB_SIZE) or b2.shape != (VOCAB_SIZE,):
        fail("b1, w2 or b2 do not match w1's shape")
    return params


def bpb(params: dict[str, np.ndarray], text: np.ndarray) -> float:
    context_len = params["w1"].shape[0] // params["emb"].shape[1]
    windows = np.lib.stride_tricks.sliding_window_view(text, context_len)
    first = MAX_CONTEXT - context_len
    total = 0.0
    for start in range(0, EVAL_BYTES, EVAL_CHUNK):
        stop = min(start + EVAL_CHUNK, EVAL_BYTES)
        x = windows[first + start : first + stop]
        e = params["emb"][x].reshape(len(x), -1).astype(np.float64)
        h = np.tanh(e @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        logits = logits - logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(logp[np.arange(stop - start), text[MAX_CONTEXT + start : MAX_CONTEXT + stop]].sum())
    return total / (EVAL_BYTES * math.log(2.0))


def main() -> None:
    params = load_params()
    text = np.frombuffer(Path(HELDOUT).read_bytes(), dtype=np.uint8).astype(np.int64)
    if len(text) < MAX_CONTEXT + EVAL_BYTES:
        fail("the held-out text is too short")
    value = bpb(params, text)
    print("---")
    print(f"val_bpb: {value:.6f}")


if __name__ == "__main__":
    main()
