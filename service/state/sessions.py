"""Browser sessions in the database, each tied to the API token it was opened with.

Only the SHA-256 of a session id is stored (a copy of the database, a backup, opens no session).
Revoking a token deletes its sessions in the same transaction (`tokens.delete_token`), and every
use of a session checks its token again, so a revoked token's session is dead at once either way.
"""

from __future__ import annotations

import hashlib
import time

from .store import Store

__all__ = ["delete_all", "delete_session", "get_session", "purge_expired", "put_session"]


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", errors="surrogatepass")).hexdigest()


async def put_session(store: Store, session_id: str, token_id: str, data: bytes, expires_in: float) -> None:
    now = time.time()
    async with store.tx() as db:
        await db.execute(
            "INSERT INTO sessions (id_hash, token_id, data, expires_at, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id_hash) DO UPDATE SET token_id = excluded.token_id, data = excluded.data,"
            " expires_at = excluded.expires_at",
            (_key(session_id), token_id, data, now + expires_in, now),
        )


async def get_session(store: Store, session_id: str) -> tuple[bytes, float] | None:
    """(data, expires_at) of a live session, or None."""
    rows = await store.r.execute_fetchall(
        "SELECT data, expires_at FROM sessions WHERE id_hash = ? AND expires_at > ?",
        (_key(session_id), time.time()),
    )
    return (bytes(rows[0][0]), rows[0][1]) if rows else None


async def delete_session(store: Store, session_id: str) -> None:
    async with store.tx() as db:
        await db.execute("DELETE FROM sessions WHERE id_hash = ?", (_key(session_id),))


async def delete_all(store: Store) -> None:
    async with store.tx() as db:
        await db.execute("DELETE FROM sessions")


async def purge_expired(store: Store) -> int:
    async with store.tx() as db:
        cur = await db.execute("DELETE FROM sessions WHERE expires_at <= ?", (time.time(),))
        return cur.rowcount
