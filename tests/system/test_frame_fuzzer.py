"""Random and mutated WebSocket frames from several raw-socket clients, for a bounded time: the
server must stay up, keep its memory bounded and keep serving a client connected before.

The run is reproducible from its seed (``TRIO_WS_FUZZ_SEED``; printed, and in every failure).
"""

from __future__ import annotations

import base64
import os
import random
import re
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable

import trio

from tests.hostile import BINARY, CLOSE, PING, TEXT, assert_still_served, bystander, client_frame
from tests.procutil import LAUNCHER, running

SEED = int(os.environ.get("TRIO_WS_FUZZ_SEED", "20261201"))
CLIENTS = 6
DURATION_S = 5.0
#: Bounds per client, whatever the time: connections opened, frames sent on each.
MAX_CONNECTIONS = 300
MAX_FRAMES = 30
#: The server's resident memory after the run (it starts near 50 MB).
MAX_RSS_KB = 300_000
ENV = {"TRIO_WS_BROADCAST_INTERVAL": "0", "TRIO_WS_DRAIN_TIMEOUT": "5"}


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _handshake(rng: random.Random, host: str, port: int) -> bytes:
    key = base64.b64encode(rng.randbytes(16)).decode()
    return (
        f"GET /ws/fuzz{rng.randrange(1000)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        + ("Sec-WebSocket-Extensions: permessage-deflate\r\n" if rng.random() < 0.3 else "")
        + "\r\n"
    ).encode()


def _garbage_handshake(rng: random.Random, host: str, port: int) -> bytes:
    good = _handshake(rng, host, port)
    choices: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randrange(1, 2000)),
        lambda: bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in good),
        lambda: good.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
        lambda: good.replace(b"Sec-WebSocket-Key", b"X-Nothing"),
        lambda: good[: rng.randrange(len(good))],
        lambda: good[:-2] + b"X-Big: " + b"a" * rng.randrange(10_000, 40_000) + b"\r\n\r\n",
        lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(rng.randrange(200)),
        lambda: good[:-2] + b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        lambda: b"GET /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    return rng.choice(choices)()


def _frame(rng: random.Random) -> bytes:
    """One frame (or a few), valid or broken in one of many ways."""
    text = bytes(rng.choice(b'abc xyz{}":') for _ in range(rng.randrange(0, 200)))
    kinds: list[Callable[[], bytes]] = [
        lambda: client_frame(TEXT, text),
        lambda: client_frame(TEXT, b"\xff\xfe" + text + b"\xc3"),  # bad UTF-8
        lambda: client_frame(BINARY, rng.randbytes(rng.randrange(100))),
        lambda: client_frame(rng.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), text),
        lambda: client_frame(TEXT, text, rsv=rng.randrange(1, 8)),
        lambda: client_frame(TEXT, text, masked=False),
        lambda: client_frame(TEXT, text, fin=False),  # a fragment, maybe never finished
        lambda: client_frame(0x0, text, fin=rng.random() < 0.5),  # continuation
        lambda: client_frame(PING, rng.randbytes(rng.randrange(126, 300))),  # control too long
        lambda: client_frame(PING, b"p", fin=False),  # fragmented control frame
        lambda: client_frame(PING, rng.randbytes(rng.randrange(126))),
        lambda: client_frame(CLOSE, struct.pack("!H", rng.randrange(65536)) + text[:100]),
        lambda: client_frame(CLOSE, b"x"),  # a close payload of one byte
        lambda: client_frame(TEXT, b"", length=rng.choice([2**63 - 1, 2**32, 70_000])),
        lambda: client_frame(TEXT, b"x" * rng.randrange(65_000, 80_000)),  # over 64 KiB
        lambda: rng.randbytes(rng.randrange(1, 64)),
        lambda: _mutate(rng, client_frame(TEXT, text)),
    ]
    return rng.choice(kinds)()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    flipped = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return bytes(flipped)


async def _read_some(sock: trio.socket.SocketType, seconds: float) -> bool:
    """Read (and discard) for up to ``seconds``; False once the server has closed."""
    with trio.move_on_after(seconds):
        while True:
            if not await sock.recv(65536):
                return False
    return True


async def _one_connection(rng: random.Random, host: str, port: int) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(2):
            await sock.connect((host, port))
            if rng.random() < 0.15:
                await sock.send(_garbage_handshake(rng, host, port))
                await _read_some(sock, 0.1)
                return
            await sock.send(_handshake(rng, host, port))
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = await sock.recv(4096)
                if not chunk:
                    return
                response += chunk
            for _ in range(rng.randrange(1, MAX_FRAMES + 1)):
                await sock.send(_frame(rng))
                if rng.random() < 0.2 and not await _read_some(sock, 0.01):
                    return
            await _read_some(sock, rng.choice([0, 0.05, 0.2]))
    except OSError:
        pass  # the server closed or reset this connection: expected
    finally:
        if rng.random() < 0.3:  # an abrupt end: RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def _fuzz_client(seed: int, host: str, port: int, deadline: float, done: list[int]) -> None:
    rng = random.Random(seed)
    for _ in range(MAX_CONNECTIONS):
        if time.monotonic() >= deadline:
            break
        await _one_connection(rng, host, port)
        done.append(1)


async def test_fuzzed_frames_end_only_their_own_connections() -> None:
    print(f"\nframe fuzzer seed {SEED} (TRIO_WS_FUZZ_SEED)", file=sys.stderr)
    async with running(LAUNCHER, ENV) as server:
        url = await server.ws_url()
        host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
        async with bystander(url) as ws:
            done: list[int] = []
            deadline = time.monotonic() + DURATION_S
            with trio.fail_after(DURATION_S + 15):
                async with trio.open_nursery() as nursery:
                    for index in range(CLIENTS):
                        nursery.start_soon(
                            _fuzz_client, SEED + index, host, int(port), deadline, done
                        )
            failure = f"fuzz seed {SEED}, after {len(done)} connections"
            assert server.process.returncode is None, f"{failure}: server exited\n{server.log}"
            rss = _rss_kb(server.pid)
            print(
                f"[measured] {len(done)} fuzzed connections; server RSS {rss} kB", file=sys.stderr
            )
            assert rss < MAX_RSS_KB, f"{failure}: RSS {rss} kB"
            await assert_still_served(server, url, ws)
        contained = Counter(
            match.group(1)
            for line in server.lines
            if (match := re.search(r"ended by an error inside Hypercorn \((.*?)\)", line))
        )
        print(f"[measured] errors inside Hypercorn contained: {contained}", file=sys.stderr)
        assert server.count("Traceback") == 0, f"{failure}:\n{server.log[-5000:]}"
