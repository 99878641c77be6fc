from __future__ import annotations

import pytest

from trio_ws.settings import Settings, SettingsError


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


def test_log_connections_each_by_default_summary_on_request() -> None:
    assert Settings.from_env({}).log_connections == "each"
    summary = Settings.from_env({"TRIO_WS_LOG_CONNECTIONS": " Summary "})
    assert summary.log_connections == "summary"
    assert "log_connections=summary" in summary.describe()
