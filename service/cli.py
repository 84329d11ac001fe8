"""`ratchet` command line: `ratchet serve` runs the service."""

from __future__ import annotations

import argparse
import logging
import sys

from .settings import Settings, SettingsError, load_settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="ratchet", description="Autoresearch loops as a service.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service (SQLite + the local container engine)")
    serve.add_argument("--host", help=f"bind address (default {defaults.host}; env RATCHET_HOST)")
    serve.add_argument("--port", type=int, help=f"port (default {defaults.port}; env RATCHET_PORT)")
    serve.add_argument("--data-dir", help=f"database, snapshots and logs (default {defaults.data_dir})")
    serve.add_argument("--slots", type=int, help="concurrent experiments (default: one per GPU, else 1)")
    serve.add_argument("--gpus", help="comma-separated GPU ids to use (default: detect with nvidia-smi)")
    serve.add_argument("--runtime", choices=["runc", "runsc"], help="default container runtime")
    serve.add_argument(
        "--image", dest="default_image", help=f"default image (default {defaults.default_image})"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        from .app import VERSION

        print(f"ratchet {VERSION}")
        return 0
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    if flags.get("gpus") is not None:
        flags["gpus"] = [g.strip() for g in flags["gpus"].split(",") if g.strip()]
    try:
        settings = load_settings(flags)
    except SettingsError as exc:
        print(f"ratchet: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
