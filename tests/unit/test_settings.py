from __future__ import annotations

import re
from typing import Any

import pytest

from trio_ws.settings import Settings, SettingsError, stream_entry_bytes


def test_defaults_match_the_original_design() -> None:
    settings = Settings.from_env({})
    assert settings.drain_timeout == 1800.0
    assert settings.broadcast_interval == 10.0
    assert settings.progress_interval == 10.0
    assert settings.max_message_size == 64 * 1024
    assert settings.log_level == "INFO"


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "TRIO_WS_HOST": "0.0.0.0",
            "TRIO_WS_PORT": "9000",
            "TRIO_WS_DRAIN_TIMEOUT": "12.5",
            "TRIO_WS_BROADCAST_INTERVAL": "0",
            "TRIO_WS_PROGRESS_INTERVAL": "2",
            "TRIO_WS_MAX_MESSAGE_SIZE": "2048",
            "TRIO_WS_QUEUE_SIZE": "8",
            "TRIO_WS_PING_INTERVAL": "5",
            "TRIO_WS_STALL_TIMEOUT": "7",
            "TRIO_WS_LOG_LEVEL": "debug",
            "UNRELATED": "x",
        }
    )
    assert settings == Settings(
        host="0.0.0.0",
        port=9000,
        drain_timeout=12.5,
        broadcast_interval=0.0,
        progress_interval=2.0,
        max_message_size=2048,
        queue_size=8,
        ping_interval=5.0,
        stall_timeout=7.0,
        log_level="DEBUG",
    )


def test_overrides_win_over_environment_and_none_means_unset() -> None:
    settings = Settings.from_env(
        {"TRIO_WS_DRAIN_TIMEOUT": "60", "TRIO_WS_PORT": "9000"}, drain_timeout=5.0, port=None
    )
    assert (settings.drain_timeout, settings.port) == (5.0, 9000)


def test_blank_variable_means_default() -> None:
    assert Settings.from_env({"TRIO_WS_DRAIN_TIMEOUT": "  "}).drain_timeout == 1800.0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TRIO_WS_DRAIN_TIMEOUT", "soon", "TRIO_WS_DRAIN_TIMEOUT must be a number, got 'soon'"),
        ("TRIO_WS_DRAIN_TIMEOUT", "-1", "TRIO_WS_DRAIN_TIMEOUT must be seconds >= 0"),
        ("TRIO_WS_DRAIN_TIMEOUT", "nan", "TRIO_WS_DRAIN_TIMEOUT must be a number"),
        ("TRIO_WS_PORT", "80.5", "TRIO_WS_PORT must be an integer, got '80.5'"),
        ("TRIO_WS_PORT", "70000", "TRIO_WS_PORT must be a TCP port"),
        ("TRIO_WS_PROGRESS_INTERVAL", "0", "TRIO_WS_PROGRESS_INTERVAL must be seconds >= 0.1"),
        ("TRIO_WS_MAX_MESSAGE_SIZE", "10", "TRIO_WS_MAX_MESSAGE_SIZE must be bytes >= 1024"),
        ("TRIO_WS_QUEUE_SIZE", "0", "TRIO_WS_QUEUE_SIZE must be an integer >= 1"),
        ("TRIO_WS_LOG_LEVEL", "loud", "TRIO_WS_LOG_LEVEL must be DEBUG or INFO"),
        ("TRIO_WS_CERTFILE", "cert.pem", "TRIO_WS_CERTFILE must be set together with keyfile"),
        ("TRIO_WS_PUBLISH_RATE", "-1", "TRIO_WS_PUBLISH_RATE must be messages/s >= 0"),
        ("TRIO_WS_PUBLISH_BURST", "2.5", "TRIO_WS_PUBLISH_BURST must be an integer"),
        ("TRIO_WS_PUBLISH_BYTES_RATE", "-5", "TRIO_WS_PUBLISH_BYTES_RATE must be bytes/s >= 0"),
        ("TRIO_WS_LOG_CONNECTIONS", "some", "TRIO_WS_LOG_CONNECTIONS must be each or summary"),
    ],
)
def test_invalid_values_are_clear_errors(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace(".", r"\.").replace("'", "'")):
        Settings.from_env({name: value})


def test_describe_names_every_behaviour_setting() -> None:
    line = Settings(drain_timeout=30).describe()
    assert "drain_timeout=30s" in line
    assert "broadcast_interval=10s" in line
    assert "max_message_size=65536" in line


def test_connection_limits() -> None:
    settings = Settings.from_env({})
    assert (settings.max_connections, settings.max_connections_per_ip) == (10_000, 0)
    assert (settings.handshake_rate_per_ip, settings.trusted_proxies) == (0.0, ())
    settings = Settings.from_env(
        {
            "TRIO_WS_MAX_CONNECTIONS": "500",
            "TRIO_WS_MAX_CONNECTIONS_PER_IP": "20",
            "TRIO_WS_HANDSHAKE_RATE_PER_IP": "2.5",
            "TRIO_WS_TRUSTED_PROXIES": " 10.0.0.0/8, 127.0.0.1 ::1 ",
        }
    )
    assert settings.max_connections == 500
    assert settings.max_connections_per_ip == 20
    assert settings.handshake_rate_per_ip == 2.5
    assert settings.trusted_proxies == ("10.0.0.0/8", "127.0.0.1", "::1")
    assert "max_connections=500" in settings.describe()
    assert "trusted_proxies=10.0.0.0/8,127.0.0.1,::1" in settings.describe()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_CONNECTIONS", "0", "TRIO_WS_MAX_CONNECTIONS must be an integer >= 1"),
        ("MAX_CONNECTIONS_PER_IP", "-1", "TRIO_WS_MAX_CONNECTIONS_PER_IP must be an integer >= 0"),
        ("HANDSHAKE_RATE_PER_IP", "-1", "TRIO_WS_HANDSHAKE_RATE_PER_IP must be handshakes"),
        ("HANDSHAKE_RATE_PER_IP", "fast", "TRIO_WS_HANDSHAKE_RATE_PER_IP must be a number"),
        ("TRUSTED_PROXIES", "10.0.0.0/8,nginx", "TRIO_WS_TRUSTED_PROXIES must be IP addresses"),
    ],
)
def test_connection_limits_refused(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({f"TRIO_WS_{name}": value})


def test_publish_limits_are_on_by_default_and_0_turns_them_off() -> None:
    default = Settings.from_env({})
    assert (default.publish_rate, default.publish_burst, default.publish_bytes_rate) == (
        10.0,
        20,
        65536,
    )
    off = Settings.from_env(
        {
            "TRIO_WS_PUBLISH_RATE": "0",
            "TRIO_WS_PUBLISH_BURST": "0",
            "TRIO_WS_PUBLISH_BYTES_RATE": "0",
        }
    )
    assert (off.publish_rate, off.publish_burst, off.publish_bytes_rate) == (0.0, 0, 0)
    assert "publish_rate=10/s publish_burst=20 publish_bytes_rate=65536/s" in default.describe()


@pytest.mark.parametrize(("raw", "expected"), [("on", True), ("OFF", False), (" On ", True)])
def test_compression_is_on_or_off(raw: str, expected: bool) -> None:
    assert Settings.from_env({}).compression is False
    assert Settings.from_env({"TRIO_WS_COMPRESSION": raw}).compression is expected
    assert f"compression={raw.strip().lower()}" in Settings(compression=expected).describe()


def test_compression_refuses_anything_else() -> None:
    with pytest.raises(SettingsError, match="TRIO_WS_COMPRESSION must be on or off, got 'yes'"):
        Settings.from_env({"TRIO_WS_COMPRESSION": "yes"})


def test_publish_api_and_health_settings(tmp_path: Any) -> None:
    defaults = Settings.from_env({})
    assert (defaults.client_publish, defaults.api_key, defaults.health_detail) == (
        "all",
        None,
        False,
    )
    assert defaults.api_publisher_name == "@server"
    key_file = tmp_path / "key"
    key_file.write_text("  0123456789abcdef0123\n")
    settings = Settings.from_env(
        {
            "TRIO_WS_CLIENT_PUBLISH": "None",
            "TRIO_WS_API_KEY_FILE": str(key_file),
            "TRIO_WS_API_PUBLISHER_NAME": "@backend",
            "TRIO_WS_HEALTH_DETAIL": "on",
        }
    )
    assert settings.client_publish == "none"
    assert settings.api_key == "0123456789abcdef0123"
    assert (settings.api_publisher_name, settings.health_detail) == ("@backend", True)
    # The key never shows in a repr or the start-up line.
    assert "0123456789abcdef0123" not in repr(settings) + settings.describe()
    assert "client_publish=none api=on health_detail=on" in settings.describe()


def test_origins_and_tokens_are_read() -> None:
    settings = Settings.from_env(
        {
            "TRIO_WS_ALLOWED_ORIGINS": "https://app.example, http://localhost:3000",
            "TRIO_WS_JWT_SECRET_FILE": "/run/secrets/jwt",
            "TRIO_WS_JWT_ALGORITHM": "HS512",
            "TRIO_WS_JWT_AUDIENCE": "trio-ws",
            "TRIO_WS_JWT_ISSUER": "https://issuer.example",
        }
    )
    assert settings.allowed_origins == ("https://app.example", "http://localhost:3000")
    assert (settings.jwt_secret_file, settings.jwt_algorithm) == ("/run/secrets/jwt", "HS512")
    assert (settings.jwt_audience, settings.jwt_issuer) == ("trio-ws", "https://issuer.example")
    assert settings.tokens_enabled
    assert "tokens=HS512" in settings.describe()
    assert not Settings().tokens_enabled
    assert "allowed_origins=same-origin" in Settings().describe()


def test_the_jwt_secret_is_never_printed() -> None:
    secret = "x" * 40
    settings = Settings.from_env({"TRIO_WS_JWT_SECRET": secret})
    assert settings.tokens_enabled
    assert secret not in repr(settings)
    assert secret not in settings.describe()
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"TRIO_WS_JWT_SECRET": "short-secret"})
    assert "short-secret" not in str(info.value)
    assert "at least 32 bytes" in str(info.value)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TRIO_WS_CLIENT_PUBLISH": "some"}, "TRIO_WS_CLIENT_PUBLISH must be all or token or none"),
        (
            {"TRIO_WS_CLIENT_PUBLISH": "token"},
            "TRIO_WS_CLIENT_PUBLISH=token needs tokens (TRIO_WS_JWT_SECRET, ",
        ),
        ({"TRIO_WS_API_KEY": "short"}, "TRIO_WS_API_KEY must be at least 16 characters"),
        ({"TRIO_WS_API_KEY": "0123456789abcdef\x01"}, "printable ASCII"),
        ({"TRIO_WS_API_PUBLISHER_NAME": "server"}, "TRIO_WS_API_PUBLISHER_NAME must be @"),
        ({"TRIO_WS_API_PUBLISHER_NAME": "@a b"}, "TRIO_WS_API_PUBLISHER_NAME must be @"),
        ({"TRIO_WS_HEALTH_DETAIL": "yes"}, "TRIO_WS_HEALTH_DETAIL must be on or off"),
        ({"TRIO_WS_API_KEY_FILE": "/nonexistent/key"}, "TRIO_WS_API_KEY_FILE: cannot read"),
        (
            {"TRIO_WS_API_KEY": "0123456789abcdef", "TRIO_WS_API_KEY_FILE": "/x"},
            "both set",
        ),
    ],
)
def test_publish_api_settings_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)) as caught:
        Settings.from_env(environ)
    assert "0123456789abcdef" not in str(caught.value)


def test_the_redis_stream_is_bounded_in_bytes_as_well_as_in_entries() -> None:
    settings = Settings.from_env({})
    assert settings.redis_stream_max_bytes == 64 * 1024 * 1024
    # A 64 KiB message takes up to 82,560 bytes of Redis: 812 of them fit in 64 MiB.
    assert stream_entry_bytes(64 * 1024) == 82_560
    assert settings.redis_stream_entries == 812
    assert settings.redis_stream_entries * stream_entry_bytes(64 * 1024) <= 64 * 1024 * 1024
    # Small messages: the entry cap holds first.
    small = Settings.from_env({"TRIO_WS_MAX_MESSAGE_SIZE": "2048"})
    assert small.redis_stream_entries == 10_000
    settings = Settings.from_env(
        {"TRIO_WS_REDIS_STREAM_MAX_BYTES": "16777216", "TRIO_WS_REDIS_STREAM_MAXLEN": "100"}
    )
    assert (settings.redis_stream_max_bytes, settings.redis_stream_entries) == (16 << 20, 100)
    assert Settings(redis_stream_max_bytes=16 << 20).redis_stream_entries == 203


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TRIO_WS_REDIS_STREAM_MAX_BYTES": "800000"},
            r"TRIO_WS_REDIS_STREAM_MAX_BYTES must be bytes >= 10 broadcasts of max_message_size "
            r"\(825600\), got 800000",
        ),
        (
            # Larger messages need a larger budget.
            {
                "TRIO_WS_MAX_MESSAGE_SIZE": "1048576",
                "TRIO_WS_OUTBOX_BYTES": "4194304",
                "TRIO_WS_REDIS_STREAM_MAX_BYTES": "8388608",
            },
            r"TRIO_WS_REDIS_STREAM_MAX_BYTES must be bytes >= 10 broadcasts",
        ),
        ({"TRIO_WS_REDIS_STREAM_MAX_BYTES": "64MB"}, "must be an integer, got '64MB'"),
    ],
)
def test_a_redis_stream_budget_too_small_for_ten_messages_is_refused(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"TRIO_WS_REDIS_URL": "redis://127.0.0.1:6379/0", **env})


def test_without_redis_large_messages_need_no_stream_budget() -> None:
    settings = Settings.from_env(
        {"TRIO_WS_MAX_MESSAGE_SIZE": str(16 << 20), "TRIO_WS_OUTBOX_BYTES": str(64 << 20)}
    )
    assert settings.max_message_size == 16 << 20


def test_pong_timeout() -> None:
    assert Settings.from_env({}).pong_timeout == 20.0
    assert Settings.from_env({"TRIO_WS_PONG_TIMEOUT": "0"}).pong_timeout == 0.0
    settings = Settings.from_env({"TRIO_WS_PONG_TIMEOUT": "7.5"})
    assert settings.pong_timeout == 7.5
    assert "pong_timeout=7.5s" in settings.describe()
    with pytest.raises(SettingsError, match="TRIO_WS_PONG_TIMEOUT must be seconds >= 0"):
        Settings.from_env({"TRIO_WS_PONG_TIMEOUT": "-1"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TRIO_WS_ALLOWED_ORIGINS": "example.com"}, "TRIO_WS_ALLOWED_ORIGINS must be origins"),
        ({"TRIO_WS_ALLOWED_ORIGINS": "https://a.example/path"}, "must be origins"),
        ({"TRIO_WS_JWT_ALGORITHM": "none"}, "TRIO_WS_JWT_ALGORITHM must be one of"),
        (
            {"TRIO_WS_JWT_SECRET": "x" * 40, "TRIO_WS_JWT_ALGORITHM": "RS256"},
            "HS256, HS384 or HS512 with a secret",
        ),
        (
            {"TRIO_WS_JWT_PUBLIC_KEY_FILE": "/k.pem"},
            "a public-key algorithm",
        ),
        (
            {"TRIO_WS_JWT_SECRET": "x" * 40, "TRIO_WS_JWT_SECRET_FILE": "/s"},
            "set alone",
        ),
    ],
)
def test_origin_and_token_settings_are_checked(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(environ)


def test_the_pending_byte_budget_holds_hundreds_of_maximum_size_messages() -> None:
    settings = Settings.from_env({})
    assert settings.redis_pending_max_bytes == 32 * 1024 * 1024
    assert settings.redis_pending_max_bytes // settings.max_message_size == 512
    assert (
        Settings.from_env({"TRIO_WS_REDIS_PENDING_MAX_BYTES": "1048576"}).redis_pending_max_bytes
        == 1 << 20
    )
    with pytest.raises(
        SettingsError,
        match=r"TRIO_WS_REDIS_PENDING_MAX_BYTES must be bytes >= 10 messages of "
        r"max_message_size \(655360\), got 65536",
    ):
        Settings.from_env(
            {
                "TRIO_WS_REDIS_URL": "redis://127.0.0.1:6379/0",
                "TRIO_WS_REDIS_PENDING_MAX_BYTES": "65536",
            }
        )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRIO_WS_LOG_FORMAT": "xml"}, "TRIO_WS_LOG_FORMAT must be text or json"),
        ({"TRIO_WS_METRICS_PORT": "70000"}, "TRIO_WS_METRICS_PORT must be a TCP port"),
        (
            {"TRIO_WS_METRICS_PORT": "8000", "TRIO_WS_PORT": "8000"},
            "TRIO_WS_METRICS_PORT must be a port other than TRIO_WS_PORT",
        ),
    ],
)
def test_metrics_and_log_settings_are_checked(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_metrics_are_off_and_logs_text_by_default() -> None:
    default = Settings.from_env({})
    assert (default.metrics_port, default.metrics_host, default.log_format) == (
        0,
        "127.0.0.1",
        "text",
    )
    on = Settings.from_env({"TRIO_WS_METRICS_PORT": "9464", "TRIO_WS_LOG_FORMAT": "JSON"})
    assert on.log_format == "json"
    assert "metrics=http://127.0.0.1:9464/metrics" in on.describe()


def test_log_connections_each_by_default_summary_on_request() -> None:
    assert Settings.from_env({}).log_connections == "each"
    summary = Settings.from_env({"TRIO_WS_LOG_CONNECTIONS": " Summary "})
    assert summary.log_connections == "summary"
    assert "log_connections=summary" in summary.describe()
