"""Versioned schema. Each migration runs once, in order, inside one transaction; never edit one
that has shipped — add the next."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: loops, content-addressed snapshots, experiments
    """
    CREATE TABLE loops (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        config TEXT NOT NULL,
        state TEXT NOT NULL,
        baseline TEXT NOT NULL DEFAULT 'pending',
        baseline_reason TEXT,
        root_snapshot TEXT NOT NULL REFERENCES snapshots(id),
        best_snapshot TEXT REFERENCES snapshots(id),
        best_metric REAL,
        best_experiment TEXT,
        next_seq INTEGER NOT NULL DEFAULT 1,
        finished INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE INDEX loops_name ON loops(name);
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        manifest TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE experiments (
        id TEXT PRIMARY KEY,
        loop_id TEXT NOT NULL REFERENCES loops(id),
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        description TEXT NOT NULL,
        parent TEXT REFERENCES snapshots(id),
        snapshot TEXT NOT NULL REFERENCES snapshots(id),
        diff TEXT,
        status TEXT NOT NULL,
        reason TEXT,
        metric REAL,
        metrics TEXT,
        memory_gb REAL,
        exit_code INTEGER,
        gpus TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        finish_seq INTEGER,
        workload_seconds REAL,
        log_tail TEXT,
        UNIQUE (loop_id, seq)
    );
    CREATE INDEX experiments_loop_status ON experiments(loop_id, status, seq);
    CREATE INDEX experiments_ledger ON experiments(loop_id, finish_seq) WHERE finish_seq IS NOT NULL;
    CREATE INDEX experiments_queued ON experiments(loop_id, seq) WHERE status = 'queued';
    CREATE INDEX experiments_running ON experiments(status) WHERE status = 'running';
    """,
    # 2: re-runs of an experiment's snapshot, optionally with a seed for the workload
    """
    ALTER TABLE experiments ADD COLUMN rerun_of TEXT REFERENCES experiments(id);
    ALTER TABLE experiments ADD COLUMN seed INTEGER;
    """,
    # 3: noise-aware acceptance: repeat runs of a candidate, its mean, the loop's measured noise
    """
    ALTER TABLE experiments ADD COLUMN repeat_of TEXT REFERENCES experiments(id);
    ALTER TABLE experiments ADD COLUMN runs INTEGER;
    ALTER TABLE experiments ADD COLUMN mean REAL;
    ALTER TABLE experiments ADD COLUMN m2 REAL;
    ALTER TABLE loops ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE loops ADD COLUMN noise_ss REAL NOT NULL DEFAULT 0;
    ALTER TABLE loops ADD COLUMN noise_dof INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE loops ADD COLUMN noise_sd REAL;
    CREATE INDEX experiments_repeats ON experiments(repeat_of) WHERE repeat_of IS NOT NULL;
    """,
    # 4: API tokens: only the SHA-256 of each secret is stored
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        scopes TEXT NOT NULL,
        loops TEXT,
        created_at REAL NOT NULL,
        last_used_at REAL
    );
    """,
    # 5: how many times an experiment was started, and when a retried one may start again
    """
    ALTER TABLE experiments ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE experiments ADD COLUMN not_before REAL;
    UPDATE experiments SET attempts = 1 WHERE started_at IS NOT NULL;
    """,
    # 6: counts per status kept by triggers, so a loop's summary does not scan its experiments; and a
    # revision that moves whenever a row already in the ledger changes, which lets the service
    # cache the ledger of a loop and only append what finished since
    """
    CREATE TABLE loop_counts (
        loop_id TEXT NOT NULL,
        status TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (loop_id, status)
    ) WITHOUT ROWID;
    INSERT INTO loop_counts (loop_id, status, n)
        SELECT loop_id, status, COUNT(*) FROM experiments GROUP BY loop_id, status;
    CREATE TRIGGER loop_counts_insert AFTER INSERT ON experiments BEGIN
        INSERT INTO loop_counts (loop_id, status, n) VALUES (NEW.loop_id, NEW.status, 1)
            ON CONFLICT (loop_id, status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER loop_counts_update AFTER UPDATE OF status, loop_id ON experiments
    WHEN OLD.status IS NOT NEW.status OR OLD.loop_id IS NOT NEW.loop_id BEGIN
        UPDATE loop_counts SET n = n - 1 WHERE loop_id = OLD.loop_id AND status = OLD.status;
        INSERT INTO loop_counts (loop_id, status, n) VALUES (NEW.loop_id, NEW.status, 1)
            ON CONFLICT (loop_id, status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER loop_counts_delete AFTER DELETE ON experiments BEGIN
        UPDATE loop_counts SET n = n - 1 WHERE loop_id = OLD.loop_id AND status = OLD.status;
    END;
    ALTER TABLE loops ADD COLUMN ledger_rev INTEGER NOT NULL DEFAULT 0;
    CREATE TRIGGER ledger_rows_changed
    AFTER UPDATE OF loop_id, snapshot, description, status, metric, mean, memory_gb, finish_seq ON experiments
    WHEN OLD.finish_seq IS NOT NULL BEGIN
        UPDATE loops SET ledger_rev = ledger_rev + 1 WHERE id IN (OLD.loop_id, NEW.loop_id);
    END;
    CREATE TRIGGER ledger_rows_deleted AFTER DELETE ON experiments WHEN OLD.finish_seq IS NOT NULL BEGIN
        UPDATE loops SET ledger_rev = ledger_rev + 1 WHERE id = OLD.loop_id;
    END;
    """,
    # 7: a loop's queue in the order it runs (repeat runs first, then by number), so the next few
    # experiments of a loop are read without touching the rest of its queue
    """
    CREATE INDEX experiments_queue_order ON experiments(loop_id, repeat_of IS NULL, seq)
        WHERE status = 'queued';
    """,
    # webhooks: where (loop_id NULL: the service-wide one), the persisted deliveries (one per
    # webhook and dedupe key), and per loop the last result already turned into events (loops that
    # exist now start from what they have, so an upgrade announces nothing old)
    """
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        loop_id TEXT REFERENCES loops(id),
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        events TEXT NOT NULL,
        streak INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX webhooks_loop ON webhooks(loop_id);
    CREATE TABLE webhook_deliveries (
        id TEXT PRIMARY KEY,
        webhook_id TEXT NOT NULL,
        loop_id TEXT,
        event TEXT NOT NULL,
        dedupe TEXT NOT NULL,
        body BLOB NOT NULL,
        text TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL,
        last_status INTEGER,
        last_error TEXT,
        created_at REAL NOT NULL,
        finished_at REAL,
        UNIQUE (webhook_id, dedupe)
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries(next_at) WHERE state = 'pending';
    CREATE INDEX webhook_deliveries_hook ON webhook_deliveries(webhook_id, created_at);
    CREATE INDEX webhook_deliveries_loop ON webhook_deliveries(loop_id, created_at);
    CREATE TABLE webhook_cursors (loop_id TEXT PRIMARY KEY, seen INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO webhook_cursors (loop_id, seen) SELECT id, finished FROM loops;
    """,
    # browser sessions (/login): only the SHA-256 of a session id is stored, with the token it
    # was made from; revoking the token deletes its sessions
    """
    CREATE TABLE sessions (
        id_hash TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        data BLOB NOT NULL,
        expires_at REAL NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX sessions_token ON sessions(token_id);
    """,
    # the node an experiment runs (or ran) on: the executor's name for it ("local" on one machine)
    """
    ALTER TABLE experiments ADD COLUMN node TEXT;
    """,
    # a loop's cache: what its trusted baseline run left in its cache directory (a tar file under
    # the data dir's caches/), or only its size when it was over the bound (state 'too_large')
    """
    CREATE TABLE loop_caches (
        loop_id TEXT PRIMARY KEY REFERENCES loops(id),
        state TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        files INTEGER NOT NULL,
        experiment TEXT NOT NULL,
        filled_at REAL NOT NULL,
        file TEXT
    );
    """,
    # proposers: each proposer run is a row with its own state machine; an experiment names the
    # proposal that made it (at most one per proposal); a loop keeps why Ratchet paused it, its
    # proposer's failure streak and its chat budget; duplicates are found by snapshot
    """
    CREATE TABLE proposals (
        id TEXT PRIMARY KEY,
        loop_id TEXT NOT NULL REFERENCES loops(id),
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        failure TEXT,
        parent TEXT REFERENCES snapshots(id),
        description TEXT,
        experiment_id TEXT REFERENCES experiments(id),
        duplicate_of TEXT REFERENCES experiments(id),
        exit_code INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        requests INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        log_tail TEXT,
        UNIQUE (loop_id, seq)
    );
    CREATE INDEX proposals_loop_status ON proposals(loop_id, status, seq);
    CREATE INDEX proposals_open ON proposals(status) WHERE status IN ('queued', 'running');
    ALTER TABLE experiments ADD COLUMN proposal_id TEXT REFERENCES proposals(id);
    CREATE UNIQUE INDEX experiments_proposal ON experiments(proposal_id) WHERE proposal_id IS NOT NULL;
    CREATE INDEX experiments_snapshot ON experiments(loop_id, snapshot);
    ALTER TABLE loops ADD COLUMN state_reason TEXT;
    ALTER TABLE loops ADD COLUMN proposal_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE loops ADD COLUMN proposer_streak INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE loops ADD COLUMN llm_requests INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE loops ADD COLUMN llm_tokens INTEGER NOT NULL DEFAULT 0;
    """,
]
