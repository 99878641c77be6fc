"""How fast the drain reacts, in every run mode: ``python bench/drain_timing.py [--clients N]``.

For each mode it starts the server as a real process on a free loopback port, connects N
clients, sends SIGTERM to the PID an operator would signal, and measures:

* warn: from the signal until every client has received the ``shutdown`` frame;
* exit: from the moment the last client has closed until the process has exited;
* idle exit: from SIGTERM to exit with no client connected.

Every loop is bounded (N clients, 60 s per phase). Results print as a table and, with
``--json FILE``, are saved. Timings vary with the machine: compare modes within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import trio
from trio_websocket import open_websocket_url

BIN = os.path.dirname(sys.executable)
MODES: dict[str, list[str]] = {
    "launcher": [sys.executable, "-m", "trio_ws", "--port", "0"],
    "hypercorn (default, 1 worker)": [
        os.path.join(BIN, "hypercorn"),
        "-k",
        "trio",
        "-b",
        "127.0.0.1:0",
        "trio_ws.app:app",
    ],
    "hypercorn --workers 0": [
        os.path.join(BIN, "hypercorn"),
        "-k",
        "trio",
        "-w",
        "0",
        "-b",
        "127.0.0.1:0",
        "trio_ws.app:app",
    ],
}
ENV = {
    **os.environ,
    "PYTHONUNBUFFERED": "1",
    "TRIO_WS_BROADCAST_INTERVAL": "0",
    "TRIO_WS_LOG_LEVEL": "INFO",
    "TRIO_WS_DRAIN_TIMEOUT": "120",
}
PHASE_TIMEOUT_S = 60


async def start(argv: list[str], log: list[bytes] | None = None) -> tuple[trio.Process, str]:
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV
    )
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(PHASE_TIMEOUT_S):
        while (match := re.search(rb"Running on http://([\d.]+:\d+)", seen)) is None:
            seen += await process.stdout.receive_some()

    # Keep reading the log so the pipe never fills; keep it if asked.
    async def discard() -> None:
        assert process.stdout is not None
        async for chunk in process.stdout:
            if log is not None:
                log.append(bytes(chunk))

    trio.lowlevel.spawn_system_task(discard)
    return process, match.group(1).decode()


async def measure(argv: list[str], clients: int) -> dict[str, Any]:
    log: list[bytes] = []
    process, address = await start(argv, log)
    url = f"ws://{address}/ws"
    warned = 0
    all_warned = trio.Event()
    leave = trio.Event()
    closed = 0
    all_closed = trio.Event()

    async def client(i: int, connected: trio.Event) -> None:
        nonlocal warned, closed
        async with open_websocket_url(f"{url}/c{i}") as ws:
            await ws.get_message()  # welcome
            connected.set()
            while '"shutdown"' not in str(await ws.get_message()):
                pass
            warned += 1
            if warned == clients:
                all_warned.set()
            await leave.wait()
        closed += 1
        if closed == clients:
            all_closed.set()

    with trio.fail_after(PHASE_TIMEOUT_S * 3):
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                connected = trio.Event()
                nursery.start_soon(client, i, connected)
                await connected.wait()
            os.kill(process.pid, signal.SIGTERM)
            sent = time.monotonic()
            await all_warned.wait()
            warn_s = time.monotonic() - sent
            leave.set()
            await all_closed.wait()
            last_left = time.monotonic()
        await process.wait()
        exited_wall = time.time()
        exit_s = time.monotonic() - last_left
    # The server's own moment: its log line for the last client leaving.
    done = re.search(rb"(\d\d:\d\d:\d\d,\d{3}) INFO .*drain complete", b"".join(log))
    assert done is not None, "no 'drain complete' line"
    hms, ms = done.group(1).decode().split(",")
    h, m, sec = (int(x) for x in hms.split(":"))
    day = exited_wall - exited_wall % 86400
    server_done_wall = day + h * 3600 + m * 60 + sec + int(ms) / 1000

    idle, _ = await start(argv)
    with trio.fail_after(PHASE_TIMEOUT_S):
        os.kill(idle.pid, signal.SIGTERM)
        sent = time.monotonic()
        await idle.wait()
    return {
        "clients": clients,
        "warn_all_ms": round(warn_s * 1000, 1),
        "exit_after_last_left_ms": round(exit_s * 1000, 1),
        "exit_after_server_drained_ms": round((exited_wall - server_done_wall) * 1000, 1),
        "idle_exit_ms": round((time.monotonic() - sent) * 1000, 1),
        "returncode": process.returncode,
    }


async def main(clients: int, json_path: str | None) -> None:
    results = {}
    for name, argv in MODES.items():
        results[name] = await measure(argv, clients)
    print(
        f"{'mode':32} {'clients':>7} {'warn all':>10} {'exit after last':>16} "
        f"{'(server view)':>14} {'idle exit':>10} {'rc':>3}"
    )
    for name, r in results.items():
        print(
            f"{name:32} {r['clients']:>7} {r['warn_all_ms']:>8.1f}ms "
            f"{r['exit_after_last_left_ms']:>14.1f}ms "
            f"{r['exit_after_server_drained_ms']:>12.1f}ms {r['idle_exit_ms']:>8.1f}ms "
            f"{r['returncode']:>3}"
        )
    if json_path:
        await trio.Path(json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--ping-interval", help="TRIO_WS_PING_INTERVAL for the launcher")
    args = parser.parse_args()
    if args.ping_interval is not None:
        ENV["TRIO_WS_PING_INTERVAL"] = args.ping_interval
    trio.run(main, args.clients, args.json_path)
