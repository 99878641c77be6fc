"""The rolling-deploy reconnect storm: N clients move from a draining instance to another one.

    python bench/storm.py --clients 500 --rate 50 --policy page
    python bench/storm.py --clients 500 --rate 50 --policy immediate --connect-timeout 1
    python bench/storm.py --clients 2000 --rate 20 --policy page --json storm.json

What it does, all on loopback, every process its own and stopped by PID at the end:

1. starts a ``redis-server`` (free port, nothing on disk) and two launchers, A and B, sharing it
   (``--drain-timeout 60 --broadcast-interval 0 --ping-interval 0``, default log level);
2. connects N clients to A (``/ws/s00000``...) from a few worker processes, each an ``epoll``
   loop over raw sockets (this file, ``worker`` subcommand): a client decodes every frame, finds
   a message's id and sequence number with one regular expression, and counts each sequence
   number it receives, on A or on B;
3. publishes ``--rate`` messages a second from a publisher connected to B, each text
   ``S|<seq>|``, for the whole run;
4. after ``--warmup`` seconds sends SIGTERM to A. Each client then follows ``--policy``:

   * ``page``, what templates/index.html does: leave A (close 1000, then wait for the close
     handshake, as a browser does) at a random moment within min(10 s, half of
     ``seconds_left``) after the shutdown frame, or at once if A closes first; then reconnect to
     B with full-jitter backoff (attempt n waits uniform(0, min(20, 0.5 * 2**n)) s),
     ``?since=<last id seen>`` and ``&key=<resume key>`` (every attempt presents the key of
     its welcome, as the page does, so that nothing holds its id against it). The page has no
     connect timeout of its own; here an attempt is abandoned after 30 s;
   * ``immediate``: on the shutdown frame close A and connect to B at once, giving each attempt
     ``--connect-timeout`` seconds (TCP connect, handshake and welcome) and retrying at once on
     any failure or timeout.

   A client is *back* once it has B's welcome;
5. once every client is back (or ``--bound`` seconds after SIGTERM) publishes ``--post`` more
   seconds (B's steady CPU with every client on it), stops the publisher, waits until the
   clients have everything or receive nothing more for 3 s, and checks that each client
   received every published message exactly once across A and B;
6. sends a last probe message and checks that a fresh client on B receives it.

Meanwhile B's ``/ready`` and ``/health`` are polled every 0.5 s. The report: time until back
after SIGTERM (p50/p90/p99/max), connect latency of the attempts that succeeded, clients never
back, A's exit time, lost and duplicated messages (lost split into *gap*, before the first
message the client got on B: the resume did not cover it; and *live*, after it: B did not
deliver it), incomplete resumes, whether B's ``/ready`` answered anything but 200 and whether
its broker state changed, B's CPU over the storm window (from SIGTERM until all are back) in
total and per reconnect, with an estimate of the fan-out's share (see ``_cpu_figures``), and
whether the probe arrived.

Lost messages are counted for the clients that came back (the others are *never back*). A
failed attempt is named by the step it failed in and how: ``connect:timeout`` (no answer to the
TCP connect: a SYN dropped by a full listen queue is sent again only after 1 s),
``handshake:...`` (no HTTP 101), ``welcome:...`` (101, but no welcome), ``close:<code>``.

Client cost: a worker spends about 8 to 10 us of CPU per frame it receives, about what the
server spends to send it, so the clients need about as much CPU as the servers: on a 2-core
machine 2,000 clients at 50 messages a second (100,000 deliveries a second) saturate it, and
the figures are the machine's, not the server's; 20 a second leaves room. Each run reports the
cores busy, ours and everyone else's (``machine``), and ``--wait-idle`` waits for a quiet
machine first.

``run_storm`` (async, under Trio) does the whole run and returns a :class:`StormResult`; the
command line is a thin wrapper. Everything is bounded: connects, phases (the run ends by itself
within about 3 minutes), attempts per client (``MAX_ATTEMPTS``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import heapq
import json
import math
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

if TYPE_CHECKING:
    from collections.abc import Callable

Policy = Literal["page", "immediate"]
POLICIES: tuple[Policy, ...] = ("page", "immediate")

HOST = "127.0.0.1"
#: The client workers run this file (``worker`` subcommand).
WORKER_SCRIPT = str(Path(__file__).resolve())
CLK_TCK = os.sysconf("SC_CLK_TCK")
RECV_SIZE = 1 << 16

# -- the page's reconnect policy (templates/index.html) -----------------------------------------
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 20.0
STABLE_AFTER_S = 10.0
MOVE_SPREAD_MAX_S = 10.0
#: A browser gives a WebSocket no timeout of its own; a bound all the same.
PAGE_ATTEMPT_TIMEOUT_S = 30.0
#: Close codes after which the page stops (README, "The test page").
STOP_CODES = frozenset({1003, 1007, 1008, 1009})

# -- bounds -------------------------------------------------------------------------------------
#: Attempts one client makes before giving up (an ``immediate`` client refused at once spins).
MAX_ATTEMPTS = 500
#: Connecting the clients to A: attempts in flight per worker, and each attempt's bound.
INITIAL_CONCURRENCY = 32
INITIAL_ATTEMPT_TIMEOUT_S = 20.0
#: Our own close handshake when leaving A: give up on the server's reply after this long.
CLOSE_WAIT_S = 5.0
#: After the publisher stops: a worker is quiet once nothing new arrived for this long...
QUIET_S = 3.0
#: ... or this long after the stop, whichever comes first.
QUIESCE_MAX_S = 15.0
POLL_EVERY_S = 0.5
HTTP_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 30.0
#: The whole run, whatever happens (workers get a little more, then exit by themselves).
RUN_LIMIT_S = 180.0

#: A message frame as trio_ws encodes it (trio_ws/protocol.py ``message_frame``), matched at the
#: start of the payload: the id (``null`` during a broker outage) and the publisher's sequence.
MESSAGE = re.compile(
    rb'\{"type":"message","id":(?:"([0-9]+-[0-9]+)"|null),"from":"[^"]*","text":"S\|([0-9]+)\|'
)
TEXT_SEQ = re.compile(r"S\|([0-9]+)\|")
#: What the publisher's and the probe's WebSockets (trio-websocket) can fail with.
WS_ERRORS = (ConnectionClosed, HandshakeError, OSError, trio.TooSlowError)

# -- helpers ------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of ``values`` (unsorted), or None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` from /proc, None once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# == the client worker (a subprocess) ===========================================================

# Connection states.
CONNECTING, HANDSHAKE, OPEN, LIVE, CLOSING, DONE = range(6)
#: How a failure names the state it happened in: in the handshake, or after it, before the welcome.
STATE_NAMES = ("connect", "handshake", "welcome", "live", "closing", "done")
# Client phases.
NEW, ON_A, LEAVING, AWAY, ATTEMPTING, ON_B, STOPPED, GAVE_UP, FAILED = range(9)


class _Conn:
    """One WebSocket connection attempt of a client, to A or to B."""

    __slots__ = ("buf", "client", "server", "sock", "started", "state", "welcomed_at")

    def __init__(self, client: _Client, server: str, sock: socket.socket, started: float) -> None:
        self.client = client
        self.server = server  # "A" or "B"
        self.sock = sock
        self.started = started
        self.state = CONNECTING
        self.buf = b""
        self.welcomed_at = 0.0


class _Client:
    __slots__ = (
        "attempts",
        "back_at",
        "conn",
        "dups",
        "failures",
        "first_b_seq",
        "got",
        "index",
        "key",
        "last_id",
        "left_at",
        "name",
        "phase",
        "resumes",
        "retry_gen",
        "seen",
        "shutdown_at",
    )

    def __init__(self, index: int, name: str, capacity: int) -> None:
        self.index = index
        self.name = name
        self.seen = bytearray(capacity)
        self.got = 0
        self.dups = 0
        self.last_id: bytes | None = None  # bytes: set for every message, read once per attempt
        #: The resume key of its welcome, presented on every attempt as the page does: it
        #: replaces the client's own stale connection instead of meeting 4009.
        self.key: str | None = None
        self.conn: _Conn | None = None
        self.phase = NEW
        self.shutdown_at: float | None = None
        self.left_at: float | None = None
        self.back_at: float | None = None
        self.failures = 0  # the page's backoff exponent
        self.attempts = 0  # attempts on B
        self.first_b_seq = 0
        self.resumes: list[tuple[int, bool] | None] = []  # each B welcome: (replayed, complete)
        self.retry_gen = 0


def _ws_request(port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (zero mask key: valid, nothing to XOR); control frames only."""
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload


class Pool:
    """A worker's clients on one ``epoll`` loop, with a timer heap for leaves and retries.

    ``epoll`` directly rather than ``selectors``: the loop handles one event per message per
    client, and the wrapper's per-event objects were a good part of a worker's CPU."""

    def __init__(
        self,
        *,
        a_port: int,
        b_port: int,
        names: list[str],
        policy: Policy,
        connect_timeout: float,
        capacity: int,
        seed: int,
    ) -> None:
        self.a_port = a_port
        self.b_port = b_port
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.rng = random.Random(seed)
        self.epoll = select.epoll()
        #: Registered file descriptors: a connection, or None for a pipe (the worker's stdin).
        self.fds: dict[int, _Conn | None] = {}
        self.clients = [_Client(i, name, capacity) for i, name in enumerate(names)]
        self._timers: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._timer_seq = 0
        self.back = 0
        self.initial_done = 0
        self.latencies: list[float] = []
        self.failures: dict[str, int] = {}
        self.a_closed: dict[str, int] = {}
        self.closed_after_back: dict[str, int] = {}
        self.bad_frames = 0
        self.other_frames = 0
        self.last_progress = time.monotonic()
        self.finished = False

    # -- timers --------------------------------------------------------------------------------

    def call_at(self, when: float, callback: Callable[[Any], None], arg: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, callback, arg))

    def _run_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, callback, arg = heapq.heappop(self._timers)
            callback(arg)

    def _next_timeout(self, now: float, cap: float) -> float:
        if self._timers:
            return max(0.0, min(cap, self._timers[0][0] - now))
        return cap

    # -- the loop ------------------------------------------------------------------------------

    def poll(self, cap: float = 0.1) -> list[tuple[int, bytes]]:
        """One turn of the loop; returns lines read from registered pipes as (fd, data)."""
        now = time.monotonic()
        pipes: list[tuple[int, bytes]] = []
        fds = self.fds
        for fd, _ in self.epoll.poll(self._next_timeout(now, cap)):
            if fd not in fds:
                continue  # closed by an earlier event of this turn
            conn = fds[fd]
            if conn is None:
                chunk = os.read(fd, 4096)
                pipes.append((fd, chunk))
                if not chunk:
                    self.unregister(fd)
            elif conn.state == CONNECTING:
                self._on_connected(conn)
            else:
                self._on_readable(conn)
        self._run_timers(time.monotonic())
        return pipes

    def register(self, fd: int, conn: _Conn | None, events: int) -> None:
        self.epoll.register(fd, events)
        self.fds[fd] = conn

    def unregister(self, fd: int) -> None:
        if fd in self.fds:
            del self.fds[fd]
            self.epoll.unregister(fd)

    # -- connections ---------------------------------------------------------------------------

    def connect(self, client: _Client, server: str) -> None:
        """Start an attempt (non-blocking) to A or B; B attempts resume with ``?since=``."""
        now = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(client, server, sock, now)
        client.conn = conn
        if server == "A":
            timeout = INITIAL_ATTEMPT_TIMEOUT_S
        else:
            client.phase = ATTEMPTING
            client.attempts += 1
            timeout = self.connect_timeout if self.policy == "immediate" else PAGE_ATTEMPT_TIMEOUT_S
        port = self.a_port if server == "A" else self.b_port
        err = sock.connect_ex((HOST, port))
        self.register(sock.fileno(), conn, select.EPOLLOUT)
        if err not in (0, 115):  # EINPROGRESS
            self._closed(conn, 1006, f"connect:{os.strerror(err)}")
            return
        self.call_at(now + timeout, self._attempt_timeout, conn)

    def _path(self, conn: _Conn) -> str:
        client = conn.client
        query = []
        if conn.server == "B" and client.last_id is not None:
            query.append(f"since={client.last_id.decode()}")
        if client.key is not None:
            query.append(f"key={client.key}")
        return f"/ws/{client.name}" + ("?" + "&".join(query) if query else "")

    def _on_connected(self, conn: _Conn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._closed(conn, 1006, f"connect:{os.strerror(err)}")
            return
        port = self.a_port if conn.server == "A" else self.b_port
        try:
            conn.sock.send(_ws_request(port, self._path(conn)))
        except OSError as error:
            self._closed(conn, 1006, f"connect:{error.strerror}")
            return
        conn.state = HANDSHAKE
        self.epoll.modify(conn.sock.fileno(), select.EPOLLIN)

    def _attempt_timeout(self, conn: _Conn) -> None:
        if conn.state in (CONNECTING, HANDSHAKE, OPEN):
            self._closed(conn, 1006, f"{STATE_NAMES[conn.state]}:timeout")

    def _close_wait_timeout(self, conn: _Conn) -> None:
        if conn.state == CLOSING:
            self._closed(conn, 1006, "close-timeout")

    def _send(self, conn: _Conn, data: bytes) -> bool:
        try:
            conn.sock.send(data)
        except OSError:
            return False
        return True

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._closed(
                conn,
                1006,
                f"{STATE_NAMES[conn.state]}:{errno.errorcode.get(error.errno or 0, 'error')}",
            )
            return
        if not data:
            self._closed(conn, 1006, f"{STATE_NAMES[conn.state]}:eof")
            return
        if conn.state == HANDSHAKE:
            data = conn.buf + data
            head, sep, rest = data.partition(b"\r\n\r\n")
            if not sep:
                conn.buf = data
                return
            if not head.startswith(b"HTTP/1.1 101"):
                status = head.split(b"\r\n", 1)[0].decode(errors="replace")
                self._closed(conn, 1006, f"http:{status[9:12]}")
                return
            conn.state = OPEN
            conn.buf = b""
            if not rest:
                return
            data = rest
        elif conn.buf:
            data = conn.buf + data
        self._frames(conn, data)

    def _frames(self, conn: _Conn, data: bytes) -> None:
        """Every complete frame in ``data``; the hot path (one regular expression a message)."""
        client = conn.client
        on_b = conn.server == "B"
        match = MESSAGE.match
        n = len(data)
        pos = 0
        received = False
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            opcode = data[pos] & 0x0F
            pos = end
            if opcode == 1:
                if conn.state == CLOSING:
                    continue  # a closing WebSocket delivers nothing more (as in a browser)
                found = match(data, start, end)
                if found is not None and conn.state == LIVE:
                    seq = int(found[2])
                    seen = client.seen
                    if seq >= len(seen):
                        seen.extend(bytes(max(seq + 1 - len(seen), len(seen))))
                    if seen[seq]:
                        client.dups += 1
                    else:
                        seen[seq] = 1
                        client.got += 1
                        if on_b and not client.first_b_seq:
                            client.first_b_seq = seq
                    if found[1] is not None:
                        client.last_id = found[1]
                    received = True
                else:
                    self._on_json(conn, data[start:end])
                    if conn.state == DONE:
                        return
            elif opcode == 8:
                code = int.from_bytes(data[start : start + 2], "big") if length >= 2 else 1005
                if conn.state != CLOSING:
                    self._send(conn, _client_frame(8, data[start : start + 2]))
                self._closed(conn, code, f"close:{code}")
                return
            elif opcode == 9:
                self._send(conn, _client_frame(10, data[start:end]))
        conn.buf = data[pos:]
        if received:
            self.last_progress = time.monotonic()

    def _on_json(self, conn: _Conn, payload: bytes) -> None:
        try:
            frame = json.loads(payload)
        except ValueError:
            self.bad_frames += 1
            return
        client = conn.client
        kind = frame.get("type") if isinstance(frame, dict) else None
        now = time.monotonic()
        if kind == "welcome" and conn.state == OPEN:
            conn.state = LIVE
            conn.welcomed_at = now
            if isinstance(frame.get("resume_key"), str):
                client.key = frame["resume_key"]
            resumed = frame.get("resumed")
            if not resumed and client.last_id is None and frame.get("last_id"):
                client.last_id = str(frame["last_id"]).encode()
            if conn.server == "A":
                client.phase = ON_A
                self.initial_done += 1
                return
            client.phase = ON_B
            self.latencies.append(now - conn.started)
            client.resumes.append(
                (int(resumed["replayed"]), bool(resumed["complete"])) if resumed else None
            )
            if client.back_at is None:
                client.back_at = now
                self.back += 1
        elif kind == "shutdown" and conn.server == "A" and conn.state == LIVE:
            if client.shutdown_at is None:
                client.shutdown_at = now
            self._on_shutdown(conn, float(frame.get("seconds_left") or 0))
        elif kind in ("message", "periodic") and conn.state == LIVE:
            self.other_frames += 1
            if frame.get("id") is not None:
                client.last_id = str(frame["id"]).encode()
        else:
            self.other_frames += 1

    # -- the policies --------------------------------------------------------------------------

    def _on_shutdown(self, conn: _Conn, seconds_left: float) -> None:
        client = conn.client
        if client.phase != ON_A or self.finished:
            return
        if self.policy == "immediate":
            self._leave(conn)
            self.connect(client, "B")
        else:
            delay = self.rng.random() * min(MOVE_SPREAD_MAX_S, seconds_left / 2)
            client.phase = LEAVING
            self.call_at(time.monotonic() + delay, self._leave_timer, conn)

    def _leave_timer(self, conn: _Conn) -> None:
        if conn.client.conn is conn and conn.state == LIVE:
            self._leave(conn)

    def _leave(self, conn: _Conn) -> None:
        """Close our side (1000) and wait for the server's close frame, within bounds."""
        client = conn.client
        client.left_at = time.monotonic()
        client.conn = None
        client.phase = AWAY
        conn.state = CLOSING
        if not self._send(conn, _client_frame(8, (1000).to_bytes(2, "big") + b"moving")):
            self._closed(conn, 1006, "send")
            return
        self.call_at(time.monotonic() + CLOSE_WAIT_S, self._close_wait_timeout, conn)

    def _retry(self, client: _Client) -> None:
        """Schedule the next attempt on B, as the page's ``scheduleRetry`` does (full jitter)."""
        if self.finished:
            return
        if client.attempts >= MAX_ATTEMPTS:
            client.phase = GAVE_UP
            return
        client.phase = AWAY
        if self.policy == "immediate":
            self.connect(client, "B")
            return
        cap = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**client.failures)
        client.failures += 1
        client.retry_gen += 1
        self.call_at(
            time.monotonic() + self.rng.random() * cap,
            self._retry_timer,
            (client, client.retry_gen),
        )

    def _retry_timer(self, arg: tuple[_Client, int]) -> None:
        client, gen = arg
        if (
            client.retry_gen == gen
            and client.phase == AWAY
            and client.conn is None
            and not self.finished
        ):
            self.connect(client, "B")

    def _closed(self, conn: _Conn, code: int, why: str) -> None:
        """The end of a connection, however it ended; what the client does next."""
        state = conn.state
        if state == DONE:
            return
        conn.state = DONE
        self.unregister(conn.sock.fileno())
        conn.sock.close()
        client = conn.client
        if state == CLOSING:
            # Our own leave from A has completed: the page schedules its reconnect now.
            if self.policy == "page" and client.conn is None and client.phase == AWAY:
                self._retry(client)
            return
        if client.conn is not conn:
            return
        client.conn = None
        if conn.server == "A":
            if state != LIVE:
                client.phase = FAILED  # the initial connect failed
                self.failures[f"initial:{why}"] = self.failures.get(f"initial:{why}", 0) + 1
                self.initial_done += 1
                return
            # A closed us before we left (the drain deadline, or a network error).
            self.a_closed[why] = self.a_closed.get(why, 0) + 1
            client.left_at = time.monotonic()
            if client.shutdown_at is None:
                client.shutdown_at = client.left_at
        elif state != LIVE:
            self.failures[why] = self.failures.get(why, 0) + 1
        else:
            self.closed_after_back[why] = self.closed_after_back.get(why, 0) + 1
            if time.monotonic() - conn.welcomed_at >= STABLE_AFTER_S:
                client.failures = 0
        if code in STOP_CODES or 4500 <= code <= 4999:
            client.phase = STOPPED
            return
        self._retry(client)

    # -- the worker's phases -------------------------------------------------------------------

    def connect_all_to_a(self, deadline: float) -> None:
        pending = list(self.clients)
        pending.reverse()
        in_flight = 0
        while self.initial_done < len(self.clients) and time.monotonic() < deadline:
            in_flight = sum(1 for c in self.clients if c.phase == NEW and c.conn is not None)
            while pending and in_flight < INITIAL_CONCURRENCY:
                self.connect(pending.pop(), "A")
                in_flight += 1
            self.poll(0.05)

    def counts(self) -> dict[str, int]:
        phases = [c.phase for c in self.clients]
        return {
            "back": self.back,
            "stopped": phases.count(STOPPED) + phases.count(GAVE_UP) + phases.count(FAILED),
            "left": sum(1 for c in self.clients if c.left_at is not None),
            "warned": sum(1 for c in self.clients if c.shutdown_at is not None),
        }

    def complete(self, last_seq: int) -> bool:
        return all(c.got >= last_seq for c in self.clients if c.phase == ON_B)

    def result(self, last_seq: int) -> dict[str, Any]:
        lost: list[int | None] = []
        lost_gap: list[int] = []
        lost_live: list[int] = []
        for client in self.clients:
            if client.back_at is None:
                lost.append(None)
                continue
            seen = client.seen
            if len(seen) <= last_seq:
                seen.extend(bytes(last_seq + 1 - len(seen)))
            missing = last_seq - seen[1 : last_seq + 1].count(1)
            lost.append(missing)
            first = client.first_b_seq or last_seq + 1
            gap = (first - 1) - seen[1 : min(first, last_seq + 1)].count(1) if first > 1 else 0
            gap = max(0, min(gap, missing))
            lost_gap.append(gap)
            lost_live.append(missing - gap)
        return {
            "clients": len(self.clients),
            "connected_to_a": sum(1 for c in self.clients if c.phase != FAILED),
            "shutdown_at": [c.shutdown_at for c in self.clients],
            "left_at": [c.left_at for c in self.clients],
            "back_at": [c.back_at for c in self.clients],
            "phase": [c.phase for c in self.clients],
            "attempts": [c.attempts for c in self.clients],
            "connect_latency_s": self.latencies,
            "failures": self.failures,
            "a_closed": self.a_closed,
            "closed_after_back": self.closed_after_back,
            "lost": lost,
            "lost_gap": lost_gap,
            "lost_live": lost_live,
            "duplicates": [c.dups for c in self.clients],
            "resumes": [c.resumes for c in self.clients],
            "received": sum(c.got + c.dups for c in self.clients),
            "bad_frames": self.bad_frames,
            "other_frames": self.other_frames,
        }

    def close_all(self) -> None:
        for client in self.clients:
            if client.conn is not None:
                conn = client.conn
                conn.state = DONE
                self.unregister(conn.sock.fileno())
                conn.sock.close()
        self.epoll.close()


def _emit(kind: str, payload: object) -> None:
    sys.stdout.write(f"{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def worker_main(args: argparse.Namespace) -> None:
    """A worker process: ``READY``, then ``PROGRESS`` lines; on ``STOP <last seq>`` on stdin,
    wait for quiescence and print ``RESULT``; exit on EOF (or at ``--max-seconds``)."""
    started = time.monotonic()
    hard_deadline = started + args.max_seconds
    names = [f"{args.prefix}{i:05d}" for i in range(args.first, args.first + args.count)]
    pool = Pool(
        a_port=args.a_port,
        b_port=args.b_port,
        names=names,
        policy=args.policy,
        connect_timeout=args.connect_timeout,
        capacity=args.capacity,
        seed=args.seed,
    )
    cpu0 = own_cpu_s()
    pool.connect_all_to_a(min(hard_deadline, time.monotonic() + 60))
    _emit("READY", pool.counts())
    pool.register(sys.stdin.fileno(), None, select.EPOLLIN)
    stdin = b""
    last_seq: int | None = None
    stop_at = 0.0
    reported: dict[str, int] = {}
    last_report = 0.0
    eof = False
    while not eof and time.monotonic() < hard_deadline:
        for _, chunk in pool.poll(0.05):
            if not chunk:
                eof = True
            stdin += chunk
        while b"\n" in stdin:
            line, stdin = stdin.split(b"\n", 1)
            words = line.split()
            if words[:1] == [b"STOP"] and last_seq is None:
                last_seq = int(words[1])
                stop_at = time.monotonic()
        now = time.monotonic()
        if now - last_report >= 0.1:
            counts = pool.counts()
            if counts != reported:
                _emit("PROGRESS", counts)
                reported = counts
            last_report = now
        if last_seq is not None and not pool.finished:
            quiet = now - max(pool.last_progress, stop_at) >= QUIET_S
            if pool.complete(last_seq) or quiet or now - stop_at >= QUIESCE_MAX_S:
                pool.finished = True
                result = pool.result(last_seq)
                result["cpu_s"] = own_cpu_s() - cpu0
                result["quiesce_s"] = now - stop_at
                _emit("RESULT", result)
    pool.close_all()


# == the orchestrator ===========================================================================


@dataclass
class StormConfig:
    clients: int = 500
    rate: float = 50.0
    policy: Policy = "page"
    connect_timeout: float = 1.0
    #: Client worker processes; default one per 500 clients, at most 4.
    workers: int | None = None
    warmup_s: float = 3.0
    #: Stop waiting for every client to come back this long after SIGTERM.
    bound_s: float = 60.0
    #: Publishing goes on this long after all are back (B's steady CPU with every client).
    post_s: float = 3.0
    drain_timeout_s: float = 60.0
    seed: int | None = None
    #: Keep the servers' logs here (default: a temporary directory, removed).
    log_dir: str | None = None
    #: More launcher flags for both instances (bench/run.py's server kinds); later flags win.
    instance_args: tuple[str, ...] = ()


@dataclass
class StormResult:
    """A run's figures. Times are seconds from SIGTERM to A unless named otherwise."""

    config: dict[str, Any]
    clients: int
    connected_to_a: int
    published: int
    back: int
    never_back: int
    back_s: dict[str, float | None]
    connect_latency_s: dict[str, float | None]
    attempts: dict[str, Any]
    a_exit_s: float | None
    a_returncode: int | None
    lost: dict[str, int]
    duplicated: dict[str, int]
    resumes: dict[str, int]
    b_ready: dict[str, Any]
    b_broker: dict[str, Any]
    b_cpu: dict[str, Any]
    probe: dict[str, Any]
    publisher: dict[str, Any]
    machine: dict[str, Any]
    timeline: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Proc:
    """A subprocess of ours and its log file; stopped by its PID."""

    def __init__(self, name: str, process: trio.Process, log: Path | None) -> None:
        self.name = name
        self.process = process
        self.log = log
        self.exited_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 3000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]

    async def stop(self, sig: int = signal.SIGKILL, wait_s: float = 10.0) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            with trio.move_on_after(wait_s, shield=True):
                await self.process.wait()
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with trio.move_on_after(5, shield=True):
                    await self.process.wait()


async def _spawn(name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> _Proc:
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    return _Proc(name, process, log)


async def _http_get(port: int, path: str) -> tuple[int, dict[str, Any] | None]:
    """(status, JSON body) of a GET, within ``HTTP_TIMEOUT_S`` (the body read to its
    Content-Length: Hypercorn keeps the connection open). Errors: OSError, TooSlowError,
    ValueError for a malformed answer."""
    with trio.fail_after(HTTP_TIMEOUT_S):
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            length: int | None = None
            for _ in range(1000):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep and length is None:
                    found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                    length = int(found[1]) if found else None
                if sep and length is not None and len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return status, parsed if isinstance(parsed, dict) else None


async def _redis_up(port: int) -> bool:
    try:
        with trio.fail_after(1):
            stream = await trio.open_tcp_stream(HOST, port)
            async with stream:
                await stream.send_all(b"PING\r\n")
                return (await stream.receive_some(64)).startswith(b"+PONG")
    except (OSError, trio.TooSlowError):
        return False


async def _start_redis(tmp: Path, procs: list[_Proc]) -> tuple[_Proc, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (Debian: apt-get install redis-server)")
    port = free_port()
    proc = await _spawn(
        "redis",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        tmp / "redis.log",
    )
    procs.append(proc)
    with trio.fail_after(STARTUP_TIMEOUT_S):
        while not await _redis_up(port):
            if proc.process.returncode is not None:
                raise RuntimeError(f"redis-server did not start:\n{proc.log_tail()}")
            await trio.sleep(0.05)
    return proc, port


async def _start_instance(
    name: str, tmp: Path, redis_port: int, cfg: StormConfig, procs: list[_Proc]
) -> tuple[_Proc, int]:
    argv = [
        sys.executable,
        "-m",
        "trio_ws",
        "--host",
        HOST,
        "--port",
        "0",
        "--drain-timeout",
        str(cfg.drain_timeout_s),
        "--broadcast-interval",
        "0",
        "--ping-interval",
        "0",
        # The storm's publishers send bursts: no per-connection publish limit.
        "--publish-rate",
        "0",
        "--publish-bytes-rate",
        "0",
        *cfg.instance_args,
    ]
    env = {
        "TRIO_WS_REDIS_URL": f"redis://{HOST}:{redis_port}/0",
        "PYTHONUNBUFFERED": "1",
        # The poller reads the broker's state, which the public /health leaves out.
        "TRIO_WS_HEALTH_DETAIL": "on",
    }
    proc = await _spawn(name, argv, tmp / f"{name}.log", env)
    procs.append(proc)
    pattern = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
    with trio.fail_after(STARTUP_TIMEOUT_S):
        while True:
            if (match := pattern.search(proc.log_tail(100_000))) is not None:
                port = int(match[1])
                break
            if proc.process.returncode is not None:
                raise RuntimeError(f"instance {name} did not start:\n{proc.log_tail()}")
            await trio.sleep(0.05)
        while True:
            with contextlib.suppress(OSError, trio.TooSlowError, ValueError, IndexError):
                if (await _http_get(port, "/ready"))[0] == 200:
                    return proc, port
            await trio.sleep(0.05)


class _CpuMeter:
    """The machine's busy time against ours (this process and every one it started): the
    machine may be shared, and what others use there is noise in every figure of a run."""

    def __init__(self, procs: list[_Proc]) -> None:
        self.procs = procs
        self._last: dict[int, float] = {}

    def ours(self) -> float:
        for proc in self.procs:
            cpu = process_cpu_s(proc.pid)
            if cpu is not None and proc.process.returncode is None:
                self._last[proc.pid] = cpu  # last known: an exited process keeps its share
        return sum(self._last.values()) + own_cpu_s()

    def snapshot(self) -> tuple[float, float, float]:
        """(monotonic time, machine busy seconds, our CPU seconds)."""
        return time.monotonic(), machine_busy_s(), self.ours()

    @staticmethod
    def window(
        start: tuple[float, float, float], end: tuple[float, float, float]
    ) -> dict[str, Any]:
        """Cores busy over a window: the machine's, ours, and everything else's."""
        wall = end[0] - start[0]
        if wall <= 0:
            return {"seconds": 0.0}
        busy = (end[1] - start[1]) / wall
        ours = (end[2] - start[2]) / wall
        return {
            "seconds": _r(wall, 2),
            "busy_cores": _r(busy, 2),
            "ours_cores": _r(ours, 2),
            "others_cores": _r(max(0.0, busy - ours), 2),
        }


class _Worker:
    def __init__(self, proc: _Proc) -> None:
        self.proc = proc
        self.ready: dict[str, int] | None = None
        self.progress: dict[str, int] = {}
        self.result: dict[str, Any] | None = None
        self.changed = trio.Event()

    async def pump(self) -> None:
        stdout = self.proc.process.stdout
        assert stdout is not None
        buffer = b""
        async for chunk in stdout:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                kind, _, payload = line.decode().partition(" ")
                if kind == "READY":
                    self.ready = json.loads(payload)
                    self.progress = dict(self.ready or {})
                elif kind == "PROGRESS":
                    self.progress = json.loads(payload)
                elif kind == "RESULT":
                    self.result = json.loads(payload)
                self.changed.set()
                self.changed = trio.Event()
        self.changed.set()

    async def send(self, line: str) -> None:
        stdin = self.proc.process.stdin
        if stdin is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stdin.send_all(line.encode())


async def _wait_workers(workers: list[_Worker], done: Callable[[], bool], within: float) -> bool:
    """Wait (bounded) until ``done()``; re-checked whenever a worker reports or exits."""
    with trio.move_on_after(within):
        while not done():
            events = [w.changed for w in workers]
            async with trio.open_nursery() as nursery:

                async def wake(event: trio.Event, scope: trio.CancelScope) -> None:
                    await event.wait()
                    scope.cancel()

                for event in events:
                    nursery.start_soon(wake, event, nursery.cancel_scope)
                nursery.start_soon(_sleep_then_cancel, 0.5, nursery.cancel_scope)
        return True
    return done()


async def _sleep_then_cancel(seconds: float, scope: trio.CancelScope) -> None:
    await trio.sleep(seconds)
    scope.cancel()


class _Publisher:
    """Connected to B: sends ``S|<seq>|`` at a fixed rate and counts its own echoes."""

    def __init__(self) -> None:
        self.sent = 0
        self.echoes: set[int] = set()
        self.echo_dups = 0
        self.stop = trio.Event()
        self.stopped = trio.Event()
        self.errors: list[str] = []
        self.send_stalls = 0

    async def run(self, port: int, rate: float, *, task_status: trio.TaskStatus[Any]) -> None:
        try:
            async with open_websocket_url(f"ws://{HOST}:{port}/ws/storm-publisher") as ws:
                with trio.fail_after(10):
                    await ws.get_message()  # welcome
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, ws)
                    task_status.started(ws)
                    started = trio.current_time()
                    while not self.stop.is_set():
                        due = started + self.sent / rate
                        if due > trio.current_time():
                            with trio.move_on_at(due):
                                await self.stop.wait()
                            if self.stop.is_set():
                                break
                        elif trio.current_time() - due > 1.0:
                            self.send_stalls += 1
                        self.sent += 1
                        await ws.send_message(f"S|{self.sent}|storm")
                    self.stopped.set()
                    await trio.sleep_forever()
        except* WS_ERRORS as group:
            self.errors.extend(repr(error) for error in group.exceptions)
            self.stopped.set()

    async def _read(self, ws: Any) -> None:
        while True:
            text = await ws.get_message()
            frame = json.loads(text)
            if frame.get("type") != "message":
                continue
            if (match := TEXT_SEQ.match(frame.get("text", ""))) is not None:
                seq = int(match[1])
                if seq in self.echoes:
                    self.echo_dups += 1
                self.echoes.add(seq)


async def _probe(port: int, ws_pub: Any) -> dict[str, Any]:
    """A fresh client on B must receive a last message sent by the publisher."""
    token = f"PROBE|{random.randrange(10**9)}"
    out: dict[str, Any] = {"ok": False, "latency_s": None, "error": None}
    try:
        with trio.fail_after(PROBE_TIMEOUT_S * 2):
            async with open_websocket_url(f"ws://{HOST}:{port}/ws/storm-probe") as ws:
                welcome = json.loads(await ws.get_message())
                out["welcome"] = welcome.get("type")
                sent = trio.current_time()
                await ws_pub.send_message(token)
                with trio.fail_after(PROBE_TIMEOUT_S):
                    while True:
                        frame = json.loads(await ws.get_message())
                        if frame.get("type") == "message" and frame.get("text") == token:
                            out["ok"] = True
                            out["latency_s"] = round(trio.current_time() - sent, 4)
                            break
    except* WS_ERRORS as group:
        out["error"] = "; ".join(repr(error) for error in group.exceptions)
    return out


class _Poller:
    """B's /ready and /health every ``POLL_EVERY_S``."""

    def __init__(self, port: int, meter: _CpuMeter) -> None:
        self.port = port
        self.meter = meter
        self.ready_codes: dict[str, int] = {}
        self.ready_no_answer = 0
        self.ready_max_s = 0.0
        self.health_no_answer = 0
        self.broker_states: list[str] = []
        self.state_changes = 0
        self.timeline: list[dict[str, Any]] = []
        self.last_health: dict[str, Any] | None = None

    async def run(self) -> None:
        while True:
            tick = trio.current_time()
            sample: dict[str, Any] = {}
            started = trio.current_time()
            try:
                status, _ = await _http_get(self.port, "/ready")
                self.ready_codes[str(status)] = self.ready_codes.get(str(status), 0) + 1
                sample["ready"] = status
            except (OSError, trio.TooSlowError, ValueError, IndexError):
                self.ready_no_answer += 1
                sample["ready"] = None
            self.ready_max_s = max(self.ready_max_s, trio.current_time() - started)
            try:
                _, health = await _http_get(self.port, "/health")
            except (OSError, trio.TooSlowError, ValueError, IndexError):
                health = None
            if health is None:
                self.health_no_answer += 1
            else:
                self.last_health = health
                broker = health.get("broker") or {}
                state = str(broker.get("state"))
                if self.broker_states and state != self.broker_states[-1]:
                    self.state_changes += 1
                if not self.broker_states or state != self.broker_states[-1]:
                    self.broker_states.append(state)
                sample.update(
                    broker=state,
                    pending=broker.get("pending"),
                    last_id=broker.get("last_id"),
                    connections=health.get("active_connections"),
                    broadcast=health.get("messages_broadcast"),
                )
            sample["at"] = time.monotonic()  # made relative to SIGTERM in the result
            self.meter.ours()  # keeps the CPU of a process that exits (A) counted
            self.timeline.append(sample)
            await trio.sleep_until(max(trio.current_time(), tick + POLL_EVERY_S))


def _cpu_figures(
    *,
    base_rate: float | None,
    storm_cpu: float | None,
    storm_s: float,
    post_rate: float | None,
    clients: int,
    client_seconds: float,
    reconnects: int,
) -> dict[str, Any]:
    """B's CPU in the storm window, gross and net of an estimate of its fan-out.

    The fan-out estimate: B's CPU rate before SIGTERM (publisher only, no client) over the window,
    plus, per client-second spent on B during the window, the CPU a client costs B in steady state
    (the rate over ``post_s`` with every client back, minus that base rate, divided by N).
    """
    out: dict[str, Any] = {
        "window_s": _r(storm_s),
        "total_s": _r(storm_cpu),
        "per_reconnect_ms_gross": None,
        "fanout_estimate_s": None,
        "per_reconnect_ms_net": None,
        "base_rate": _r(base_rate),
        "steady_rate_all_back": _r(post_rate),
        "client_seconds_on_b_in_window": _r(client_seconds, 1),
    }
    if storm_cpu is None or not reconnects:
        return out
    out["per_reconnect_ms_gross"] = _r(storm_cpu / reconnects * 1000)
    if base_rate is not None and post_rate is not None and clients:
        per_client = max(0.0, post_rate - base_rate) / clients
        fanout = base_rate * storm_s + per_client * client_seconds
        out["fanout_estimate_s"] = _r(fanout)
        out["per_reconnect_ms_net"] = _r(max(0.0, storm_cpu - fanout) / reconnects * 1000)
    return out


def _count_summary(values: list[int]) -> dict[str, int]:
    return {
        "total": sum(values),
        "clients": sum(1 for v in values if v),
        "max": max(values, default=0),
    }


def _dist(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": _r(percentile(values, 0.50)),
        "p90": _r(percentile(values, 0.90)),
        "p99": _r(percentile(values, 0.99)),
        "max": _r(max(values) if values else None),
    }


async def run_storm(cfg: StormConfig) -> StormResult:
    """The whole scenario (see the module docstring); every process it starts is stopped."""
    if cfg.policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}")
    with contextlib.ExitStack() as stack:
        if cfg.log_dir is not None:
            tmp = Path(cfg.log_dir)
            await trio.Path(tmp).mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trio_ws-storm-")))
        with trio.fail_after(RUN_LIMIT_S):
            return await _run(cfg, tmp)


async def _run(cfg: StormConfig, tmp: Path) -> StormResult:
    seed = cfg.seed if cfg.seed is not None else random.randrange(10**9)
    procs: list[_Proc] = []
    notes: list[str] = []
    try:
        _, redis_port = await _start_redis(tmp, procs)
        a, a_port = await _start_instance("A", tmp, redis_port, cfg, procs)
        b, b_port = await _start_instance("B", tmp, redis_port, cfg, procs)
        meter = _CpuMeter(procs)

        n_workers = cfg.workers or max(1, min(4, math.ceil(cfg.clients / 500)))
        per = [
            cfg.clients // n_workers + (1 if i < cfg.clients % n_workers else 0)
            for i in range(n_workers)
        ]
        capacity = int(cfg.rate * (cfg.warmup_s + cfg.bound_s + cfg.post_s + 60)) + 16
        workers: list[_Worker] = []
        async with trio.open_nursery() as nursery:
            first = 0
            for i, count in enumerate(per):
                argv = [
                    sys.executable,
                    WORKER_SCRIPT,
                    "worker",
                    "--a-port",
                    str(a_port),
                    "--b-port",
                    str(b_port),
                    "--first",
                    str(first),
                    "--count",
                    str(count),
                    "--policy",
                    cfg.policy,
                    "--connect-timeout",
                    str(cfg.connect_timeout),
                    "--capacity",
                    str(capacity),
                    "--seed",
                    str(seed + i),
                    "--max-seconds",
                    str(RUN_LIMIT_S - 10),
                ]
                first += count
                process = await trio.lowlevel.open_process(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None
                )
                worker = _Worker(_Proc(f"worker{i}", process, None))
                procs.append(worker.proc)
                workers.append(worker)
                nursery.start_soon(worker.pump)

            def all_ready() -> bool:
                return all(
                    w.ready is not None or w.proc.process.returncode is not None for w in workers
                )

            if not await _wait_workers(workers, all_ready, 90):
                raise RuntimeError("the client workers did not connect to A within 90 s")
            # READY counts the clients whose connect to A failed as stopped.
            connected = cfg.clients - sum(
                (w.ready or {"stopped": count}).get("stopped", 0)
                for w, count in zip(workers, per, strict=True)
            )

            poller = _Poller(b_port, meter)
            nursery.start_soon(poller.run)

            publisher = _Publisher()
            ws_pub = await nursery.start(publisher.run, b_port, cfg.rate)

            async def watch_a() -> None:
                await a.process.wait()
                a.exited_at = time.monotonic()

            nursery.start_soon(watch_a)

            # Warm-up: B's CPU with the publisher only, and the machine's.
            m0 = meter.snapshot()
            b0 = process_cpu_s(b.pid)
            await trio.sleep(cfg.warmup_s)
            b1 = process_cpu_s(b.pid)
            m1 = meter.snapshot()
            base_rate = (b1 - b0) / cfg.warmup_s if b0 is not None and b1 is not None else None

            os.kill(a.pid, signal.SIGTERM)
            t0 = time.monotonic()

            def settled() -> bool:
                back = sum(
                    w.progress.get("back", 0) + w.progress.get("stopped", 0) for w in workers
                )
                return back >= cfg.clients or all(
                    w.proc.process.returncode is not None for w in workers
                )

            all_back = await _wait_workers(workers, settled, cfg.bound_s)
            t_back = time.monotonic()
            b2 = process_cpu_s(b.pid)
            m2 = meter.snapshot()
            post_rate = None
            if all_back and cfg.post_s > 0:
                await trio.sleep(cfg.post_s)
                b3 = process_cpu_s(b.pid)
                if b2 is not None and b3 is not None:
                    post_rate = (b3 - b2) / cfg.post_s
            m3 = meter.snapshot()
            publisher.stop.set()
            with trio.move_on_after(5):
                await publisher.stopped.wait()
            last_seq = publisher.sent
            for worker in workers:
                await worker.send(f"STOP {last_seq}\n")

            def all_results() -> bool:
                return all(
                    w.result is not None or w.proc.process.returncode is not None for w in workers
                )

            await _wait_workers(workers, all_results, QUIESCE_MAX_S + 10)
            with trio.move_on_after(QUIET_S):
                while len(publisher.echoes) < last_seq:  # noqa: ASYNC110  # a set, not an event
                    await trio.sleep(0.05)
            probe = (
                await _probe(b_port, ws_pub)
                if ws_pub is not None
                else {"ok": False, "error": "no publisher"}
            )
            await trio.sleep(POLL_EVERY_S)  # one more poll of B after the probe
            for worker in workers:
                stdin = worker.proc.process.stdin
                if stdin is not None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stdin.aclose()
            for worker in workers:
                with trio.move_on_after(10):
                    await worker.proc.process.wait()
            nursery.cancel_scope.cancel()
    finally:
        for proc in reversed(procs):
            await proc.stop(signal.SIGTERM if proc.name == "redis" else signal.SIGKILL)

    results = [w.result for w in workers if w.result is not None]
    if len(results) < len(workers):
        notes.append(f"{len(workers) - len(results)} client workers reported no result")

    def cat(key: str) -> list[Any]:
        return [x for r in results for x in r[key]]

    back_at: list[float | None] = cat("back_at")
    back_s = [b_at - t0 for b_at in back_at if b_at is not None]
    lost_all: list[int | None] = cat("lost")
    lost = [x for x in lost_all if x is not None]
    resumes_all: list[list[list[Any] | None]] = cat("resumes")
    first_resumes = [r[0] for r in resumes_all if r]
    incomplete_clients = sum(1 for r in resumes_all if any(x is not None and not x[1] for x in r))
    storm_s = t_back - t0
    client_seconds = sum(max(0.0, storm_s - x) for x in back_s)
    attempts: list[int] = cat("attempts")
    failures: dict[str, int] = {}
    closed_after: dict[str, int] = {}
    a_closed: dict[str, int] = {}
    for r in results:
        for source, target in (
            (r["failures"], failures),
            (r["closed_after_back"], closed_after),
            (r["a_closed"], a_closed),
        ):
            for key, value in source.items():
                target[key] = target.get(key, 0) + value
    shutdown_at = [x - t0 for x in cat("shutdown_at") if x is not None]
    left_at = [x - t0 for x in cat("left_at") if x is not None]
    lost_complete = [
        x
        for x, r in zip(lost_all, resumes_all, strict=True)
        if x is not None and r and all(y is not None and y[1] for y in r)
    ]
    worker_cpu = sum(r["cpu_s"] for r in results)

    b_cpu_storm = b2 - b1 if b1 is not None and b2 is not None else None
    final_health = poller.last_health or {}
    return StormResult(
        config={**asdict(cfg), "seed": seed, "workers": len(workers), "host_cpus": os.cpu_count()},
        clients=cfg.clients,
        connected_to_a=connected,
        published=last_seq,
        back=len(back_s),
        never_back=connected - len(back_s),
        back_s={**_dist(back_s), "all_back": all_back},
        connect_latency_s={
            **_dist(cat("connect_latency_s")),
            "count": len(cat("connect_latency_s")),
        },
        attempts={
            "total": sum(attempts),
            "max_per_client": max(attempts, default=0),
            "failed": failures,
            "closed_after_back": closed_after,
            "a_closed_first": a_closed,
            "warned_p99_s": _r(percentile(shutdown_at, 0.99)),
            "left_a_max_s": _r(max(left_at) if left_at else None),
        },
        a_exit_s=_r(a.exited_at - t0) if a.exited_at is not None else None,
        a_returncode=a.process.returncode,
        lost={
            **_count_summary(lost),
            "gap": sum(cat("lost_gap")),
            "live": sum(cat("lost_live")),
            "with_complete_resume": sum(lost_complete),
        },
        duplicated=_count_summary(cat("duplicates")),
        resumes={
            "resumed": sum(1 for r in first_resumes if r is not None),
            "without_since": sum(1 for r in first_resumes if r is None),
            "incomplete": sum(1 for r in resumes_all for x in r if x is not None and not x[1]),
            "incomplete_clients": incomplete_clients,
            "replayed_max": max((x[0] for r in resumes_all for x in r if x is not None), default=0),
        },
        b_ready={
            "codes": poller.ready_codes,
            "no_answer": poller.ready_no_answer,
            "ever_not_200": bool(set(poller.ready_codes) - {"200"}) or poller.ready_no_answer > 0,
            "slowest_s": _r(poller.ready_max_s),
        },
        b_broker={
            "states": poller.broker_states,
            "changed": poller.state_changes > 0,
            "health_no_answer": poller.health_no_answer,
            "final": final_health.get("broker"),
            "final_connections": final_health.get("active_connections"),
            "messages_broadcast": final_health.get("messages_broadcast"),
        },
        b_cpu=_cpu_figures(
            base_rate=base_rate,
            storm_cpu=b_cpu_storm,
            storm_s=storm_s,
            post_rate=post_rate,
            clients=len(back_s),
            client_seconds=client_seconds,
            reconnects=len(back_s),
        ),
        probe=probe,
        publisher={
            "sent": last_seq,
            "echo_lost": last_seq - len({s for s in publisher.echoes if s <= last_seq}),
            "echo_dups": publisher.echo_dups,
            "late_sends": publisher.send_stalls,
            "errors": publisher.errors,
        },
        machine={
            "cores": os.cpu_count(),
            "warmup": _CpuMeter.window(m0, m1),
            "storm": _CpuMeter.window(m1, m2),
            "post": _CpuMeter.window(m2, m3),
            "workers_cpu_s": _r(worker_cpu),
            "worker_frames": sum(r["received"] for r in results),
        },
        timeline=[{"t": round(x.pop("at") - t0, 2), **x} for x in poller.timeline],
        notes=notes,
    )


# == the command line ===========================================================================


def print_report(result: StormResult) -> None:
    cfg = result.config
    print(
        f"storm: {result.clients} clients, policy {cfg['policy']}"
        + (f" (connect timeout {cfg['connect_timeout']} s)" if cfg["policy"] == "immediate" else "")
        + f", {cfg['rate']:g} msg/s, {result.published} published, {cfg['workers']} client workers"
    )
    rows: list[tuple[str, str]] = []

    def fmt(value: object, unit: str = "") -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}{unit}"
        return f"{value}{unit}"

    back = result.back_s
    rows.append(
        (
            "back after SIGTERM p50/p90/p99/max",
            " / ".join(fmt(back[k], " s") for k in ("p50", "p90", "p99", "max")),
        )
    )
    rows.append(("clients back / never back", f"{result.back} / {result.never_back}"))
    lat = result.connect_latency_s
    rows.append(
        (
            "connect latency p50/p99/max (successful)",
            " / ".join(fmt(lat[k], " s") for k in ("p50", "p99", "max")),
        )
    )
    att = result.attempts
    rows.append(("attempts on B (max per client)", f"{att['total']} ({att['max_per_client']})"))
    rows.append(("failed attempts", json.dumps(att["failed"]) or "{}"))
    rows.append(("closed after back", json.dumps(att["closed_after_back"])))
    rows.append(
        ("A exit after SIGTERM", fmt(result.a_exit_s, " s") + f" (rc {result.a_returncode})")
    )
    lost = result.lost
    rows.append(
        (
            "lost: total (clients, max)",
            f"{lost['total']} ({lost['clients']}, {lost['max']}); gap {lost['gap']}, live "
            f"{lost['live']}, with a complete resume {lost['with_complete_resume']}",
        )
    )
    dup = result.duplicated
    rows.append(
        ("duplicated: total (clients, max)", f"{dup['total']} ({dup['clients']}, {dup['max']})")
    )
    res = result.resumes
    rows.append(
        (
            "resumes incomplete (clients) / max replayed",
            f"{res['incomplete']} ({res['incomplete_clients']}) / {res['replayed_max']}",
        )
    )
    ready = result.b_ready
    rows.append(
        (
            "B /ready ever not 200",
            f"{'yes' if ready['ever_not_200'] else 'no'} {json.dumps(ready['codes'])}, "
            f"no answer {ready['no_answer']}, slowest {fmt(ready['slowest_s'], ' s')}",
        )
    )
    broker = result.b_broker
    rows.append(
        (
            "B broker state changed",
            f"{'yes' if broker['changed'] else 'no'} ({' -> '.join(broker['states'])})",
        )
    )
    cpu = result.b_cpu
    rows.append(
        (
            "B CPU in storm window (gross/net per reconnect)",
            f"{fmt(cpu['total_s'], ' s')} over {fmt(cpu['window_s'], ' s')}; "
            f"{fmt(cpu['per_reconnect_ms_gross'], ' ms')} / "
            f"{fmt(cpu['per_reconnect_ms_net'], ' ms')}",
        )
    )
    probe = result.probe
    rows.append(
        (
            "B delivers at the end (probe)",
            ("yes" if probe["ok"] else "NO")
            + (f" ({probe['error']})" if probe.get("error") else ""),
        )
    )
    pub = result.publisher
    rows.append(("publisher echoes lost", str(pub["echo_lost"])))
    machine = result.machine
    rows.append(
        (
            f"cores busy of {machine['cores']}: all (others)",
            ", ".join(
                f"{k} {machine[k].get('busy_cores')} ({machine[k].get('others_cores')})"
                for k in ("warmup", "storm", "post")
            ),
        )
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for note in result.notes:
        print(f"  note: {note}")


def wait_for_idle_machine(limit_s: float, cores: float = 0.3) -> float:
    """Wait (at most ``limit_s``) until the machine has used less than ``cores`` over 2 s: on a
    shared machine, others' work is noise in every figure. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        before = machine_busy_s()
        time.sleep(2.0)
        if (machine_busy_s() - before) / 2.0 < cores:
            break
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        wp = argparse.ArgumentParser(prog="storm.py worker")
        wp.add_argument("--a-port", type=int, required=True)
        wp.add_argument("--b-port", type=int, required=True)
        wp.add_argument("--first", type=int, required=True)
        wp.add_argument("--count", type=int, required=True)
        wp.add_argument("--prefix", default="s")
        wp.add_argument("--policy", choices=POLICIES, required=True)
        wp.add_argument("--connect-timeout", type=float, default=1.0)
        wp.add_argument("--capacity", type=int, default=10_000)
        wp.add_argument("--seed", type=int, default=0)
        wp.add_argument("--max-seconds", type=float, default=RUN_LIMIT_S)
        worker_main(wp.parse_args(argv[1:]))
        return
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        description=doc.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="messages a second")
    parser.add_argument("--policy", choices=POLICIES, default="page")
    parser.add_argument("--connect-timeout", type=float, default=1.0, help="immediate only")
    parser.add_argument("--workers", type=int, help="client processes (default N/500, 1 to 4)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--bound", type=float, default=60.0, help="seconds after SIGTERM")
    parser.add_argument("--post", type=float, default=3.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--log-dir", help="keep the servers' logs here")
    parser.add_argument("--json", dest="json_path", help="write the result here")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for a quiet machine (under 0.3 cores busy)",
    )
    args = parser.parse_args(argv)
    cfg = StormConfig(
        clients=args.clients,
        rate=args.rate,
        policy=args.policy,
        connect_timeout=args.connect_timeout,
        workers=args.workers,
        warmup_s=args.warmup,
        bound_s=args.bound,
        post_s=args.post,
        seed=args.seed,
        log_dir=args.log_dir,
    )
    if args.wait_idle > 0:
        waited = wait_for_idle_machine(args.wait_idle)
        print(f"waited {waited:.0f} s for a quiet machine", file=sys.stderr)
    result = trio.run(run_storm, cfg)
    print_report(result)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result.to_json(), indent=2) + "\n")


if __name__ == "__main__":
    main()
