"""Helpers for the tests that run trio_ws where users run it: Debian's Chromium and nginx.

The system tools are required, not optional: when one is missing the test fails and says which
Debian package to install (`.ci/run` installs them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
#: Screenshots and logs of the live tests (gitignored, kept for CI to collect).
ARTIFACTS = ROOT / "tests" / "artifacts"


def require_tool(name: str, package: str, *candidates: str) -> str:
    """The path of a system tool; fail (not skip) the test when it is missing."""
    for path in (*candidates, shutil.which(name)):
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(
        f"{name} not found: install Debian's {package} package "
        f"(apt-get install -y {package}; .ci/run does it)",
        pytrace=False,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for nginx, which cannot report a port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Process:
    """A process in its own session with its output collected line by line (from a thread)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.popen = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = 10, start: int = 0) -> re.Match[str]:
        """The first line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if match := regex.search(line):
                        return match
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"{self.argv[0]} exited without {pattern!r}:\n{self.log}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.log}")
                self._changed.wait(min(left, 0.2))

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 10) -> int:
        returncode = self.popen.wait(timeout)
        self._reader.join(5)
        return returncode

    def stop(self) -> None:
        """Kill what is left of the process group this object started (by its PID)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        # Let the reader reach the pipe's end first: closing the pipe under a thread that is
        # still reading it raises in that thread (ValueError from PyMemoryView_FromBuffer).
        self._reader.join(5)
        if self.popen.stdout is not None and not self._reader.is_alive():
            self.popen.stdout.close()


class Server(Process):
    """``python -m trio_ws`` on 127.0.0.1."""

    def __init__(self, port: int = 0, env: Mapping[str, str] | None = None) -> None:
        argv = [sys.executable, "-m", "trio_ws", "--host", "127.0.0.1", "--port", str(port)]
        super().__init__(argv, env)
        try:
            match = self.wait_for_line(r"Running on (http://127\.0\.0\.1:(\d+))", timeout=20)
        except BaseException:
            self.stop()
            raise
        self.base_url = match.group(1)
        self.port = int(match.group(2))


@contextmanager
def server(port: int = 0, env: Mapping[str, str] | None = None) -> Iterator[Server]:
    process = Server(port, env)
    try:
        yield process
    finally:
        process.stop()


def nginx_site(
    listen_port: int,
    upstream_ports: Sequence[int],
    read_timeout: str | None = None,
    down: Sequence[int] = (),
    access_log: Path | None = None,
) -> str:
    """The shipped ``deploy/nginx.conf`` with the test's ports (and, for the idle test, a shorter
    ``proxy_read_timeout``), its access log in ``access_log`` (or off). Every edit must find what
    it replaces: a change to the shipped file that breaks these assumptions fails the tests
    instead of going unchecked."""
    text = (DEPLOY / "nginx.conf").read_text()

    def replace(pattern: str, new: str, count: int) -> None:
        nonlocal text
        text, found = re.subn(pattern, new, text, flags=re.MULTILINE)
        assert found == count, f"deploy/nginx.conf: expected {count} x {pattern!r}, found {found}"

    # Every server of the upstream block, whatever its options, becomes the test's servers.
    block = re.search(r"^upstream trio_ws \{\n(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    assert block is not None, "deploy/nginx.conf: no upstream trio_ws block"
    body = block.group(1)
    kept = [line for line in body.splitlines(True) if not re.match(r"\s*server\s", line)]
    assert len(kept) < len(body.splitlines(True)), "deploy/nginx.conf: no server in upstream"
    servers = "".join(
        f"    server 127.0.0.1:{port}{' down' if port in down else ''};\n"
        for port in upstream_ports
    )
    text = text[: block.start(1)] + "".join(kept) + servers + text[block.end(1) :]
    replace(r"^    listen 80;$", f"    listen 127.0.0.1:{listen_port};", 1)
    replace(r"^    listen \[::\]:80;\n", "", 1)
    if read_timeout is not None:
        replace(r"proxy_read_timeout \S+;", f"proxy_read_timeout {read_timeout};", 1)
    log = f"{access_log} trio_ws_noquery" if access_log is not None else "off"
    replace(
        r"access_log /var/log/nginx/trio-ws\.access\.log trio_ws_noquery;", f"access_log {log};", 1
    )
    return text


def nginx_command(
    workdir: Path,
    listen_port: int,
    upstream_ports: Sequence[int],
    read_timeout: str | None = None,
    down: Sequence[int] = (),
) -> list[str]:
    """Write a minimal main config that includes the site from the http {} block, as the shipped
    file says to, and return the command that runs nginx in the foreground on it."""
    nginx = require_tool("nginx", "nginx", "/usr/sbin/nginx")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # nginx's workers may run as an unprivileged user
    site = workdir / "trio-ws.conf"
    site.write_text(
        nginx_site(listen_port, upstream_ports, read_timeout, down, workdir / "access.log")
    )
    main = workdir / "nginx.conf"
    temp = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main.write_text(
        f"""daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log stderr info;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp}
    include {site};
}}
"""
    )
    return [nginx, "-p", str(workdir), "-e", "stderr", "-c", str(main)]


class Nginx(Process):
    """Debian's nginx in the foreground on the shipped site config, on a free port."""

    def __init__(self, workdir: Path, upstream_ports: Sequence[int], **options: Any) -> None:
        self.workdir = workdir
        self.port = free_port()
        super().__init__(nginx_command(workdir, self.port, upstream_ports, **options))
        try:
            wait_for_port(self.port)
        except BaseException:
            self.stop()
            raise
        self.base_url = f"http://127.0.0.1:{self.port}"

    def reload(self, upstream_ports: Sequence[int], **options: Any) -> None:
        """Rewrite the site config and reload (SIGHUP to the master, as `nginx -s reload`);
        return once the new workers run."""
        start = len(self.lines)
        nginx_command(self.workdir, self.port, upstream_ports, **options)
        self.signal(signal.SIGHUP)
        self.wait_for_line(r"reconfiguring", start=start)
        self.wait_for_line(r"start worker process", start=start)


@contextmanager
def nginx(workdir: Path, upstream_ports: Sequence[int], **options: Any) -> Iterator[Nginx]:
    process = Nginx(workdir, upstream_ports, **options)
    try:
        yield process
    finally:
        process.stop()
