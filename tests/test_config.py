"""Config: good files give exact values; every bad one names the key and the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from collector.config import (
    DEFAULT_OPS_ENDPOINT,
    DEFAULT_WEB_ENDPOINT,
    Config,
    ConfigError,
    Endpoint,
    Limits,
    ModelPrice,
    TlsConfig,
    load_config,
)

CONFIGS = Path(__file__).parent / "configs"
ROOT = Path(__file__).resolve().parent.parent


def test_full_config_sets_every_key() -> None:
    config = load_config(CONFIGS / "good_full.toml")
    assert config.receivers.grpc_endpoint == Endpoint("0.0.0.0", 14317)
    assert config.receivers.http_endpoint == Endpoint("::1", 14318)
    assert str(config.receivers.http_endpoint) == "[::1]:14318"
    assert config.receivers.max_request_bytes == 1048576
    assert config.sqlite_path == CONFIGS / "db" / "usage.db"  # relative to the file
    assert (config.flush_interval_ms, config.max_pending_spans) == (50, 1000)
    assert (config.stale_after_s, config.max_session_id_length) == (600, 64)
    assert config.dedupe_retention_s == 172800
    assert config.resolve_window_s == 120
    assert config.agent_span_tokens is True
    assert config.log_level == "debug"
    assert config.ops_endpoint == Endpoint("0.0.0.0", 19888)
    assert config.web_endpoint == Endpoint("0.0.0.0", 19889)  # allowed: auth.token_file is set
    assert config.limits == Limits(max_spans_per_request=500, max_attributes_per_span=64,
                                   max_attribute_value_bytes=1024, max_value_depth=4)
    assert config.aliases == {"app.thread_id": "session.id"}
    assert config.auth_token == "abc123-token"
    assert config.tls == TlsConfig(cert_file=CONFIGS / "dummy_cert.pem",
                                   key_file=CONFIGS / "dummy_key.pem",
                                   client_ca_file=CONFIGS / "dummy_cert.pem")
    assert "abc123" not in repr(config)
    assert config.pricing == {
        "gpt-4o": ModelPrice(input=2.5, output=10.0, cache_read=1.25, cache_write=0.0),
        "local-llama": ModelPrice(input=0.0, output=0.0, cache_read=0.0, cache_write=0.0),
    }


def test_empty_config_is_all_defaults() -> None:
    config = load_config(CONFIGS / "good_empty.toml")
    defaults = Config()
    assert config.receivers == defaults.receivers
    assert str(config.receivers.grpc_endpoint) == "127.0.0.1:4317"
    assert str(config.receivers.http_endpoint) == "127.0.0.1:4318"
    assert config.sqlite_path == CONFIGS / "data" / "agent_sessions.db"
    assert (config.flush_interval_ms, config.stale_after_s) == (0, 3600)
    assert config.dedupe_retention_s == 24 * 3600
    assert config.resolve_window_s == 600
    assert config.ops_endpoint == defaults.ops_endpoint
    assert str(config.ops_endpoint) == DEFAULT_OPS_ENDPOINT == "127.0.0.1:8888"
    assert str(config.web_endpoint) == DEFAULT_WEB_ENDPOINT == "127.0.0.1:8889"


def test_web_endpoint_can_be_disabled_and_needs_auth_beyond_loopback() -> None:
    assert load_config(CONFIGS / "good_web_disabled.toml").web_endpoint is None
    assert load_config(CONFIGS / "good_web_ipv6_loopback.toml").web_endpoint == Endpoint(
        "::1", 19889)
    public = load_config(CONFIGS / "good_web_public_with_auth.toml")
    assert public.web_endpoint == Endpoint("0.0.0.0", 19889) and public.auth_token


def test_ops_endpoint_can_be_disabled() -> None:
    assert load_config(CONFIGS / "good_ops_disabled.toml").ops_endpoint is None


def test_shipped_config_toml_is_valid_and_matches_the_defaults() -> None:
    config = load_config(ROOT / "config.toml")
    defaults = Config()
    assert config.receivers == defaults.receivers
    assert config.sqlite_path == ROOT / "data" / "agent_sessions.db"
    for key in ("flush_interval_ms", "max_pending_spans", "stale_after_s", "dedupe_retention_s",
                "agent_span_tokens", "max_session_id_length", "log_level", "ops_endpoint",
                "resolve_window_s", "web_endpoint"):
        assert getattr(config, key) == getattr(defaults, key), key


@pytest.mark.parametrize(("name", "key", "words"), [
    ("bad_unknown_key.toml", "flush.intervall_ms", "unknown key"),
    ("bad_unknown_section.toml", "telemetry", "unknown key"),
    ("bad_type.toml", "flush.interval_ms", "must be an integer"),
    ("bad_negative.toml", "sessions.stale_after_s", "must be >= 1"),
    ("bad_flush_negative.toml", "flush.interval_ms", "must be >= 0"),
    ("bad_endpoint.toml", "receivers.otlp.grpc_endpoint", "expected host:port"),
    ("bad_port.toml", "receivers.otlp.http_endpoint", "port must be 1-65535"),
    ("bad_both_disabled.toml", "receivers.otlp", "enable at least one"),
    ("bad_same_endpoint.toml", "receivers.otlp.http_endpoint", "same address"),
    ("bad_price_key.toml", 'pricing."gpt-4o".cached', "unknown key"),
    ("bad_price_missing.toml", 'pricing."gpt-4o".output', "missing"),
    ("bad_price_negative.toml", 'pricing."gpt-4o".input', ">= 0"),
    ("bad_log_level.toml", "log.level", "must be one of"),
    ("bad_bool.toml", "mapping.agent_span_tokens", "must be a bool"),
    ("bad_receivers_other.toml", "receivers.zipkin", "unknown key"),
    ("bad_ops_same_endpoint.toml", "ops.endpoint", "same address as an OTLP receiver"),
    ("bad_ops_endpoint.toml", "ops.endpoint", "expected host:port"),
    ("bad_web_public_no_auth.toml", "web.endpoint", "set auth.token_file"),
    ("bad_web_same_endpoint.toml", "web.endpoint", "same address as another listener"),
    ("bad_tls_half.toml", "tls.key_file", "needs both"),
    ("bad_tls_not_pem.toml", "tls.cert_file", "not a PEM file"),
    ("bad_token_missing.toml", "auth.token_file", "cannot read"),
    ("bad_token_spaces.toml", "auth.token_file", "one token without spaces"),
    ("bad_limit_zero.toml", "limits.max_value_depth", "must be >= 1"),
    ("bad_alias_target.toml", 'mapping.aliases."app.thread_id"', "not an attribute"),
    ("bad_retention_short.toml", "dedupe.retention_s", "must be >= 86400"),
    ("bad_resolve_window_zero.toml", "sessions.resolve_window_s", "must be >= 1"),
    ("bad_resolve_window_long.toml", "sessions.resolve_window_s",
     "must be at most dedupe.retention_s (86400)"),
    ("bad_resolve_window_type.toml", "sessions.resolve_window_s", "integer"),
])
def test_bad_config_names_key_and_file(name: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / name)
    assert info.value.key == key
    assert words in info.value.problem
    assert name in str(info.value) and key in str(info.value)


def test_invalid_toml_names_the_file() -> None:
    with pytest.raises(ConfigError, match=r"bad_toml\.toml: invalid TOML"):
        load_config(CONFIGS / "bad_toml.toml")


def test_missing_and_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_cli_reports_config_errors_without_a_traceback() -> None:
    result = run_cli("serve", "--config", str(CONFIGS / "bad_unknown_key.toml"))
    assert result.returncode == 2
    assert "bad_unknown_key.toml: flush.intervall_ms: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_cli("sessions", "--config", "/nonexistent/collector.toml")
    assert missing.returncode == 2 and "file not found" in missing.stderr


def test_check_config_prints_the_effective_config() -> None:
    result = run_cli("check-config", "--config", str(CONFIGS / "good_full.toml"))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["flush_interval_ms"] == 50
    assert effective["receivers"]["http_endpoint"] == "[::1]:14318"
    assert effective["ops_endpoint"] == "0.0.0.0:19888"
    assert effective["pricing"]["gpt-4o"]["cache_read"] == 1.25
    assert effective["auth_token"] == "<set>" and "abc123" not in result.stdout


def test_check_config_fails_naming_key_and_file() -> None:
    result = run_cli("check-config", "--config", str(CONFIGS / "bad_ops_same_endpoint.toml"))
    assert result.returncode == 2 and result.stdout == ""
    assert "bad_ops_same_endpoint.toml: ops.endpoint: same address" in result.stderr
    assert "Traceback" not in result.stderr
