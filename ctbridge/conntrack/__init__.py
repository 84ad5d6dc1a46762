"""The kernel's connection-tracking table over ctnetlink: its constants (abi), the messages
(codec; the CT_NEW writes: request; the helpers' expectations: expectation), the table (table),
its events (eventsocket, recvmmsg; eventdrain: the thread that drains them; eventfilter: the
kernel-side filter of no-sync flows' events), how an entry reads (view, listing),
and the netfilter queue where packets wait for a verdict (nfqueue: the active-active defer).

The bottom layer: it imports nothing else of ctbridge. Everything above may import it.
"""
