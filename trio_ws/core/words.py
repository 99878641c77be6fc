"""Words for log lines: operators read "1 connection", not "1 connections"."""


def plural(count: int, noun: str) -> str:
    """``plural(1, "client")`` -> ``"1 client"``; ``plural(2, "client")`` -> ``"2 clients"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
