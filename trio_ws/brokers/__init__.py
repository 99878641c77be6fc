"""Brokers: what carries a broadcast from the process that received it to every process.

* :mod:`trio_ws.brokers.local`: one process is the whole cluster (the default).
* :mod:`trio_ws.brokers.redis`: a Redis Stream shared by every worker and instance.
"""
