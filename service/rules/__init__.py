"""Pure rules: keep or discard, acceptance under noise, patches, metric extraction, ledger rows, the
chart, the evaluation phase's workspace, uploaded workspaces. No I/O, no clock: unit-tested alone."""
