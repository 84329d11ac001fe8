"""API tokens in the database. A secret is shown once, when it is made; only its SHA-256 is stored,
so a copy of the database does not hand out working tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import aiosqlite
import msgspec

from ..models import Scope, TokenCreate, TokenCreated, TokenView
from .store import Store

__all__ = [
    "PREFIX",
    "count_tokens",
    "create_token",
    "delete_token",
    "find_token",
    "find_token_by_hash",
    "hash_secret",
    "list_tokens",
]

PREFIX = "rt_"  # makes a leaked token recognisable to secret scanners
# last_used_at is a hint, not an audit log: at most one write per token per minute.
TOUCH_EVERY_S = 60.0


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", errors="surrogatepass")).hexdigest()


def _view(row: aiosqlite.Row) -> TokenView:
    return TokenView(
        id=row["id"],
        name=row["name"],
        scopes=[Scope(s) for s in row["scopes"].split(",")],
        loops=msgspec.json.decode(row["loops"]) if row["loops"] else None,
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
    )


async def create_token(store: Store, body: TokenCreate) -> TokenCreated:
    token_id = secrets.token_hex(8)
    secret = PREFIX + secrets.token_urlsafe(32)  # 256 random bits
    scopes = sorted(set(body.scopes), key=list(Scope).index)
    loops = sorted(set(body.loops)) if body.loops is not None else None
    now = time.time()
    async with store.tx() as db:
        await db.execute(
            "INSERT INTO tokens (id, name, hash, scopes, loops, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                token_id,
                body.name,
                hash_secret(secret),
                ",".join(s.value for s in scopes),
                msgspec.json.encode(loops).decode() if loops is not None else None,
                now,
            ),
        )
    return TokenCreated(
        id=token_id, name=body.name, scopes=scopes, loops=loops, created_at=now, secret=secret
    )


async def list_tokens(store: Store) -> list[TokenView]:
    async with store.r.execute("SELECT * FROM tokens ORDER BY created_at") as cur:
        return [_view(r) for r in await cur.fetchall()]


async def delete_token(store: Store, token_id: str) -> bool:
    """Revokes a token and ends the browser sessions opened with it, in one transaction."""
    async with store.tx() as db:
        cur = await db.execute("DELETE FROM tokens WHERE id = ?", (token_id,))
        await db.execute("DELETE FROM sessions WHERE token_id = ?", (token_id,))
        return cur.rowcount > 0


async def find_token_by_hash(store: Store, digest: str) -> TokenView | None:
    """The token whose secret hashes to `digest` (a browser session holds only that), or None."""
    async with store.r.execute("SELECT * FROM tokens WHERE hash = ?", (digest,)) as cur:
        row = await cur.fetchone()
    return _view(row) if row is not None and hmac.compare_digest(row["hash"], digest) else None


async def count_tokens(store: Store) -> int:
    async with store.r.execute("SELECT COUNT(*) FROM tokens") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def find_token(store: Store, secret: str) -> TokenView | None:
    """The token whose secret this is, or None; records when it was last used."""
    digest = hash_secret(secret)
    async with store.r.execute("SELECT * FROM tokens WHERE hash = ?", (digest,)) as cur:
        row = await cur.fetchone()
    # The lookup is by an index on the hash; compare again in constant time all the same.
    if row is None or not hmac.compare_digest(row["hash"], digest):
        return None
    token = _view(row)
    now = time.time()
    if token.last_used_at is None or now - token.last_used_at > TOUCH_EVERY_S:
        async with store.tx() as db:
            await db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", (now, token.id))
        token.last_used_at = now
    return token
