"""Settings: one frozen object, read from ``TRIO_WS_*`` environment variables and flags.

Every run mode reads the same variables, so a server started by ``hypercorn`` behaves like one
started by ``python -m trio_ws``. Parsing is pure and raises :class:`SettingsError` with a message
that names the variable and the value it refused.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import urllib.parse
from dataclasses import dataclass, field as dataclass_field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

ENV_PREFIX = "TRIO_WS_"

_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")

#: ``TRIO_WS_CLIENT_PUBLISH``: who among the WebSocket clients may publish.
CLIENT_PUBLISH_POLICIES = ("all", "token", "none")

MIN_API_KEY_LENGTH = 16

#: The API's ``from``: ``@`` and what a client id may hold, so it never equals a client's id.
_PUBLISHER_PATTERN = re.compile(r"@[A-Za-z0-9_.\-]{1,63}")
#: ``TRIO_WS_JWT_ALGORITHM``: HMAC ones verify with a secret, the others with a public key.
#: ``none`` is not among them: an unsigned token is never accepted.
JWT_HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
JWT_PUBLIC_KEY_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

#: The shortest HMAC secret accepted (RFC 7518 section 3.2 asks for the hash's size, 32 bytes
#: for HS256).
JWT_MIN_SECRET_BYTES = 32

#: ``TRIO_WS_LOG_CONNECTIONS``: a line per connect and disconnect, or a summary every 10 s.
LOG_CONNECTIONS = ("each", "summary")


class SettingsError(ValueError):
    """A setting has a value the server cannot run with."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The server's whole configuration; every time is in seconds, every size in bytes."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: How long a drain may last before the remaining clients are closed with 1001.
    drain_timeout: float = 1800.0
    #: How often the server sends its ``periodic`` frame; 0 turns it off.
    broadcast_interval: float = 10.0
    #: Most often clients are told that the connection count changed (a ``presence`` frame);
    #: 0 turns it off.
    presence_interval: float = 1.0
    #: How often the drain logs its progress.
    progress_interval: float = 10.0
    #: Largest message a client may send, in bytes of UTF-8; larger ones are closed with 1009,
    #: as soon as the bytes over the limit arrive.
    max_message_size: int = 64 * 1024
    #: Whether to negotiate permessage-deflate with clients that offer it (inflation is capped
    #: at ``max_message_size``); off: no extension is negotiated.
    compression: bool = False
    #: Frames queued for one client before it counts as slow and is disconnected (4008); a
    #: resuming client is replayed at most half as many.
    queue_size: int = 4096
    #: Bytes queued for one client (frames as written) before it counts as slow (4008); a
    #: resuming client is replayed the newest broadcasts that fit in half of it.
    outbox_bytes: int = 1 << 20
    #: WebSocket ping interval (keeps idle clients alive behind proxies); 0 turns pings off.
    ping_interval: float = 20.0
    #: TCP_USER_TIMEOUT for accepted sockets: a peer that acknowledges nothing for this long is
    #: dropped, so a client that stopped reading cannot hold a send forever. 0 leaves the kernel's.
    stall_timeout: float = 30.0
    log_level: str = "INFO"
    certfile: str | None = None
    keyfile: str | None = None
    #: ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``): broadcasts go through
    #: Redis to every worker and instance. None: in-process, for one process.
    redis_url: str | None = None
    #: Prefix of every Redis key, so several trio_ws clusters can share one Redis.
    redis_prefix: str = "trio_ws"
    #: Broadcasts kept in the Redis Stream (approximately): the replay window after an outage.
    redis_stream_maxlen: int = 10_000
    #: WebSockets this process holds; more are closed with 1013. Lowered at start-up to fit
    #: the file limit (docs/operations.md, "Connection limits").
    max_connections: int = 10_000
    #: WebSockets one client address holds; 0 turns the limit off.
    max_connections_per_ip: int = 0
    #: Handshakes per second one client address may start (a token bucket holding one second
    #: of them); 0 turns the limit off.
    handshake_rate_per_ip: float = 0.0
    #: Addresses and networks of the proxies whose X-Forwarded-For / Forwarded is believed.
    trusted_proxies: tuple[str, ...] = ()
    #: Messages a second one connection may publish (a token bucket); 0 turns it off. Over
    #: it, the server stops reading that client; 10 s over it in a row: closed with 1008.
    publish_rate: float = 10.0
    #: Messages one connection may publish at once, above ``publish_rate`` (the bucket's size).
    publish_burst: int = 20
    #: Bytes a second one connection may publish (UTF-8; a bucket of one second, and at least
    #: one ``max_message_size``); 0 turns it off.
    publish_bytes_rate: int = 64 * 1024
    #: Which clients may publish: ``all``, ``token`` (only connections that presented a valid
    #: token) or ``none`` (listen-only: only backends publish, through ``POST /publish``).
    client_publish: str = "all"
    #: The bearer key of the HTTP API (``POST /publish``, ``DELETE /clients/<id>``, the detail
    #: of ``/health``). None: the API does not exist (404). At least 16 characters.
    api_key: str | None = dataclasses.field(default=None, repr=False)
    #: A file holding ``api_key`` (read at start-up, surrounding whitespace stripped); set one
    #: of the two, not both.
    api_key_file: str | None = None
    #: The ``from`` of messages published through the API. It starts with ``@``, which no
    #: client id may contain, so no client can pose as the server.
    api_publisher_name: str = "@server"
    #: Whether anyone may read the full ``/health`` (pid, version, broker address, errors);
    #: off: only with the API key, the public gets status and counts.
    health_detail: bool = False
    #: Redis memory the stream of broadcasts may take. The stream keeps at most as many
    #: broadcasts as fit when each is of ``max_message_size`` (see :func:`stream_entry_bytes`),
    #: and at most ``redis_stream_maxlen``: :attr:`redis_stream_entries`.
    redis_stream_max_bytes: int = 64 * 1024 * 1024
    #: Seconds a client has to send anything (a pong, any frame) after a ping before it is
    #: closed with 4010; 0 turns the check off (pings still go out).
    pong_timeout: float = 20.0
    #: Origins whose pages may open a WebSocket (``https://app.example.com``; ``*``: any).
    #: Empty: a handshake with an ``Origin`` must come from the same origin. Handshakes without
    #: ``Origin`` (programs, not browsers) are not concerned.
    allowed_origins: tuple[str, ...] = ()
    #: The HMAC secret that signs tokens; setting it (or the two below) turns tokens on.
    jwt_secret: str | None = dataclass_field(default=None, repr=False)
    #: A file holding the HMAC secret (read at start-up; surrounding whitespace ignored).
    jwt_secret_file: str | None = None
    #: A PEM public key file, for RS256/ES256/... tokens.
    jwt_public_key_file: str | None = None
    #: The one algorithm tokens must be signed with.
    jwt_algorithm: str = "HS256"
    #: When set, a token's ``aud`` must contain it.
    jwt_audience: str | None = None
    #: When set, a token's ``iss`` must be it.
    jwt_issuer: str | None = None
    #: Memory this process may hold in messages published here and not yet seen back from
    #: Redis (during an outage, above all); each counted as its text, its sender and 64 bytes.
    #: Past it: backpressure while Redis is up, the oldest not sent to the cluster while down.
    redis_pending_max_bytes: int = 32 * 1024 * 1024
    #: ``text`` (one readable line per event) or ``json`` (one JSON object per line, for log
    #: shippers).
    log_format: str = "text"
    #: TCP port of the Prometheus endpoint (``/metrics``); 0 (the default) serves none. Under
    #: Hypercorn's ``--workers N`` one worker serves the whole group's figures on it.
    metrics_port: int = 0
    #: Address the metrics port listens on: loopback by default, since ``/metrics`` has no
    #: authentication; ``0.0.0.0`` for a scraper on another host (a Kubernetes pod IP).
    metrics_host: str = "127.0.0.1"
    #: How connects and disconnects are logged: ``each``, an INFO line for every one; or
    #: ``summary``, those lines at DEBUG and one INFO line with the counts every 10 s while
    #: clients come and go (a reconnect storm of thousands then costs no log line each).
    log_connections: str = "each"

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", self.port, "a TCP port from 0 to 65535")
        _check(self.drain_timeout >= 0, "drain_timeout", self.drain_timeout, "seconds >= 0")
        _check(
            self.broadcast_interval >= 0,
            "broadcast_interval",
            self.broadcast_interval,
            "seconds >= 0 (0 turns it off)",
        )
        _check(
            self.presence_interval == 0 or self.presence_interval >= 0.1,
            "presence_interval",
            self.presence_interval,
            "seconds >= 0.1, or 0 (off)",
        )
        _check(
            self.progress_interval >= 0.1,
            "progress_interval",
            self.progress_interval,
            "seconds >= 0.1",
        )
        _check(
            self.max_message_size >= 1024,
            "max_message_size",
            self.max_message_size,
            "bytes >= 1024",
        )
        _check(self.queue_size >= 1, "queue_size", self.queue_size, "an integer >= 1")
        _check(
            self.outbox_bytes >= 2 * self.max_message_size + 1024,
            "outbox_bytes",
            self.outbox_bytes,
            f"bytes >= 2 x max_message_size + 1024 ({2 * self.max_message_size + 1024})",
        )
        _check(self.ping_interval >= 0, "ping_interval", self.ping_interval, "seconds >= 0")
        _check(
            self.pong_timeout >= 0,
            "pong_timeout",
            self.pong_timeout,
            "seconds >= 0 (0 turns it off)",
        )
        _check(self.stall_timeout >= 0, "stall_timeout", self.stall_timeout, "seconds >= 0")
        _check(self.log_level in LOG_LEVELS, "log_level", self.log_level, " or ".join(LOG_LEVELS))
        _check(
            self.redis_url is None
            or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "redis_url",
            self.redis_url,
            "a redis://, rediss:// or unix:// URL",
        )
        _check(
            _PREFIX_PATTERN.fullmatch(self.redis_prefix) is not None,
            "redis_prefix",
            self.redis_prefix,
            "1-64 characters of A-Z a-z 0-9 _ . : -",
        )
        _check(
            self.redis_stream_maxlen >= 100,
            "redis_stream_maxlen",
            self.redis_stream_maxlen,
            "an integer >= 100",
        )
        # Checked with Redis only: a single process that allows large messages needs no budget.
        smallest_budget = MIN_STREAM_ENTRIES * stream_entry_bytes(self.max_message_size)
        _check(
            self.redis_url is None or self.redis_stream_max_bytes >= smallest_budget,
            "redis_stream_max_bytes",
            self.redis_stream_max_bytes,
            f"bytes >= {MIN_STREAM_ENTRIES} broadcasts of max_message_size ({smallest_budget})",
        )
        smallest_pending = MIN_PENDING_MESSAGES * self.max_message_size
        _check(
            self.redis_url is None or self.redis_pending_max_bytes >= smallest_pending,
            "redis_pending_max_bytes",
            self.redis_pending_max_bytes,
            f"bytes >= {MIN_PENDING_MESSAGES} messages of max_message_size ({smallest_pending})",
        )
        _check(self.publish_rate >= 0, "publish_rate", self.publish_rate, "messages/s >= 0")
        _check(self.publish_burst >= 0, "publish_burst", self.publish_burst, "an integer >= 0")
        _check(
            self.publish_bytes_rate >= 0,
            "publish_bytes_rate",
            self.publish_bytes_rate,
            "bytes/s >= 0",
        )
        _check(
            self.max_connections >= 1, "max_connections", self.max_connections, "an integer >= 1"
        )
        _check(
            self.max_connections_per_ip >= 0,
            "max_connections_per_ip",
            self.max_connections_per_ip,
            "an integer >= 0 (0 turns it off)",
        )
        _check(
            self.handshake_rate_per_ip >= 0,
            "handshake_rate_per_ip",
            self.handshake_rate_per_ip,
            "handshakes per second >= 0 (0 turns it off)",
        )
        for entry in self.trusted_proxies:
            _check(
                _is_network(entry),
                "trusted_proxies",
                entry,
                "IP addresses or networks (CIDR), separated by commas",
            )
        for entry in self.allowed_origins:
            _check(
                entry in ("*", "null") or _is_origin(entry),
                "allowed_origins",
                entry,
                "origins such as https://app.example.com (or * or null), separated by commas",
            )
        keys = [self.jwt_secret, self.jwt_secret_file, self.jwt_public_key_file]
        _check(
            sum(key is not None for key in keys) <= 1,
            "jwt_secret",
            "***",
            "set alone: give one of TRIO_WS_JWT_SECRET, TRIO_WS_JWT_SECRET_FILE and "
            "TRIO_WS_JWT_PUBLIC_KEY_FILE",
        )
        _check(
            self.jwt_algorithm in JWT_HMAC_ALGORITHMS + JWT_PUBLIC_KEY_ALGORITHMS,
            "jwt_algorithm",
            self.jwt_algorithm,
            "one of " + " ".join(JWT_HMAC_ALGORITHMS + JWT_PUBLIC_KEY_ALGORITHMS),
        )
        if self.jwt_public_key_file is not None:
            _check(
                self.jwt_algorithm in JWT_PUBLIC_KEY_ALGORITHMS,
                "jwt_algorithm",
                self.jwt_algorithm,
                "a public-key algorithm (RS256, ES256, ...) with TRIO_WS_JWT_PUBLIC_KEY_FILE",
            )
        elif self.tokens_enabled:
            _check(
                self.jwt_algorithm in JWT_HMAC_ALGORITHMS,
                "jwt_algorithm",
                self.jwt_algorithm,
                "HS256, HS384 or HS512 with a secret (a public-key algorithm needs "
                "TRIO_WS_JWT_PUBLIC_KEY_FILE)",
            )
        if self.jwt_secret is not None:
            _check(
                len(self.jwt_secret.encode()) >= JWT_MIN_SECRET_BYTES,
                "jwt_secret",
                "***",
                f"at least {JWT_MIN_SECRET_BYTES} bytes",
            )
        _check(
            self.client_publish in CLIENT_PUBLISH_POLICIES,
            "client_publish",
            self.client_publish,
            " or ".join(CLIENT_PUBLISH_POLICIES),
        )
        if self.client_publish == "token" and not self.tokens_enabled:
            # Without tokens no connection could ever publish: a listen-only server set up by
            # mistake. Say so at start-up rather than refuse every message.
            raise SettingsError(
                f"{ENV_PREFIX}CLIENT_PUBLISH=token needs tokens ({ENV_PREFIX}JWT_SECRET, "
                f"{ENV_PREFIX}JWT_SECRET_FILE or {ENV_PREFIX}JWT_PUBLIC_KEY_FILE); "
                f"for a listen-only server set {ENV_PREFIX}CLIENT_PUBLISH=none"
            )
        _check(
            self.api_key is None or len(self.api_key) >= MIN_API_KEY_LENGTH,
            "api_key",
            "<hidden>",
            f"at least {MIN_API_KEY_LENGTH} characters (e.g. from `openssl rand -hex 32`)",
        )
        _check(
            self.api_key is None or (self.api_key.isprintable() and self.api_key.isascii()),
            "api_key",
            "<hidden>",
            "printable ASCII characters (it travels in an HTTP header)",
        )
        _check(
            _PUBLISHER_PATTERN.fullmatch(self.api_publisher_name) is not None,
            "api_publisher_name",
            self.api_publisher_name,
            "@ followed by 1-63 characters of A-Z a-z 0-9 _ . -",
        )
        _check(self.log_format in LOG_FORMATS, "log_format", self.log_format, "text or json")
        _check(
            0 <= self.metrics_port <= 65535,
            "metrics_port",
            self.metrics_port,
            "a TCP port from 1 to 65535, or 0 (off)",
        )
        _check(
            self.metrics_port == 0 or self.metrics_port != self.port,
            "metrics_port",
            self.metrics_port,
            "a port other than TRIO_WS_PORT",
        )
        _check(
            self.log_connections in LOG_CONNECTIONS,
            "log_connections",
            self.log_connections,
            " or ".join(LOG_CONNECTIONS),
        )
        _check(
            (self.certfile is None) == (self.keyfile is None),
            "certfile",
            self.certfile,
            "set together with keyfile (TLS needs both)",
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from ``TRIO_WS_*`` variables; ``overrides`` (flags) win over them.

        Errors: :class:`SettingsError` names the variable and the value it could not use.
        """
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = ENV_PREFIX + field.name.upper()
            raw = environ.get(name)
            if raw is None or raw.strip() == "":
                continue
            values[field.name] = _parse(name, raw.strip(), _PARSERS[field.name])
        values.update({key: value for key, value in overrides.items() if value is not None})
        key_file = values.get("api_key_file")
        if key_file is not None:
            if values.get("api_key") is not None:
                raise SettingsError(
                    f"{ENV_PREFIX}API_KEY and {ENV_PREFIX}API_KEY_FILE are both set: set one"
                )
            values["api_key"] = read_secret_file(ENV_PREFIX + "API_KEY_FILE", key_file)
        return cls(**values)

    @property
    def tokens_enabled(self) -> bool:
        """Whether clients must present a signed token (a key for them is configured)."""
        return any(
            key is not None
            for key in (self.jwt_secret, self.jwt_secret_file, self.jwt_public_key_file)
        )

    @property
    def resume_bytes(self) -> int:
        """Most bytes of history a resuming client is replayed: half its outbox, so that what
        arrives live meanwhile still fits."""
        return self.outbox_bytes // 2

    @property
    def redis_stream_entries(self) -> int:
        """Most broadcasts the Redis stream keeps: ``redis_stream_maxlen``, or fewer, so that
        as many maximum-size broadcasts take at most ``redis_stream_max_bytes`` of Redis."""
        fitting = self.redis_stream_max_bytes // stream_entry_bytes(self.max_message_size)
        return min(self.redis_stream_maxlen, fitting)

    def with_changes(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One log-friendly line with every setting that changes behaviour."""
        return (
            f"drain_timeout={self.drain_timeout:g}s "
            f"broadcast_interval={self.broadcast_interval:g}s "
            f"progress_interval={self.progress_interval:g}s "
            f"presence_interval={self.presence_interval:g}s "
            f"max_message_size={self.max_message_size} "
            f"compression={'on' if self.compression else 'off'} queue_size={self.queue_size} "
            f"outbox_bytes={self.outbox_bytes} "
            f"ping_interval={self.ping_interval:g}s pong_timeout={self.pong_timeout:g}s "
            f"stall_timeout={self.stall_timeout:g}s "
            f"publish_rate={self.publish_rate:g}/s publish_burst={self.publish_burst} "
            f"publish_bytes_rate={self.publish_bytes_rate}/s "
            f"log_level={self.log_level} broker={self.broker_description} "
            f"max_connections={self.max_connections} "
            f"max_connections_per_ip={self.max_connections_per_ip} "
            f"handshake_rate_per_ip={self.handshake_rate_per_ip:g} "
            f"trusted_proxies={','.join(self.trusted_proxies) or 'none'} "
            f"client_publish={self.client_publish} "
            f"api={'on' if self.api_key is not None else 'off'} "
            f"health_detail={'on' if self.health_detail else 'off'} "
            f"allowed_origins={','.join(self.allowed_origins) or 'same-origin'} "
            f"tokens={self.jwt_algorithm if self.tokens_enabled else 'off'} "
            f"log_format={self.log_format} metrics={self.metrics_description} "
            f"log_connections={self.log_connections}"
        )

    @property
    def metrics_description(self) -> str:
        if self.metrics_port == 0:
            return "off"
        host = f"[{self.metrics_host}]" if ":" in self.metrics_host else self.metrics_host
        return f"http://{host}:{self.metrics_port}/metrics"

    @property
    def broker_description(self) -> str:
        if self.redis_url is None:
            return "in-process"
        return f"redis ({redact_url(self.redis_url)}, prefix {self.redis_prefix})"

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


#: Fewest maximum-size messages TRIO_WS_REDIS_PENDING_MAX_BYTES must hold.
MIN_PENDING_MESSAGES = 10
#: Fewest broadcasts the Redis stream may be set to keep (TRIO_WS_REDIS_STREAM_MAX_BYTES).
MIN_STREAM_ENTRIES = 10
#: Bytes of a Redis stream entry besides the message's text: its other fields (origin,
#: sequence number, kind, time, the sender's id of up to 64 characters) and Redis's own
#: bookkeeping, with room to spare (measured: about 250).
STREAM_ENTRY_OVERHEAD = 512


def stream_entry_bytes(max_message_size: int) -> int:
    """Most Redis memory one stream entry takes with a message of ``max_message_size`` bytes.

    Redis's allocator (jemalloc) rounds each allocation up to a size class, up to a quarter
    more: a 64 KiB message took 82,001 bytes (Redis 7.0, ``INFO memory``), hence 5/4.
    """
    return (max_message_size + STREAM_ENTRY_OVERHEAD) * 5 // 4


def redact_url(url: str) -> str:
    """The URL without its password, for logs and ``/health``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{netloc}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def read_secret_file(variable: str, path: str) -> str:
    """A secret kept in a file (a Docker or Kubernetes secret), whitespace stripped.

    Errors: :class:`SettingsError` naming the variable (never the secret) if it cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(
            f"{variable}: cannot read {path!r}: {error.__class__.__name__}"
        ) from None


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{ENV_PREFIX}{field.upper()} must be {expected}, got {value!r}")


def _number(raw: str) -> float:
    value = float(raw)
    if value != value or value in (float("inf"), float("-inf")):  # NaN or infinite
        raise ValueError(raw)
    return value


def _level(raw: str) -> str:
    return raw.upper()


def _lower(raw: str) -> str:
    return raw.lower()


def parse_proxies(raw: str) -> tuple[str, ...]:
    """``TRIO_WS_TRUSTED_PROXIES``: addresses or networks separated by commas or spaces."""
    return tuple(entry for entry in re.split(r"[,\s]+", raw.strip()) if entry)


def parse_list(raw: str) -> tuple[str, ...]:
    """A list setting: entries separated by commas or spaces."""
    return tuple(entry for entry in re.split(r"[,\s]+", raw.strip()) if entry)


def _is_origin(entry: str) -> bool:
    parts = urllib.parse.urlsplit(entry)
    try:
        parts.port  # noqa: B018  # raises for a port that is not a number
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and parts.path in ("", "/")
        and not parts.query
    )


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def on_off(raw: str) -> bool:
    """``on`` or ``off`` (any case), for switches such as ``TRIO_WS_COMPRESSION``."""
    value = raw.strip().lower()
    if value not in ("on", "off"):
        raise ValueError(raw)
    return value == "on"


_PARSERS: dict[str, Callable[[str], Any]] = {
    "host": str,
    "port": int,
    "drain_timeout": _number,
    "broadcast_interval": _number,
    "progress_interval": _number,
    "presence_interval": _number,
    "max_message_size": int,
    "compression": on_off,
    "queue_size": int,
    "outbox_bytes": int,
    "ping_interval": _number,
    "stall_timeout": _number,
    "log_level": _level,
    "certfile": str,
    "keyfile": str,
    "redis_url": str,
    "redis_prefix": str,
    "redis_stream_maxlen": int,
    "max_connections": int,
    "max_connections_per_ip": int,
    "handshake_rate_per_ip": _number,
    "trusted_proxies": parse_proxies,
    "publish_rate": _number,
    "publish_burst": int,
    "publish_bytes_rate": int,
    "client_publish": _lower,
    "api_key": str,
    "api_key_file": str,
    "api_publisher_name": str,
    "health_detail": on_off,
    "redis_stream_max_bytes": int,
    "pong_timeout": _number,
    "allowed_origins": parse_list,
    "jwt_secret": str,
    "jwt_secret_file": str,
    "jwt_public_key_file": str,
    "jwt_algorithm": str,
    "jwt_audience": str,
    "jwt_issuer": str,
    "redis_pending_max_bytes": int,
    "log_format": _lower,
    "metrics_port": int,
    "metrics_host": str,
    "log_connections": lambda raw: raw.strip().lower(),
}


def _parse(name: str, raw: str, parser: Callable[[str], Any]) -> Any:
    try:
        return parser(raw)
    except ValueError:
        kind = "on or off" if parser is on_off else "an integer" if parser is int else "a number"
        raise SettingsError(f"{name} must be {kind}, got {raw!r}") from None
