"""Ratchet service: API, store, scheduler, decisions, metrics and CLI. Uses `sandbox`, never the reverse."""
