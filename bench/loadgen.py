"""Load generator: raw-socket WebSocket clients that cost the server's peers as little as possible.

Every message a publisher sends carries a marker ``B|<seq>|<monotonic ns>|`` at the start of its
text. Servers put the text verbatim in whatever JSON they send (batched or not), so a receiver
finds every delivery with one regular expression over the bytes it reads: no JSON parsing, no
frame parsing, no per-message Python objects beyond the match. Servers in the benchmark run with
pings off, so there is nothing to answer.

Receivers run as separate processes (``python bench/loadgen.py receive ...``), each holding many
connections on one ``selectors`` loop, and report JSON on stdout: how many markers each
connection got, lost and duplicated counts, a latency sample, and their own CPU time.

``python bench/loadgen.py handshake ...`` is the other kind of load: ``--connections`` clients
(threads), each in a closed loop for ``--seconds``: upgrade, 101, the welcome frame (unless
``--no-welcome``, for servers that send none), a close frame, the server's close frame, and
again on a new socket.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import resource
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

MARKER = re.compile(rb"B\|(\d+)\|(\d+)\|")
RECV_SIZE = 1 << 18


def connect(host: str, port: int, path: str, *, timeout: float = 30) -> tuple[socket.socket, bytes]:
    """A connected WebSocket client socket (blocking) and the bytes read past the handshake."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head[:80].decode(errors="replace"))
    return sock, rest


def text_frame(payload: bytes) -> bytes:
    """A masked client text frame. The mask key is zero (valid, and no XOR to compute)."""
    length = len(payload)
    if length < 126:
        header = bytes([0x81, 0x80 | length])
    elif length < 65536:
        header = bytes([0x81, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + length.to_bytes(8, "big")
    return header + b"\x00\x00\x00\x00" + payload


def message(seq: int, size: int) -> bytes:
    head = f"B|{seq}|{time.monotonic_ns()}|".encode()
    return head + b"x" * max(0, size - len(head))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Receiver:
    """One process's receiving connections and what they saw."""

    expect: int
    sample_every: int = 7
    seen: list[bytearray] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    duplicates: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    first_ns: int = 0
    last_ns: int = 0

    def add_connection(self) -> int:
        self.seen.append(bytearray(self.expect + 1))
        self.counts.append(0)
        return len(self.counts) - 1

    def feed(self, index: int, data: bytes) -> int:
        """Count the markers in ``data``; return the offset after the last one."""
        now = time.monotonic_ns()
        seen = self.seen[index]
        end = 0
        got = 0
        for match in MARKER.finditer(data):
            seq = int(match[1])
            end = match.end()
            if 0 < seq <= self.expect:
                if seen[seq]:
                    self.duplicates += 1
                    continue
                seen[seq] = 1
                got += 1
                if seq % self.sample_every == 0:
                    self.latencies_ns.append(now - int(match[2]))
        if got:
            self.counts[index] += got
            if not self.first_ns:
                self.first_ns = now
            self.last_ns = now
        return end


def receive(args: argparse.Namespace) -> None:
    """Subprocess: hold ``--connections`` receivers until each has ``--expect`` messages."""
    selector = selectors.DefaultSelector()
    receiver = Receiver(expect=args.expect, sample_every=args.sample_every)
    tails: dict[int, bytes] = {}
    closed = 0
    for i in range(args.connections):
        sock, rest = connect(args.host, args.port, f"{args.path}/{args.prefix}{i}")
        sock.setblocking(False)
        index = receiver.add_connection()
        tails[index] = rest
        selector.register(sock, selectors.EVENT_READ, index)
    print("READY", flush=True)
    cpu_start = cpu_seconds()
    deadline = time.monotonic() + args.timeout
    complete = 0
    while complete + closed < args.connections and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            index = key.data
            try:
                data = key.fileobj.recv(RECV_SIZE)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                closed += 1
                continue
            before = receiver.counts[index]
            buffer = tails[index] + data
            end = receiver.feed(index, buffer)
            # Keep what may hold the start of a marker cut by the read.
            tails[index] = buffer[max(end, len(buffer) - 64) :]
            if before < args.expect <= receiver.counts[index]:
                complete += 1
    cpu = cpu_seconds() - cpu_start
    total = sum(receiver.counts)
    latencies = sorted(receiver.latencies_ns)
    print(
        json.dumps(
            {
                "connections": args.connections,
                "received": total,
                "lost": args.expect * args.connections - total,
                "duplicates": receiver.duplicates,
                "closed_by_server": closed,
                "first_ns": receiver.first_ns,
                "last_ns": receiver.last_ns,
                "cpu_s": cpu,
                "latency_sample_ns": latencies[:: max(1, len(latencies) // 2000)],
            }
        ),
        flush=True,
    )


class Publisher:
    """One connection that publishes markers and reads its own echoes (a closed loop)."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock, self._tail = connect(host, port, path)
        self.echoed = 0

    def send(self, seq: int, size: int) -> None:
        self.sock.sendall(text_frame(message(seq, size)))

    def wait_echo(self, seq: int, timeout: float = 30) -> None:
        """Read until the echo of message ``seq`` (or a later one) has come back."""
        deadline = time.monotonic() + timeout
        while self.echoed < seq:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("the server closed the publisher")
            buffer = self._tail + data
            end = 0
            for match in MARKER.finditer(buffer):
                self.echoed = max(self.echoed, int(match[1]))
                end = match.end()
            self._tail = buffer[max(end, len(buffer) - 64) :]

    def close(self) -> None:
        self.sock.close()


#: A masked client close frame, code 1000 (normal closure), zero mask key.
CLOSE_FRAME = bytes([0x88, 0x82, 0, 0, 0, 0]) + (1000).to_bytes(2, "big")
OP_CLOSE = 0x8


def read_frame(sock: socket.socket, buffer: bytes) -> tuple[int, bytes]:
    """The opcode of the next (unmasked, server) frame, and the bytes read past it."""
    while True:
        if len(buffer) >= 2:
            length = buffer[1] & 0x7F
            offset = 2
            if length == 126:
                offset = 4
                length = int.from_bytes(buffer[2:4], "big") if len(buffer) >= 4 else -1
            elif length == 127:
                offset = 10
                length = int.from_bytes(buffer[2:10], "big") if len(buffer) >= 10 else -1
            if length >= 0 and len(buffer) >= offset + length:
                return buffer[0] & 0x0F, buffer[offset + length :]
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the server")
        buffer += chunk


@dataclass
class HandshakeTally:
    done: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    #: Upgrade request to welcome frame (to the 101 with ``--no-welcome``), in ns.
    latencies_ns: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def handshake_loop(args: argparse.Namespace, deadline: float, tally: HandshakeTally) -> None:
    """One client: connect, welcome, close, again, until ``deadline``."""
    while time.monotonic() < deadline:
        started = time.monotonic_ns()
        try:
            sock, rest = connect(args.host, args.port, args.path, timeout=args.timeout)
            with sock:
                opcode = 0
                if args.welcome:
                    opcode, rest = read_frame(sock, rest)
                    if opcode != 0x1:
                        raise ConnectionError(f"first frame has opcode {opcode}, not text")
                greeted = time.monotonic_ns()
                sock.sendall(CLOSE_FRAME)
                try:
                    while opcode != OP_CLOSE:
                        opcode, rest = read_frame(sock, rest)
                except ConnectionError:
                    pass  # closed without a close frame: the connection is over all the same
        except OSError as error:  # ConnectionError and TimeoutError included
            with tally.lock:
                tally.failed += 1
                name = type(error).__name__
                tally.errors[name] = tally.errors.get(name, 0) + 1
            time.sleep(0.01)
            continue
        with tally.lock:
            tally.done += 1
            tally.latencies_ns.append(greeted - started)


def handshake(args: argparse.Namespace) -> None:
    """Subprocess: ``--connections`` clients in a closed loop of handshakes for ``--seconds``."""
    tally = HandshakeTally()
    cpu_start = cpu_seconds()
    started = time.monotonic()
    deadline = started + args.seconds
    threads = [
        threading.Thread(target=handshake_loop, args=(args, deadline, tally), daemon=True)
        for _ in range(args.connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        # A handshake that started before the deadline ends within --timeout per step.
        thread.join(timeout=args.seconds + 4 * args.timeout)
    elapsed = time.monotonic() - started
    latencies = sorted(tally.latencies_ns)
    with tally.lock:
        print(
            json.dumps(
                {
                    "connections": args.connections,
                    "handshakes": tally.done,
                    "failed": tally.failed,
                    "errors": tally.errors,
                    "elapsed_s": elapsed,
                    "cpu_s": cpu_seconds() - cpu_start,
                    "latency_sample_ns": latencies[:: max(1, len(latencies) // 4000)],
                }
            ),
            flush=True,
        )


def flood(args: argparse.Namespace) -> None:
    """Subprocess: one hostile publisher. Sends ``--size``-byte messages as fast as the socket
    takes them for up to ``--duration`` seconds while a thread reads (and counts) its echoes, so
    it is never cut as a slow consumer; reports JSON: messages sent, echoes seen, and the
    server's close code (if it closed the flooder) and error frame."""
    import threading

    sock, rest = connect(args.host, args.port, f"{args.path}/{args.prefix}flooder")
    payload = b"FLOOD|" + b"f" * max(0, args.size - 6)
    chunk = text_frame(payload) * 32
    state: dict[str, Any] = {"echoes": 0, "close_code": None, "error_frame": None}
    closed = threading.Event()

    def read() -> None:
        buffer = rest
        while not closed.is_set():
            try:
                data = sock.recv(RECV_SIZE)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while len(buffer) >= 2:  # whole unmasked server frames
                opcode, length, header = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
                if length == 126:
                    length, header = int.from_bytes(buffer[2:4], "big"), 4
                elif length == 127:
                    length, header = int.from_bytes(buffer[2:10], "big"), 10
                if len(buffer) < header + length:
                    break
                payload = buffer[header : header + length]
                buffer = buffer[header + length :]
                if opcode == 0x8:
                    state["close_code"] = int.from_bytes(payload[:2], "big")
                elif payload.startswith(b"FLOOD|", payload.find(b'"text":"') + 8):
                    state["echoes"] += 1
                elif payload.startswith(b'{"type":"error"'):
                    state["error_frame"] = payload.decode(errors="replace")
            if state["close_code"] is not None:
                break
        closed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = time.monotonic()
    sent = 0
    sock.settimeout(0.2)  # to notice the end or the close while the server is not reading
    view, offset = memoryview(chunk), 0
    while not closed.is_set() and time.monotonic() - started < args.duration:
        try:
            offset += sock.send(view[offset:])  # never resend a part already sent
        except TimeoutError:
            continue
        except OSError:
            break
        if offset == len(chunk):
            offset = 0
            sent += 32
    ended = time.monotonic() - started
    closed.set()
    reader.join(timeout=5)
    sock.close()
    print(
        json.dumps(
            {
                "sent_at_least": sent,
                "echoes": state["echoes"],
                "close_code": state["close_code"],
                "error_frame": state["error_frame"],
                "seconds": round(ended, 2),
            }
        ),
        flush=True,
    )


def idle(args: argparse.Namespace) -> None:
    """Subprocess: open ``--connections`` idle connections (one after the other, or all at once
    with ``--at-once``), report handshake times, then hold them until stdin closes."""
    if args.at_once:
        socks, times_ms, failed = connect_all(args)
    else:
        socks, times_ms, failed = [], [], 0
        for i in range(args.connections):
            started = time.monotonic()
            sock, _ = connect(args.host, args.port, f"{args.path}/{args.prefix}{i}")
            times_ms.append((time.monotonic() - started) * 1000)
            socks.append(sock)
    print(json.dumps({"connect_ms": times_ms, "failed": failed}), flush=True)
    sys.stdin.read()
    for sock in socks:
        sock.close()


def connect_all(args: argparse.Namespace) -> tuple[list[socket.socket], list[float], int]:
    """Start every connection at once (non-blocking connects on one ``selectors`` loop): the
    TCP connect, the upgrade request and the 101. Returns the sockets, each one's time from
    its connect to its 101 in ms, and how many failed (refused, reset, or not upgraded within
    ``--timeout`` seconds)."""
    selector = selectors.DefaultSelector()
    started: dict[int, float] = {}
    heads: dict[int, bytes] = {}
    done: list[socket.socket] = []
    times_ms: list[float] = []
    failed = 0
    for i in range(args.connections):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started[sock.fileno()] = time.monotonic()
        sock.connect_ex((args.host, args.port))
        ws_key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {args.path}/{args.prefix}{i} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {ws_key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        selector.register(sock, selectors.EVENT_WRITE, request)
    deadline = time.monotonic() + args.timeout
    while selector.get_map() and time.monotonic() < deadline:
        for key, events in selector.select(timeout=0.2):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            fd = conn.fileno()
            try:
                if events & selectors.EVENT_WRITE:
                    error = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, os.strerror(error))
                    conn.send(key.data)  # a few hundred bytes: an empty buffer takes them
                    selector.modify(conn, selectors.EVENT_READ, None)
                    heads[fd] = b""
                    continue
                chunk = conn.recv(4096)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                heads[fd] += chunk
                if b"\r\n\r\n" not in heads[fd]:
                    continue
                if not heads[fd].startswith(b"HTTP/1.1 101"):
                    raise ConnectionError("not upgraded")
            except OSError:
                selector.unregister(conn)
                conn.close()
                failed += 1
                continue
            selector.unregister(conn)
            times_ms.append((time.monotonic() - started[fd]) * 1000)
            conn.setblocking(True)
            done.append(conn)
    for left in list(selector.get_map().values()):
        selector.unregister(left.fileobj)
        assert isinstance(left.fileobj, socket.socket)
        left.fileobj.close()
        failed += 1
    return done, times_ms, failed


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("receive", "idle", "handshake", "flood"):
        p = sub.add_parser(name)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--path", default="/ws")
        p.add_argument("--prefix", default=f"r{random.randrange(10**6)}-")
        p.add_argument("--connections", type=int, required=name != "flood")
        if name == "receive":
            p.add_argument("--expect", type=int, required=True)
            p.add_argument("--timeout", type=float, default=120)
            p.add_argument("--sample-every", type=int, default=7)
        if name == "handshake":
            p.add_argument("--seconds", type=float, default=8)
            p.add_argument("--timeout", type=float, default=10, help="per socket operation")
            p.add_argument("--welcome", action=argparse.BooleanOptionalAction, default=True)
        if name == "idle":
            p.add_argument("--at-once", action="store_true", help="start every connect at once")
            p.add_argument("--timeout", type=float, default=60, help="with --at-once: for all")
        if name == "flood":
            p.add_argument("--size", type=int, default=1000)
            p.add_argument("--duration", type=float, default=10)
    args = parser.parse_args()
    commands = {"receive": receive, "idle": idle, "handshake": handshake, "flood": flood}
    commands[args.command](args)


def percentile(sorted_values: list[Any], fraction: float) -> Any:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


if __name__ == "__main__":
    main()
