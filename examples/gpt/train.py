"""A small GPT trained for a fixed wall-clock budget. This is the file experiments edit.

Decoder-only transformer: token embedding, rotary position embedding, RMSNorm, causal
self-attention, a squared-ReLU MLP, an untied output head with a soft cap on the logits.
AdamW with separate learning rates for embeddings, matrices and the head; the learning rate
holds, then decays linearly to zero over the last WARMDOWN_FRAC of the budget.

On a GPU it trains in bfloat16 under torch.compile; without one it picks the CPU_* sizes
below, small enough for a run of seconds. Data, the time budget, the seed and the score come
from prepare.py. Run: python3 train.py (after `python3 prepare.py`).
"""

# ruff: noqa: E402 - the clock starts before the imports, which take seconds (torch)
from __future__ import annotations

import time

T_PROCESS_START = time.time()  # before the heavy imports: start-up time counts from here

import json
import math
import os
import resource
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from prepare import (
    MAX_SEQ_LEN,
    OUTPUT_DIR,
    SEED,
    TIME_BUDGET_S,
    Tokenizer,
    cpu_count,
    evaluate_bpb,
    make_dataloader,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# --- model (GPU) -------------------------------------------------------------------------
DEPTH = 6  # transformer blocks
MODEL_DIM = 384  # width of the residual stream
HEAD_DIM = 64  # width of one attention head
SEQ_LEN = MAX_SEQ_LEN  # training context (evaluation always uses prepare.MAX_SEQ_LEN)
BATCH_SIZE = 64  # sequences per optimizer step
LOGIT_CAP = 15.0  # logits are squashed into (-cap, cap) with tanh

# --- model (CPU: a tiny configuration, used when there is no GPU) ---------------------------
CPU_DEPTH = 2
CPU_MODEL_DIM = 64
CPU_HEAD_DIM = 32
CPU_BATCH_SIZE = 8

# --- optimisation ------------------------------------------------------------------------
EMBEDDING_LR = 1e-3  # token embedding
MATRIX_LR = 1e-3  # every weight matrix inside the blocks
HEAD_LR = 1e-3  # output head
ADAM_BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.0  # decoupled, on matrices only
WARMDOWN_FRAC = 0.5  # last fraction of the budget over which the learning rate decays to 0
EXCLUDED_STEPS = 2  # first steps (compilation, warm-up) do not count against the budget

# torch.compile: on by default on a GPU, off on a CPU; GPT_COMPILE=1 or 0 overrides.
COMPILE = os.environ.get("GPT_COMPILE", "1" if DEVICE == "cuda" else "0") == "1"
LOG_EVERY_S = 5.0

if DEVICE == "cpu":
    DEPTH, MODEL_DIM, HEAD_DIM, BATCH_SIZE = CPU_DEPTH, CPU_MODEL_DIM, CPU_HEAD_DIM, CPU_BATCH_SIZE


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int
    depth: int
    dim: int
    head_dim: int


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under bf16 autocast q and k stay bf16
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.dim // cfg.head_dim
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)
        q, k = norm(rotary(q, cos, sin)), norm(rotary(k, cos, sin))
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.dim, 4 * cfg.dim, bias=False)
        self.down = nn.Linear(4 * cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Rotary tables for the longest sequence evaluation uses.
        inv_freq = 1.0 / (10000 ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        angles = torch.outer(torch.arange(MAX_SEQ_LEN).float(), inv_freq)
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        bound = 3**0.5 * self.cfg.dim**-0.5
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.head.weight, std=0.001)
        for block in self.blocks:
            nn.init.uniform_(block.attn.qkv.weight, -bound, bound)
            nn.init.uniform_(block.mlp.up.weight, -bound, bound)
            nn.init.zeros_(block.attn.proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.down.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        t = idx.shape[1]
        cos, sin = self.cos[:, :t], self.sin[:, :t]
        x = norm(self.embed(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(norm(x)).float()
        logits = LOGIT_CAP * torch.tanh(logits / LOGIT_CAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss


def make_optimizer(model: GPT) -> torch.optim.Optimizer:
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    groups = [
        {"params": [model.embed.weight], "lr": EMBEDDING_LR, "weight_decay": 0.0},
        {"params": matrices, "lr": MATRIX_LR, "weight_decay": WEIGHT_DECAY},
        {"params": [model.head.weight], "lr": HEAD_LR, "weight_decay": 0.0},
    ]
    fused = DEVICE == "cuda"
    opt = torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=1e-10, fused=fused)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def lr_multiplier(progress: float) -> float:
    if progress < 1.0 - WARMDOWN_FRAC:
        return 1.0
    return max(0.0, (1.0 - progress) / WARMDOWN_FRAC)


def peak_memory_mb() -> float:
    if DEVICE == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS on a CPU


def main() -> None:
    torch.manual_seed(SEED)
    if DEVICE == "cuda":
        torch.cuda.manual_seed(SEED)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(cpu_count())
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if DEVICE == "cuda"
                else nullcontext())

    tokenizer = Tokenizer.load()
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, seq_len=SEQ_LEN, depth=DEPTH, dim=MODEL_DIM,
                    head_dim=HEAD_DIM)
    model = GPT(cfg).to(DEVICE)
    model.init_weights()
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model)
    step_model = torch.compile(model) if COMPILE else model
    loader = make_dataloader(BATCH_SIZE, SEQ_LEN, DEVICE)
    tokens_per_step = BATCH_SIZE * SEQ_LEN
    print(f"device: {DEVICE}  compile: {COMPILE}  threads: {torch.get_num_threads()}  "
          f"params: {num_params / 1e6:.2f}M  depth: {DEPTH}  dim: {MODEL_DIM}  "
          f"batch: {BATCH_SIZE}x{SEQ_LEN}  budget: {TIME_BUDGET_S:g}s", flush=True)

    step, training_s, startup_s, smooth_loss = 0, 0.0, 0.0, 0.0
    last_log = time.time()
    x, y = next(loader)
    while True:
        t0 = time.time()
        progress = min(training_s / TIME_BUDGET_S, 1.0) if TIME_BUDGET_S > 0 else 1.0
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_multiplier(progress)
        with autocast:
            loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        x, y = next(loader)
        loss_f = loss.item()  # waits for the step to finish, so dt is honest
        if not math.isfinite(loss_f) or loss_f > 100:
            print(f"FAIL: loss {loss_f} at step {step}", flush=True)
            raise SystemExit(1)
        dt = time.time() - t0
        if step < EXCLUDED_STEPS:
            if step == 0:
                startup_s = time.time() - T_PROCESS_START
                print(f"first step done {startup_s:.1f}s after start", flush=True)
        else:
            training_s += dt
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_f
        step += 1
        if time.time() - last_log >= LOG_EVERY_S:
            last_log = time.time()
            print(f"step {step:05d} ({100 * progress:.0f}%) | loss {smooth_loss / (1 - 0.9**step):.4f} | "
                  f"dt {dt * 1000:.0f}ms | tok/s {tokens_per_step / dt:,.0f}", flush=True)
        if step >= EXCLUDED_STEPS and training_s >= TIME_BUDGET_S:
            break

    t_eval = time.time()
    with autocast:
        val_bpb = evaluate_bpb(model, BATCH_SIZE, DEVICE)
    total_s = time.time() - T_PROCESS_START
    counted_steps = max(step - EXCLUDED_STEPS, 1)
    tokens_per_s = counted_steps * tokens_per_step / max(training_s, 1e-9)
    summary = {
        "val_bpb": val_bpb,
        "training_seconds": training_s,
        "total_seconds": total_s,
        "startup_seconds": startup_s,
        "eval_seconds": time.time() - t_eval,
        "peak_vram_mb": peak_memory_mb(),
        "tokens_per_second": tokens_per_s,
        "total_tokens_M": step * tokens_per_step / 1e6,
        "num_steps": step,
        "num_params_M": num_params / 1e6,
        "depth": DEPTH,
    }
    print("---")
    for key, value in summary.items():
        fmt = ".6f" if key == "val_bpb" else (".0f" if key in ("num_steps", "depth") else ".2f")
        print(f"{key + ':':<19}{value:{fmt}}")
    print(f"{'device:':<19}{DEVICE}")
    if OUTPUT_DIR:
        metrics = {k: (v if math.isfinite(v) else None) for k, v in summary.items()}
        with open(os.path.join(OUTPUT_DIR, "metrics.json"), "w") as f:
            json.dump(metrics, f)


if __name__ == "__main__":
    main()
