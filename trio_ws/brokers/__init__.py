"""Brokers: what carries a broadcast from the process that received it to every process.

* :mod:`trio_ws.brokers.local`: one process is the whole cluster (the default).
* :mod:`trio_ws.brokers.redis`: a Redis Stream shared by every worker and instance; the I/O.
  Its decisions are :mod:`trio_ws.brokers.cluster_log`'s (no I/O), its stream entries
  :mod:`trio_ws.brokers.entries`', its cluster membership :mod:`trio_ws.brokers.membership`'s.
"""
