"""A loop's cache without poisoning: who may fill it, and what every run is told about it. Pure.

Each run has a cache directory of its own (the sandbox's CACHE_DIR, on exec storage) holding a
private writable copy of the loop's cache. Only a trusted run fills the loop's cache: a run of the
loop's root snapshot (the unmodified baseline the loop's creator sent; never a candidate), while
the loop has none. Whatever any other run writes into its copy is thrown away with the run.

The environment points the libraries that keep caches into that directory, and switches off
those that would download (runs have no network: they fail at once instead of waiting)."""

from __future__ import annotations

from ..models import ExperimentView, LoopView

__all__ = ["OFFLINE_ENV", "cache_env", "fills_cache"]

# Libraries that would reach the network: say so at once, or stay local.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "offline",
    "PIP_NO_INDEX": "1",
}


def cache_env(cache_dir: str) -> dict[str, str]:
    """Where the usual caches go: all under the run's cache directory, so the baseline's fill
    carries them to later runs. torch.compile's reusable state is the whole inductor directory,
    Triton's kernels inside it (as the ratchet/torch image arranges)."""
    inductor = f"{cache_dir}/torchinductor"
    return {
        "XDG_CACHE_HOME": cache_dir,
        "TORCHINDUCTOR_CACHE_DIR": inductor,
        "TRITON_CACHE_DIR": f"{inductor}/triton",
        "TRITON_HOME": cache_dir,
        "TORCH_HOME": f"{cache_dir}/torch",
        "HF_HOME": f"{cache_dir}/huggingface",
        "CUDA_CACHE_PATH": f"{cache_dir}/nv",
        "TIKTOKEN_CACHE_DIR": f"{cache_dir}/tiktoken",
        "JAX_COMPILATION_CACHE_DIR": f"{cache_dir}/jax",
    }


def fills_cache(exp: ExperimentView, loop: LoopView, enabled: bool) -> bool:
    """Whether this run's cache directory becomes the loop's cache when it succeeds: a run of the
    unmodified baseline while the loop has no cache (another run may still get there first)."""
    return enabled and loop.cache is None and exp.kind == "baseline" and exp.snapshot == loop.root_snapshot
