"""The `conntrack` CLI as an independent witness: its listing parsed into the entry JSON fields."""

from __future__ import annotations

from typing import Any

from ctbridge.lab import netns

_TUPLE_KEYS = ("src", "dst", "sport", "dport", "type", "code", "id", "srckey", "dstkey")
_INT_KEYS = {"sport", "dport", "type", "code", "id", "srckey", "dstkey", "mark", "zone", "use"}


def parse_line(line: str) -> dict[str, Any]:
    """One `conntrack -L -o extended` line, e.g.
    ``ipv4 2 tcp 6 299 ESTABLISHED src=.. dst=.. sport=.. dport=.. [UNREPLIED] src=.. ... [ASSURED] mark=7 use=1``
    """
    words = line.split()
    out: dict[str, Any] = {"family": words[0], "proto": words[2], "timeout": int(words[4]), "flags": []}
    rest = words[5:]
    if rest and "=" not in rest[0] and not rest[0].startswith("["):
        out["state"] = rest[0]  # TCP, SCTP or DCCP state
        rest = rest[1:]
    prefix = ""
    for w in rest:
        if w.startswith("["):
            out["flags"].append(w.strip("[]"))
            continue
        if "=" not in w:
            continue
        k, v = w.split("=", 1)
        if k in _TUPLE_KEYS:
            if prefix + k in out:  # second tuple: the reply direction
                prefix = "reply_"
            out[prefix + k] = int(v, 0) if k in _INT_KEYS else v
        else:
            out[k] = int(v) if k in _INT_KEYS else v
    out.setdefault("mark", 0)
    out.setdefault("zone", 0)
    return out


def listing(ns: str) -> list[dict[str, Any]]:
    """The namespace's table as `conntrack -L -o extended` shows it."""
    res = netns.run(ns, "conntrack", "-L", "-o", "extended")
    return [parse_line(line) for line in res.stdout.splitlines() if line.strip()]


def flow_id(v: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a flow in both views: family, protocol, original tuple, zone."""
    keys = ("family", "proto", "src", "dst", "sport", "dport", "type", "code", "id", "srckey", "dstkey", "zone")
    return tuple(v.get(k) for k in keys)


COMPARED = ("family", "proto", "src", "dst", "sport", "dport", "type", "code", "id", "reply_src", "reply_dst",
            "reply_sport", "reply_dport", "reply_type", "reply_code", "reply_id", "srckey", "dstkey",
            "reply_srckey", "reply_dstkey", "mark", "zone")


def mismatches(ours: dict[str, Any], theirs: dict[str, Any], timeout_slack: int = 3) -> list[str]:
    """Fields where an entry view and the witness disagree (empty when they agree)."""
    bad = [f"{k}: {ours.get(k)!r} != {theirs.get(k)!r}" for k in COMPARED if ours.get(k) != theirs.get(k)]
    state = ours.get("tcp_state") or ours.get("sctp_state") or ours.get("dccp_state")
    if state != theirs.get("state"):
        bad.append(f"state: {state!r} != {theirs.get('state')!r}")
    if abs(ours.get("timeout", -100) - theirs["timeout"]) > timeout_slack:
        bad.append(f"timeout: {ours.get('timeout')} vs {theirs['timeout']}")
    if ("ASSURED" in ours["status"]) != ("ASSURED" in theirs["flags"]):
        bad.append(f"ASSURED: {ours['status']} vs {theirs['flags']}")
    if ("SEEN_REPLY" not in ours["status"]) != ("UNREPLIED" in theirs["flags"]):
        bad.append(f"SEEN_REPLY: {ours['status']} vs {theirs['flags']}")
    return bad
