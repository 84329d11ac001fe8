"""Webhooks as pure functions: which events a loop's new results make, the message a receiver
gets, its signature, when to try again, and which destinations are refused.

Signature: header `X-Ratchet-Signature: t=<unix seconds>,v1=<hex>` where `<hex>` is
HMAC-SHA256(secret, f"{t}.".encode() + body). The timestamp is that of the attempt, so a receiver
can refuse old messages (replays); the body is the same on every attempt, and its `id` lets a
receiver ignore a message it already handled (delivery is at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import msgspec

from ..ops_models import WebhookEvent

__all__ = [
    "ALWAYS_REFUSED",
    "Allow",
    "LedgerResult",
    "LoopFacts",
    "NewEvent",
    "address_problem",
    "backoff_s",
    "host_problem",
    "ledger_events",
    "literal_address",
    "message",
    "parse_allow",
    "parse_events",
    "sign",
    "slack_escape",
    "target_of",
    "url_problem",
    "verify",
]

SIGNATURE_TOLERANCE_S = 300
FAILED = frozenset({"crash", "timeout"})
# Cloud metadata services and other addresses no webhook may reach, whatever the allow-list says.
ALWAYS_REFUSED = (
    ipaddress.ip_network("169.254.0.0/16"),  # link-local: AWS/GCP/Azure/OpenStack metadata at .169.254
    ipaddress.ip_network("fe80::/10"),  # IPv6 link-local
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS metadata over IPv6
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("::/128"),
    ipaddress.ip_network("224.0.0.0/4"),  # multicast
    ipaddress.ip_network("ff00::/8"),
    ipaddress.ip_network("255.255.255.255/32"),
)


# -- events ---------------------------------------------------------------------------------------


class LedgerResult(msgspec.Struct, frozen=True):
    """One row of a loop's results in finishing order."""

    finish_seq: int
    exp_id: str
    number: int
    kind: str
    status: str
    metric: float | None
    description: str
    reason: str | None
    snapshot: str


class NewEvent(msgspec.Struct, frozen=True):
    event: WebhookEvent
    dedupe: str  # one delivery per webhook and dedupe key, however often the event is derived
    result: LedgerResult | None = None
    streak: int | None = None


def ledger_events(
    rows: Sequence[LedgerResult], seen: int, streak: int, wanted: Iterable[WebhookEvent]
) -> list[NewEvent]:
    """The events of the results after `seen` (rows before it are context for streaks: give at
    least `streak` of them). A streak is reported once, when it reaches `streak` results."""
    wanted = set(wanted)
    out: list[NewEvent] = []
    failed_run = timeout_run = 0
    for row in rows:
        failed_run = failed_run + 1 if row.status in FAILED else 0
        timeout_run = timeout_run + 1 if row.status == "timeout" else 0
        if row.finish_seq <= seen:
            continue
        if row.status == "keep" and WebhookEvent.keep in wanted:
            out.append(NewEvent(WebhookEvent.keep, f"keep:{row.exp_id}", row))
        if failed_run == streak and WebhookEvent.crash_streak in wanted:
            out.append(NewEvent(WebhookEvent.crash_streak, f"crash_streak:{row.exp_id}", row, streak))
        if timeout_run == streak and WebhookEvent.timeout_streak in wanted:
            out.append(NewEvent(WebhookEvent.timeout_streak, f"timeout_streak:{row.exp_id}", row, streak))
    return out


def parse_events(text: str | None) -> list[WebhookEvent]:
    """`RATCHET_WEBHOOK_EVENTS`: comma-separated names; empty or unset means every event."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        return list(WebhookEvent)
    unknown = [n for n in names if n not in WebhookEvent.__members__]
    if unknown:
        raise ValueError(f"unknown webhook event(s) {', '.join(unknown)}; known: {', '.join(WebhookEvent)}")
    return [WebhookEvent(n) for n in dict.fromkeys(names)]


# -- the message ------------------------------------------------------------------------------------


class LoopFacts(msgspec.Struct, frozen=True):
    """What a message says about its loop."""

    id: str
    name: str
    state: str
    metric: str
    direction: str
    best_metric: float | None
    finished: int  # results so far


def _value(v: float | None) -> str:
    return "-" if v is None else f"{v:.6f}"


def _text(
    event: WebhookEvent, loop: LoopFacts, result: LedgerResult | None, streak: int | None, detail: str | None
) -> str:
    name = slack_escape(loop.name)
    what = ""
    if result is not None:
        desc = result.description if len(result.description) <= 200 else result.description[:199] + "…"
        what = f"#{result.number} {slack_escape(desc)}"
    reason = slack_escape((detail or (result.reason if result else None) or "")[:300])
    best = f"best {loop.metric} {_value(loop.best_metric)}"
    match event:
        case WebhookEvent.keep if result is not None and result.kind == "baseline":
            return f"Ratchet · {name}: baseline {loop.metric} {_value(result.metric)} (#{result.number})"
        case WebhookEvent.keep:
            return f"Ratchet · {name}: new best {loop.metric} {_value(loop.best_metric)} — kept {what}"
        case WebhookEvent.crash_streak:
            return (
                f"Ratchet · {name}: {streak} results in a row crashed or timed out; latest {what}: {reason}"
            )
        case WebhookEvent.timeout_streak:
            return f"Ratchet · {name}: {streak} timeouts in a row; latest {what}: {reason}"
        case WebhookEvent.loop_finished:
            return f"Ratchet · {name} finished ({reason}): {best} after {loop.finished} results"
        case WebhookEvent.loop_paused:  # a pause by Ratchet itself says why (a caller's says "paused")
            why = f" ({reason})" if detail and detail != "paused" else ""
            return f"Ratchet · {name} paused{why} after {loop.finished} results; {best}"
        case WebhookEvent.proposer_failed:
            return f"Ratchet · {name}: the proposer failed: {reason}"
    return f"Ratchet · {name}: {event}"


def message(
    delivery_id: str,
    event: WebhookEvent,
    created_at: float,
    loop: LoopFacts,
    result: LedgerResult | None = None,
    streak: int | None = None,
    detail: str | None = None,
) -> bytes:
    """The JSON body: `text` for chat receivers (Slack, Mattermost, Discord's /slack endpoint),
    the facts as fields for programs."""
    experiment = None
    if result is not None:
        experiment = {
            "id": result.exp_id,
            "number": result.number,
            "kind": result.kind,
            "status": result.status,
            "metric": result.metric,
            "commit": result.snapshot[:7],
            "description": result.description,
            "reason": result.reason,
        }
    body = {
        "id": delivery_id,
        "event": event.value,
        "created_at": created_at,
        "text": _text(event, loop, result, streak, detail),
        "loop": {
            "id": loop.id,
            "name": loop.name,
            "state": loop.state,
            "metric": loop.metric,
            "direction": loop.direction,
            "best_metric": loop.best_metric,
            "results": loop.finished,
        },
        "experiment": experiment,
        "streak": streak,
        "detail": detail,
    }
    return msgspec.json.encode(body)


def slack_escape(text: str) -> str:
    """Slack's three control characters: agent-written text must not become `<!channel>` or a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: str, header: str, body: bytes, now: float, tolerance_s: float = SIGNATURE_TOLERANCE_S
) -> bool:
    """What a receiver does: the header's timestamp is recent and one of its `v1` MACs matches."""
    parts = [p.partition("=") for p in header.split(",")]
    stamps = [v for k, _, v in parts if k.strip() == "t"]
    macs = [v.strip() for k, _, v in parts if k.strip() == "v1"]
    if len(stamps) != 1 or not stamps[0].strip().isdigit() or not macs:
        return False
    timestamp = int(stamps[0])
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, mac) for mac in macs)


def backoff_s(
    attempts: int, base_s: float, retry_after_s: float | None = None, cap_s: float = 3600.0
) -> float:
    """Wait before the next attempt after `attempts` failed ones: base, twice that, four times
    that, … up to `cap_s`; a receiver's Retry-After, if longer, wins (within the cap)."""
    delay = min(cap_s, base_s * 2 ** max(0, attempts - 1))
    if retry_after_s is not None:
        delay = max(delay, min(cap_s, retry_after_s))
    return delay


# -- where deliveries may go -------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Allow(msgspec.Struct, frozen=True):
    """Destinations allowed besides public addresses: host names (any address they resolve to,
    except the ALWAYS_REFUSED ones) and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()
    public: bool = True  # False: public addresses too must be allow-listed

    def lists_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts


def parse_allow(text: str | None, extra_hosts: Iterable[str] = (), public: bool = True) -> Allow:
    hosts, networks = set(h.lower() for h in extra_hosts), []
    for item in (i.strip() for i in (text or "").split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            hosts.add(item.lower().rstrip("."))
    return Allow(hosts=frozenset(hosts), networks=tuple(networks), public=public)


def url_problem(url: str) -> str | None:
    """What is wrong with a webhook URL on its face (its addresses are checked when it is used)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return "a webhook URL must start with http:// or https://"
    if not parts.hostname:
        return "a webhook URL must name a host"
    if parts.username or parts.password:
        return "a webhook URL must not carry a user name or password (sign with `secret` instead)"
    if port == 0:
        return "a webhook URL's port must not be 0"
    return None


def target_of(url: str) -> str:
    """scheme://host[:port]: what views show of a webhook URL."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme.lower()}://{host}{port}"


def _plain(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_problem(host: str, address: Address, allow: Allow) -> str | None:
    """Why a delivery to `host` may not connect to `address`, or None when it may. Public
    addresses are allowed; private, loopback and shared ones only when allow-listed; link-local
    and metadata addresses never."""
    ip = _plain(address)
    for net in ALWAYS_REFUSED:
        if ip.version == net.version and ip in net:
            return f"{host} is {ip}, a link-local, metadata or non-unicast address: webhooks never go there"
    if (ip.is_global and allow.public) or allow.lists_host(host):
        return None
    if any(ip.version == net.version and ip in net for net in allow.networks):
        return None
    if ip.is_global:
        return (
            f"{host} is not on RATCHET_WEBHOOK_ALLOW (public addresses are off: RATCHET_WEBHOOK_ALLOW_PUBLIC)"
        )
    return (
        f"{host} is {ip}, a private, loopback or reserved address; allow it with RATCHET_WEBHOOK_ALLOW"
        " (a host name or a network, e.g. 10.0.0.0/8)"
    )


def host_problem(host: str, allow: Allow) -> str | None:
    """Refusal before resolving: with public addresses off, a host name must be allow-listed (an
    address literal is checked as an address)."""
    if allow.public or allow.lists_host(host) or literal_address(host) is not None:
        return None
    return f"{host} is not on RATCHET_WEBHOOK_ALLOW (public addresses are off: RATCHET_WEBHOOK_ALLOW_PUBLIC)"


def literal_address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
