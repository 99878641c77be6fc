"""TLS through Hypercorn's certfile/keyfile: wss:// and https:// with a self-signed certificate."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import StartServer
from tests.wsutil import next_frame


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed (Debian package openssl; .ci/run installs it)"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


async def test_wss_and_https(start_server: StartServer, certificate: tuple[str, str]) -> None:
    cert, key = certificate
    server = await start_server(certfile=cert, keyfile=key)
    assert server.binds[0].startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=cert)
    async with open_websocket_url(server.ws_url + "/secure", ssl_context=context) as ws:
        assert (await next_frame(ws))["client_id"] == "secure"
        assert server.hub.registry.get("secure").writer == "direct"  # type: ignore[union-attr]
        await ws.send_message("over TLS")
        assert (await next_frame(ws))["text"] == "over TLS"
    host, port = server.binds[0].split("://")[1].rsplit(":", 1)
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=context)
    async with stream:
        await stream.send_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await stream.receive_some()).startswith(b"HTTP/1.1 200")


async def test_tls_offers_only_http_1_1(
    start_server: StartServer, certificate: tuple[str, str]
) -> None:
    """A client offering h2 first gets HTTP/1.1: no HTTP/2, so no WebSockets over HTTP/2, over
    TLS (docs/design/hypercorn.md, "HTTP/2")."""
    cert, key = certificate
    server = await start_server(certfile=cert, keyfile=key)
    context = ssl.create_default_context(cafile=cert)
    context.set_alpn_protocols(["h2", "http/1.1"])
    host, port = server.binds[0].split("://")[1].rsplit(":", 1)
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=context)
    async with stream:
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() == "http/1.1"
