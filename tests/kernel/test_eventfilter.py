"""The event socket's kernel-side filter (ctbridge.conntrack.eventfilter) in the real kernel: of
flows written into a fresh namespace's table, the events of those the no-sync selection names
never reach the socket; their deletions do, as every event of the others. The same selection's
userspace check (NoSync) must agree, flow by flow."""

from __future__ import annotations

import pytest

from ctbridge.conntrack import eventfilter
from ctbridge.conntrack.codec import EventKind
from ctbridge.conntrack.eventsocket import EventSocket
from ctbridge.conntrack.table import KernelTable
from ctbridge.lab import netns
from tests.kernel.test_kernel import LABEL_RULES, _collect
from tests.unit.test_nosync import SELECTION, entry

pytestmark = pytest.mark.root


def test_the_kernel_drops_the_events_of_no_sync_flows_and_passes_their_deletions(ns: str) -> None:
    netns.run(ns, "nft", "-f", "-", input=LABEL_RULES)  # label space exists where a ruleset uses labels
    kept = [entry(1), entry(2, mark=0x200), entry(3, zone=8), entry(4, dport=5062), entry(5, bits=(2,))]
    left = [entry(11, mark=0x100), entry(12, mark=7), entry(13, zone=9), entry(14, dport=53), entry(15, dport=5060),
            entry(16, bits=(3,)), entry(17, bits=(127,))]
    assert not any(SELECTION.refuses(e.key, e.attrs) for e in kept)
    assert all(SELECTION.refuses(e.key, e.attrs) for e in left)
    with netns.inside(ns):
        sock = EventSocket()
        table = KernelTable()
    with sock, table:
        eventfilter.attach(sock.sock, eventfilter.program(SELECTION.marks, SELECTION.labels, SELECTION.zones,
                                                          SELECTION.ports))
        assert table.commit(kept + left).failed == []
        new = _collect(sock, len(kept))
        assert {e.entry.key for e in new} == {e.key for e in kept}
        assert all(e.kind is not EventKind.DESTROY for e in new)
        assert table.delete([e.key for e in kept + left]).failed == []
        gone = _collect(sock, len(kept + left))
        assert all(e.kind is EventKind.DESTROY for e in gone)
        assert {e.entry.key for e in gone} == {e.key for e in kept + left}
        # taken off: every event again
        eventfilter.attach(sock.sock, None)
        assert table.commit(left[:2]).failed == []
        assert {e.entry.key for e in _collect(sock, 2)} == {e.key for e in left[:2]}
