"""Byte-level language model in pure NumPy, trained for a fixed wall-clock budget.

This is the file experiments edit. The model reads the previous CONTEXT_LEN bytes,
embeds each one, concatenates the embeddings, passes them through one tanh hidden
layer and predicts the next byte. Gradients are written out by hand; Adam updates
the weights. Data, the time budget, the seed and the score come from prepare.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import numpy as np
from prepare import OUTPUT_DIR, SEED, TIME_BUDGET_S, VOCAB_SIZE, evaluate_bpb, sample_windows

# --- model --------------------------------------------------------------------------
CONTEXT_LEN = 8  # bytes of history the model sees (at most prepare.MAX_CONTEXT)
EMBED_DIM = 8  # size of each byte embedding
HIDDEN_DIM = 128  # width of the tanh hidden layer
INIT_SCALE = 1.0  # multiplies the 1/sqrt(fan_in) initialisation of every matrix

# --- optimisation -------------------------------------------------------------------
BATCH_SIZE = 64  # windows per optimizer step
LEARNING_RATE = 1e-3  # peak Adam step size
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.99
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.0  # decoupled (AdamW-style), applied to matrices only
WARMDOWN_FRAC = 0.2  # last fraction of the budget over which the LR decays to zero

LOG_EVERY_S = 2.0  # seconds between progress lines

Params = dict[str, np.ndarray]
MatMul = Callable[[np.ndarray, np.ndarray], np.ndarray]


def blas_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a @ b


def einsum_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # einsum's inner loop is slow when b is a transposed view, so copy it first.
    return np.einsum("ij,jk->ik", a, np.ascontiguousarray(b))


def pick_matmul() -> MatMul:
    """Whichever of `a @ b` and np.einsum multiplies matrices of our sizes faster.

    `@` goes to the BLAS NumPy is linked with. An optimised BLAS (OpenBLAS) wins by
    far; Debian's default reference BLAS is several times slower than einsum's own
    vectorised loops. Both compute the same product up to float rounding.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((BATCH_SIZE, HIDDEN_DIM)).astype(np.float32)
    b = rng.standard_normal((HIDDEN_DIM, VOCAB_SIZE)).astype(np.float32)

    def cost(mm: MatMul) -> float:
        mm(a, b)  # warm up
        start = time.perf_counter()
        for _ in range(10):
            mm(a, b)
        return time.perf_counter() - start

    return min((blas_matmul, einsum_matmul), key=cost)


matmul = pick_matmul()  # chosen once at start-up, outside the timed budget


def init_params(rng: np.random.Generator) -> Params:
    fan_in = CONTEXT_LEN * EMBED_DIM

    def matrix(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale * INIT_SCALE).astype(np.float32)

    return {
        "emb": matrix(VOCAB_SIZE, EMBED_DIM, 1.0),
        "w1": matrix(fan_in, HIDDEN_DIM, 1.0 / math.sqrt(fan_in)),
        "b1": np.zeros(HIDDEN_DIM, dtype=np.float32),
        "w2": matrix(HIDDEN_DIM, VOCAB_SIZE, 1.0 / math.sqrt(HIDDEN_DIM)),
        "b2": np.zeros(VOCAB_SIZE, dtype=np.float32),
    }


def forward(p: Params, x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Logits (n, VOCAB_SIZE) for contexts x (n, CONTEXT_LEN), plus what backward needs."""
    e = p["emb"][x].reshape(len(x), -1)
    h = np.tanh(matmul(e, p["w1"]) + p["b1"])
    logits = matmul(h, p["w2"]) + p["b2"]
    return logits, (x, e, h)


def scatter_rows(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Sum rows (..., EMBED_DIM) into a (VOCAB_SIZE, EMBED_DIM) table at idx (...).

    One bincount over flattened (byte, column) slots: far cheaper than np.add.at or
    a one-hot matrix product, and exact.
    """
    slots = idx.reshape(-1, 1) * EMBED_DIM + np.arange(EMBED_DIM)
    table = np.bincount(slots.ravel(), weights=rows.reshape(-1), minlength=VOCAB_SIZE * EMBED_DIM)
    return table.reshape(VOCAB_SIZE, EMBED_DIM).astype(np.float32)


def loss_and_grads(p: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    """Mean cross-entropy (nats) of predicting y from x, and its gradients."""
    logits, (x, e, h) = forward(p, x)
    n = len(y)
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    loss = -float(np.log(probs[np.arange(n), y] + 1e-12).mean())

    d_logits = probs
    d_logits[np.arange(n), y] -= 1.0
    d_logits /= n
    d_h = matmul(d_logits, p["w2"].T)
    d_pre = d_h * (1.0 - h * h)
    d_e = matmul(d_pre, p["w1"].T)
    grads = {
        "emb": scatter_rows(x, d_e.reshape(n, CONTEXT_LEN, EMBED_DIM)),
        "w1": matmul(e.T, d_pre),
        "b1": d_pre.sum(axis=0),
        "w2": matmul(h.T, d_logits),
        "b2": d_logits.sum(axis=0),
    }
    return loss, grads


class Adam:
    def __init__(self, params: Params) -> None:
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params: Params, grads: Params, lr: float) -> None:
        self.t += 1
        c1 = 1.0 - ADAM_BETA1**self.t
        c2 = 1.0 - ADAM_BETA2**self.t
        for k, g in grads.items():
            m, v = self.m[k], self.v[k]
            m *= ADAM_BETA1
            m += (1.0 - ADAM_BETA1) * g
            v *= ADAM_BETA2
            v += (1.0 - ADAM_BETA2) * g * g
            if WEIGHT_DECAY and params[k].ndim == 2:
                params[k] *= 1.0 - lr * WEIGHT_DECAY
            params[k] -= (lr / c1) * m / (np.sqrt(v / c2) + ADAM_EPS)


def lr_at(progress: float) -> float:
    """Constant LR, then a linear decay to zero over the last WARMDOWN_FRAC of the budget."""
    if WARMDOWN_FRAC <= 0.0 or progress < 1.0 - WARMDOWN_FRAC:
        return LEARNING_RATE
    return LEARNING_RATE * max(0.0, (1.0 - progress) / WARMDOWN_FRAC)


def train(params: Params, rng: np.random.Generator) -> tuple[int, float]:
    """Train until the time budget is spent; returns (steps, training seconds)."""
    opt = Adam(params)
    start = last_log = time.perf_counter()
    steps, smooth_loss = 0, float("nan")
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= TIME_BUDGET_S:
            break
        window = sample_windows(rng, BATCH_SIZE, CONTEXT_LEN)
        loss, grads = loss_and_grads(params, window[:, :-1], window[:, -1])
        opt.step(params, grads, lr_at(elapsed / TIME_BUDGET_S))
        steps += 1
        smooth_loss = loss if steps == 1 else 0.98 * smooth_loss + 0.02 * loss
        if time.perf_counter() - last_log >= LOG_EVERY_S:
            last_log = time.perf_counter()
            print(
                f"step {steps:6d} | {elapsed:5.1f}s | train loss {smooth_loss / math.log(2):.4f} bits/byte",
                flush=True,
            )
    if OUTPUT_DIR and os.environ.get("CHARLM_SAVE_PARAMS"):  # charlm-eval: evaluate.py scores them
        np.savez(os.path.join(OUTPUT_DIR, "params.npz"), **params)
    return steps, time.perf_counter() - start


def report(val_bpb: float, seconds: float, steps: int, num_params: int) -> None:
    """Print the summary block and, when the service asks for it, write metrics.json."""
    print("---")
    print(f"val_bpb: {val_bpb:.6f}")
    print(f"training_seconds: {seconds:.1f}")
    print(f"num_steps: {steps}")
    print(f"num_params: {num_params}")
    if OUTPUT_DIR:
        metrics = {"val_bpb": val_bpb if math.isfinite(val_bpb) else None, "num_steps": steps}
        with open(os.path.join(OUTPUT_DIR, "metrics.json"), "w") as f:
            json.dump(metrics, f)


def main() -> None:
    rng = np.random.default_rng(SEED)
    params = init_params(rng)
    num_params = sum(v.size for v in params.values())
    print(
        f"params: {num_params} | budget: {TIME_BUDGET_S:.1f}s | seed: {SEED} | {matmul.__name__}",
        flush=True,
    )
    steps, seconds = train(params, rng)
    val_bpb = evaluate_bpb(lambda x: forward(params, x)[0], CONTEXT_LEN)
    report(val_bpb, seconds, steps, num_params)


if __name__ == "__main__":
    main()
