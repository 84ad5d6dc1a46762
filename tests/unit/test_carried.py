"""What an update event leaves out (ctbridge.sync.carried): the kernel puts the TCP state, the
labels, the master's tuple, the sequence adjustments and the synproxy state into an update only
when it changed them. A flow's message keeps what earlier events said, through both event paths;
a deletion forgets it. (tests/kernel/test_carried.py shows the kernel's mark-only update.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ctbridge.conntrack import abi as ct
from ctbridge.conntrack import codec
from ctbridge.conntrack.codec import Entry, Event, EventKind
from ctbridge.conntrack.view import entry_view
from ctbridge.sync import wire
from ctbridge.sync.engine import Engine, EngineConfig
from tests.support import builders
from tests.support.enginelab import KEY
from tests.unit.test_nosync import labels

NEW_FLAGS = ct.NLM_F_CREATE | ct.NLM_F_EXCL


def tcp(mark: int = 0, state: int | None = 3, bits: tuple[int, ...] = ()) -> Entry:
    src, dst = bytes((198, 51, 100, 7)), bytes((203, 0, 113, 9))
    orig = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, src, dst, 40000, 443)
    reply = builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, dst, src, 443, 40000)
    return builders.build_entry(ct.AF_INET, orig, reply, mark=mark, tcp_state=state,
                                extra=labels(*bits) if bits else b"")


def by_messages(engine: Engine, e: Entry, kind: str) -> None:
    mtype = ct.MSG_CT_DELETE if kind == "destroy" else ct.MSG_CT_NEW
    engine.kernel_messages([codec.message(mtype, NEW_FLAGS if kind == "new" else 0, 1, e.family, e.attrs)], 1.0)


def by_events(engine: Engine, e: Entry, kind: str) -> None:
    engine.kernel_events([Event({"new": EventKind.NEW, "update": EventKind.UPDATE, "destroy": EventKind.DESTROY}[kind],
                                e, 0)], 1.0)


PATHS = pytest.mark.parametrize("feed", [by_messages, by_events], ids=["messages", "events"])
Feed = Callable[[Engine, Entry, str], None]


def engine() -> Engine:
    return Engine(EngineConfig(node_id=1), wire.Auth([KEY]), epoch=1, now=0.0)


def view(a: Engine) -> dict[str, object]:
    (msg,) = a.internal.values()
    return entry_view(wire.flow_entry(tcp().key, msg))


@PATHS
def test_a_mark_only_update_keeps_the_tcp_state(feed: Feed) -> None:
    """Found by measuring the kernel: the rule that set a mark on a later packet made an event
    without CTA_PROTOINFO, and peers were sent the flow without its TCP state."""
    a = engine()
    feed(a, tcp(), "new")
    feed(a, tcp(mark=7, state=None), "update")
    v = view(a)
    assert v["tcp_state"] == "ESTABLISHED" and v["mark"] == 7


@PATHS
def test_labels_stay_when_an_update_carries_none(feed: Feed) -> None:
    a = engine()
    feed(a, tcp(bits=(5,)), "new")
    feed(a, tcp(state=4), "update")  # FIN_WAIT: the state changed, the labels did not
    v = view(a)
    assert v["tcp_state"] == "FIN_WAIT" and v["labels"] == "20" + "00" * 15


@PATHS
def test_what_a_flow_carried_ends_with_it(feed: Feed) -> None:
    a = engine()
    feed(a, tcp(bits=(5,)), "new")
    feed(a, tcp(), "destroy")
    feed(a, tcp(), "new")  # the same tuple again, unlabelled
    feed(a, tcp(state=4), "update")
    assert "labels" not in view(a)


def test_an_update_of_a_flow_without_labels_takes_none() -> None:
    """Labels seen on one flow are looked for in the others' messages, and found in none."""
    a = engine()
    by_messages(a, tcp(bits=(5,)), "new")
    other = builders.tcp_flows(1)[0]
    for kind in ("new", "update"):
        by_messages(a, other, kind)
    assert "labels" not in entry_view(wire.flow_entry(other.key, a.internal[other.key]))


# --- found by review: each failed before its fix -------------------------------------------------

def test_labels_first_seen_in_a_batch_are_carried_in_that_batch() -> None:
    """The first event with labels went through the general path (a layout not learnt yet) and
    the layout of updates kept what it left out from before: the labels were lost for good."""
    a = engine()
    by_messages(a, tcp(), "new")
    by_messages(a, tcp(state=4), "update")  # both layouts learnt
    labelled = builders.build_entry(ct.AF_INET, *other_tuples(), tcp_state=3, extra=labels(5))
    a.kernel_messages([codec.message(ct.MSG_CT_NEW, 0, 1, ct.AF_INET, tcp(state=5).attrs),
                       codec.message(ct.MSG_CT_NEW, NEW_FLAGS, 1, ct.AF_INET, labelled.attrs),
                       codec.message(ct.MSG_CT_NEW, 0, 1, ct.AF_INET,
                                     builders.build_entry(ct.AF_INET, *other_tuples(), tcp_state=4).attrs)], 2.0)
    assert entry_view(wire.flow_entry(labelled.key, a.internal[labelled.key]))["labels"] == "20" + "00" * 15


def other_tuples() -> tuple[bytes, bytes]:
    src, dst = bytes((198, 51, 100, 8)), bytes((203, 0, 113, 9))
    return (builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, src, dst, 40001, 443),
            builders.encode_tuple(ct.AF_INET, ct.IPPROTO_TCP, dst, src, 443, 40001))


@PATHS
def test_a_new_flow_takes_nothing_from_one_whose_end_was_lost(feed: Feed) -> None:
    a = engine()
    feed(a, tcp(bits=(5,)), "new")
    feed(a, tcp(state=1), "new")  # the same tuple again: the DESTROY between them was lost
    assert "labels" not in view(a)


@PATHS
def test_a_synproxy_state_cleared_is_not_brought_back(feed: Feed) -> None:
    def synproxy(isn: int) -> bytes:
        return codec.attr(ct.CTA_SYNPROXY, b"".join(codec.attr(t, isn.to_bytes(4, "big")) for t in (1, 2, 3)),
                          nested=True)
    a = engine()
    first = builders.build_entry(ct.AF_INET, *other_tuples()[:2], tcp_state=3, extra=synproxy(7))
    feed(a, first, "new")
    feed(a, builders.build_entry(ct.AF_INET, *other_tuples()[:2], tcp_state=4, extra=synproxy(0)), "update")
    assert ct.CTA_SYNPROXY not in codec.attr_map(a.internal[first.key], wire.FLOW_HEADER)


def test_a_dump_does_not_find_a_flow_changed_for_its_carried_attributes_order() -> None:
    a = engine()
    by_messages(a, tcp(), "new")
    by_messages(a, tcp(mark=7, state=None), "update")  # the TCP state appended after the mark
    a.internal_cache.drop_pending()
    a.kernel_resync([codec.strip_local(tcp(mark=7))], 3.0)  # the dump: the kernel's own order
    assert a.internal_cache.pending_keys() == []


def test_a_layout_learnt_after_the_plans_were_forgotten_keeps_its_own_labels() -> None:
    """The intake forgets its plans past _LAYOUTS_MAX; a new plan could get a forgotten one's id,
    and with it what that one's updates left out: its message then held two CTA_LABELS, the old
    one last (which the kernel's parser keeps)."""
    a = engine()
    by_messages(a, builders.build_entry(ct.AF_INET, *other_tuples(), tcp_state=3, extra=labels(1)), "new")
    x = tcp(bits=(5,))
    by_messages(a, x, "new")
    filler = []
    for k in range(1, 512):  # layouts enough to make the intake start again
        m = codec.message(ct.MSG_CT_NEW, 0, 1, ct.AF_INET, builders.build_entry(
            ct.AF_INET, *other_tuples(), tcp_state=4, extra=codec.attr(60, bytes(4 * (k + 20)))).attrs)
        filler += [m, m]
    labelled_update = tcp(state=4, bits=(7,))
    a.kernel_messages(filler + [codec.message(ct.MSG_CT_NEW, 0, 1, ct.AF_INET, labelled_update.attrs)] * 2, 2.0)
    types = [t for t, _s, _e in codec.iter_attrs(a.internal[x.key], wire.FLOW_HEADER)]
    assert types.count(ct.CTA_LABELS) == 1
    assert entry_view(wire.flow_entry(x.key, a.internal[x.key]))["labels"] == "80" + "00" * 15
