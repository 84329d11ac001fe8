"""The Ratchet service, in layers (each imports only those below it):

    http/    the app, controllers, pages, auth, live-log streaming
    runs/    scheduler, executors (the only door to the engine), what a run is, run logs
    state/   SQLite store, the state machine, snapshots, tokens, integrity, history, intake
    rules/   pure logic: decisions, acceptance, patches, extraction, ledger rows, chart

Beside them: `models` (the one schema), `settings`, `metrics`, `faults` and `cli`. The container
itself is `sandbox`'s, which knows nothing of this package; the `client` package never imports it.
"""
