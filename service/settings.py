"""Service settings: one frozen Struct, built in one place from flags and `RATCHET_*` variables."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = ["Settings", "SettingsError", "llm_api_key", "llm_key_refusal", "load_settings", "parse_datasets"]

ENV_PREFIX = "RATCHET_"
_LIST_FIELDS = ("gpus", "llm_key_envs")  # comma-separated in the environment
_KEY_NAME = re.compile(r"^[A-Z][A-Z0-9_]*_API_KEY$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VOLUME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SettingsError(ValueError):
    pass


class Settings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    data_dir: str = "./data"
    # Concurrent experiments. Default: one per GPU slot on GPU hosts, else 1.
    slots: Annotated[int, Meta(ge=1, le=1024)] | None = None
    # GPU device ids to use; None detects them with nvidia-smi, [] means none.
    gpus: list[str] | None = None
    gpus_per_slot: Annotated[int, Meta(ge=1, le=64)] = 1
    # Queued experiments prepared ahead per slot, held behind their gates (0: none).
    prepare_ahead: Annotated[int, Meta(ge=0, le=16)] = 1
    default_image: str = "ratchet/sandbox:latest"
    runtime: Literal["runc", "runsc"] = "runc"
    log_bytes: Annotated[int, Meta(ge=4096, le=1024**3)] = 4 * 1024 * 1024
    log_tail_bytes: Annotated[int, Meta(ge=0, le=1024**2)] = 4096
    max_body_bytes: Annotated[int, Meta(ge=1024, le=1024**3)] = 16 * 1024 * 1024
    max_workspace_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024 * 1024
    max_workspace_files: Annotated[int, Meta(ge=1)] = 2000
    # Largest page of GET /v1/loops/{id}/experiments (`limit`); clients page with `next_after`.
    max_page_size: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    # "none": every caller may do everything; "tokens": bearer tokens with scopes.
    # Default (None): "none" when bound to a loopback address, else "tokens".
    auth: Literal["none", "tokens"] | None = None
    # Opt-in to auth "none" on a non-loopback address: anyone who reaches the port can run code.
    auth_none_on_network: bool = False
    admin_token: Annotated[str, Meta(min_length=16, max_length=512)] | None = None  # bootstrap admin
    metrics_auth: bool = False  # True: /metrics needs a token with the read scope
    instance: str | None = None  # labels this service's containers; default: kept in the data dir
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # An experiment whose run the container engine broke is queued again this many times, after
    # engine_backoff_s, then twice that, and so on; after that it ends as `error`.
    engine_retries: Annotated[int, Meta(ge=0, le=100)] = 3
    engine_backoff_s: Annotated[float, Meta(ge=0, le=3600)] = 5.0
    # At start, take over the runs a previous process of this data dir left alive (they go on,
    # judged once, on their original deadline) instead of removing them and running them again.
    reattach: bool = True
    # A stop (SIGTERM, Ctrl-C) leaves training runs under way running, for the next start to take
    # over (an upgrade loses no GPU time); off: they are stopped and run again after the next start.
    detach_on_stop: bool = False
    # Start-up check of the snapshot blobs: "exists" (every referenced blob is there), "best" (and
    # each loop's best and root snapshot hash right), "all" (every blob hashed), "off".
    verify_blobs: Literal["off", "exists", "best", "all"] = "best"
    # Where experiments run: "local", this machine's Docker engine; "ray", the nodes of the Ray
    # cluster at ray_address (each with its own engine; see README "Scale-out").
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # host:port of the cluster's GCS, e.g. 10.0.0.5:6379
    ray_token_file: str | None = None  # the cluster's auth token (default: Ray's RAY_AUTH_TOKEN*)
    # "token": join only with a token, and only nodes that require one; "none": a cluster without
    # token authentication (anyone who reaches it runs code on every node).
    ray_auth: Literal["token", "none"] = "token"
    ray_cpu_slots: Annotated[int, Meta(ge=0, le=1024)] = 1  # slots of a node without GPUs
    fault_point: str | None = None  # tests only: see service/faults.py
    # One log line per HTTP request costs more than many a request itself; /metrics counts them.
    access_log: bool = False
    # Proposer runs at once across all loops (they hold no experiment slot and no GPU).
    proposer_runs: Annotated[int, Meta(ge=1, le=256)] = 4
    # The engine network a command proposer's allow-listing proxy reaches its endpoints through.
    proposer_network: str = "bridge"
    proposer_proxy_image: str | None = None  # needs python3; default: default_image
    # Environment variables of this service a loop may name as an llm proposer's api_key_env.
    # None: any NAME_API_KEY that does not start with RATCHET_.
    llm_key_envs: list[str] | None = None
    llm_backoff_s: Annotated[float, Meta(ge=0, le=600)] = 1.0  # first retry's wait, doubling
    # -- operations (README "Operating it") --
    admin_token_file: str | None = None  # the bootstrap admin token read from a file (a compose secret)
    # Browser logins (/login): how long a session lasts, and whether its cookie is Secure: "auto"
    # marks it Secure unless the page was asked for over plain http from a loopback host name.
    session_max_age_s: Annotated[int, Meta(ge=60, le=90 * 24 * 3600)] = 12 * 3600
    cookie_secure: Literal["auto", "true", "false"] = "auto"
    # A service-wide webhook (every loop's events) and the policy for every webhook's destination.
    webhook_url: Annotated[str, Meta(max_length=2048)] | None = None
    webhook_secret: Annotated[str, Meta(min_length=16, max_length=256)] | None = None
    webhook_events: str | None = None  # comma-separated; default: every event
    webhook_streak: Annotated[int, Meta(ge=1, le=1000)] = 3
    webhook_allow: str | None = None  # hosts and CIDRs a webhook may reach besides public addresses
    webhook_allow_public: bool = True  # False: only the allow-list (and RATCHET_WEBHOOK_URL's host)
    webhook_backoff_s: Annotated[float, Meta(ge=0.01, le=3600)] = 10.0
    webhook_attempts: Annotated[int, Meta(ge=1, le=100)] = 10
    webhook_timeout_s: Annotated[float, Meta(gt=0, le=300)] = 10.0
    # -- data (README "Datasets", "Caches") --
    # Read-only data loops may name (`--dataset NAME=PATH`): name -> absolute host path, or
    # "volume:VOLUME" for a named volume of the engine. Loops see names only, never the paths.
    datasets: dict[str, str] = {}
    # Largest cache kept per loop (compile caches, downloads), in MiB; 0: no caches at all.
    cache_max_mb: Annotated[int, Meta(ge=0, le=1024 * 1024)] = 1024

    def with_overrides(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)


# Compose passes `${VAR:-}` through as an empty string: for these, empty means not set.
_EMPTY_IS_UNSET = frozenset(
    {"admin_token", "admin_token_file", "webhook_url", "webhook_secret", "webhook_events", "webhook_allow"}
)


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for field in Settings.__struct_fields__:
        key = ENV_PREFIX + field.upper()
        if key in environ:
            value: Any = environ[key]
            if field in _EMPTY_IS_UNSET and not value.strip():
                continue
            if field in _LIST_FIELDS:
                value = [g.strip() for g in value.split(",") if g.strip()]
            if field == "datasets":
                value = parse_datasets(value.split(","), key)
            raw[field] = value
    return raw


def parse_datasets(items: Iterable[str], where: str = "--dataset") -> dict[str, str]:
    """`NAME=PATH` or `NAME=volume:VOLUME` items -> {name: source}; a relative PATH is taken from
    the current directory. Fails naming `where` (the flag or variable) and the bad item."""
    found: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, eq, source = item.partition("=")
        name, source = name.strip(), source.strip()
        problem = None
        if not eq or not source:
            problem = "expected NAME=PATH or NAME=volume:VOLUME"
        elif not _DATASET_NAME.match(name):
            problem = "a name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        elif name in found:
            problem = f"{name!r} is declared twice"
        elif source.startswith("volume:") and not _VOLUME.match(source[len("volume:") :]):
            problem = "not a volume name"
        if problem:
            raise SettingsError(f"invalid dataset {item!r} ({where}): {problem}")
        found[name] = source if source.startswith("volume:") else os.path.abspath(source)
    return found


def load_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over the environment; a malformed value fails here, naming its key."""
    raw = _from_env(os.environ if environ is None else environ)
    raw.update({k: v for k, v in (flags or {}).items() if v is not None})
    if raw.get("admin_token_file") and not raw.get("admin_token"):
        raw["admin_token"] = _read_secret(str(raw["admin_token_file"]), "admin_token_file")
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid setting: {exc} (flags, or {ENV_PREFIX}<NAME> variables)") from exc


def llm_key_refusal(settings: Settings, name: str) -> str | None:
    """Why a loop may not use the service's variable `name` as its chat API key (None: it may).
    A loop's owner picks the endpoint the key is sent to, so only variables meant as API keys are
    handed out, never the service's own settings or secrets."""
    allowed = settings.llm_key_envs
    if allowed is not None and name not in allowed:
        return f"api_key_env {name!r} is not among RATCHET_LLM_KEY_ENVS ({', '.join(allowed) or 'none'})"
    if allowed is None and (name.startswith(ENV_PREFIX) or not _KEY_NAME.match(name)):
        return (
            f"api_key_env {name!r} must be an upper-case NAME_API_KEY that does not start with"
            " RATCHET_ (or be listed in RATCHET_LLM_KEY_ENVS)"
        )
    return None


def llm_api_key(settings: Settings, name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of the service's environment variable `name`, if a loop may use it as a key."""
    if llm_key_refusal(settings, name) is not None:
        return None
    return (os.environ if environ is None else environ).get(name) or None


def _read_secret(path: str, field: str) -> str:
    """A secret kept in a file (a compose or Kubernetes secret): its text without the line end."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError as exc:
        raise SettingsError(f"{ENV_PREFIX}{field.upper()}: cannot read {path} ({exc.strerror})") from exc
