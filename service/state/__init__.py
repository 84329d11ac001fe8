"""What the service remembers: the SQLite store and the experiment state machine (every status
change one guarded write), content-addressed snapshots, tokens, the start-up integrity check, git
history bundles, and the intake that turns request bodies into stored loops and queued experiments."""
