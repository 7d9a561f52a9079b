"""Named tokens and roles, their reload, the credential label, web sign-in sessions, TLS on the
fleet view and Host checks: against real daemons over real sockets (and a real Chromium)."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import sqlite3
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from collector import cli
from collector.config import ConfigError, load_config
from collector.config.auth import LEGACY_TOKEN_NAME, AuthConfig, TokenSpec, token_digest
from collector.security import Credentials, HostCheck, ReloadRefused, host_check
from collector.signals import Signal
from collector.store.sqlite import SQLiteStore
from collector.web.sessions import WebSessions
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, MS, T0, Daemon, make_span
from tests.test_receivers import new_trace, request_bytes, usage
from tests.test_security import Pki, pki  # noqa: F401 - the fixture
from tests.test_signal_receivers import METHODS, raw_body

StartDaemon = Callable[..., Daemon]
INGEST = "ingest-t0ken-for-laptops"
READ = "read-t0ken-for-finance"
BOTH = "both-t0ken-for-ops"
READ_SHA = hashlib.sha256(READ.encode()).hexdigest()
OTLP_PATHS = {Signal.TRACES: "/v1/traces", Signal.LOGS: "/v1/logs", Signal.METRICS: "/v1/metrics"}
TRACE_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
GRPC_METHODS = {Signal.TRACES: TRACE_METHOD, **METHODS}
# Every route of the fleet view that reads (the sign-in form and its assets aside).
READ_ROUTES = ("/", "/static/app.js", "/api/overview", "/api/sessions", "/api/sessions.csv",
               "/api/sessions/some-id", "/api/filters", "/api/who/agent", "/api/who/credential",
               "/api/events")
LOG_WAIT_S = 60.0


def tokens_config(tmp_path: Path) -> str:
    """Three tokens: ingest only (a file), read only (a hash), both (a file)."""
    (tmp_path / "laptops.token").write_text(INGEST + "\n")
    (tmp_path / "ops.token").write_text(BOTH + "\n")
    return (f'[[auth.tokens]]\nname = "laptops"\nroles = ["ingest"]\n'
            f'token_file = "{tmp_path / "laptops.token"}"\n'
            f'[[auth.tokens]]\nname = "finance"\nroles = ["read"]\nsha256 = "{READ_SHA}"\n'
            f'[[auth.tokens]]\nname = "ops"\nroles = ["ingest", "read"]\n'
            f'token_file = "{tmp_path / "ops.token"}"\n')


def body_of(signal_: Signal, session: str) -> bytes:
    if signal_ is Signal.TRACES:
        return request_bytes(make_span(trace_id=new_trace(), attrs=usage(session)))
    return raw_body(signal_, session)


def http_request(port: int, method: str, path: str, *, body: bytes | None = None,
                 headers: dict[str, str] | None = None,
                 context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        # An event stream would never end: its status is what counts.
        data = b"" if response.getheader("Content-Type") == "text/event-stream" \
            else response.read()
        return response.status, dict(response.getheaders()), data
    finally:
        conn.close()


def otlp_post(daemon: Daemon, signal_: Signal, token: str | None, session: str,
              host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/x-protobuf"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if host is not None:
        headers["Host"] = host
    return http_request(daemon.http_port, "POST", OTLP_PATHS[signal_],
                        body=body_of(signal_, session), headers=headers)


def grpc_export(daemon: Daemon, signal_: Signal, token: str | None, session: str) -> bytes:
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        call = channel.unary_unary(GRPC_METHODS[signal_], request_serializer=None,
                                   response_deserializer=None)
        result: bytes = call(body_of(signal_, session), timeout=20, metadata=metadata)
        return result


def grpc_refusal(daemon: Daemon, signal_: Signal, token: str | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        grpc_export(daemon, signal_, token, "refused")
    code: grpc.StatusCode = info.value.code()
    return code


def web_get(daemon: Daemon, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return http_request(daemon.web_port, "GET", path, headers=headers)


def sign_in(daemon: Daemon, token: str, **headers: str) -> tuple[int, dict[str, str]]:
    body = urllib.parse.urlencode({"token": token}).encode()
    status, got, _ = http_request(daemon.web_port, "POST", "/login", body=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", **headers})
    return status, got


def cookie_of(headers: dict[str, str]) -> str:
    return headers["Set-Cookie"].split(";")[0]


def labels(daemon: Daemon) -> dict[str, str | None]:
    conn = sqlite3.connect(daemon.db_path)
    try:
        return dict(conn.execute("SELECT id, credential FROM collector_session_labels"))
    finally:
        conn.close()


def wait_for_line(daemon: Daemon, words: str, after: int) -> str:
    """The first log line past index `after` holding `words` (an event, not a timing)."""
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        for line in daemon.lines[after:]:
            if words in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line with {words!r}:\n{daemon.log}")


# -- config ---------------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_tokens_config_gives_names_roles_and_hashes_only(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, tokens_config(tmp_path)))
    tokens = {t.name: t for t in config.auth.tokens}
    assert {n: sorted(t.roles) for n, t in tokens.items()} == {
        "laptops": ["ingest"], "finance": ["read"], "ops": ["ingest", "read"]}
    assert tokens["laptops"].digest == token_digest(INGEST)
    assert tokens["finance"].digest == bytes.fromhex(READ_SHA) and tokens["finance"].file is None
    assert config.auth.files == (tmp_path / "laptops.token", tmp_path / "ops.token")
    assert INGEST not in repr(config) and READ_SHA not in repr(config)


def test_legacy_token_file_is_one_token_with_both_roles(tmp_path: Path) -> None:
    write(tmp_path, "legacy-token\n", "token.txt")
    config = load_config(write(tmp_path, '[auth]\ntoken_file = "token.txt"\n'))
    (token,) = config.auth.tokens
    assert (token.name, sorted(token.roles)) == (LEGACY_TOKEN_NAME, ["ingest", "read"])
    assert token.digest == token_digest("legacy-token")


BAD_TOKENS = [
    ('[[auth.tokens]]\nname = "a"\nroles = ["ingest"]\n', "auth.tokens[0]",
     "exactly one of token_file and sha256"),
    (f'[[auth.tokens]]\nname = "a"\nroles = ["ingest"]\nsha256 = "{READ_SHA}"\n'
     f'token_file = "x"\n', "auth.tokens[0]", "exactly one of"),
    ('[[auth.tokens]]\nname = "a"\nroles = ["write"]\nsha256 = "' + READ_SHA + '"\n',
     "auth.tokens[0].roles", 'a list of "ingest" and/or "read"'),
    ('[[auth.tokens]]\nname = "a"\nroles = []\nsha256 = "' + READ_SHA + '"\n',
     "auth.tokens[0].roles", "required"),
    ('[[auth.tokens]]\nname = "a"\nroles = ["read", "read"]\nsha256 = "' + READ_SHA + '"\n',
     "auth.tokens[0].roles", "listed twice"),
    ('[[auth.tokens]]\nname = "a b"\nroles = ["read"]\nsha256 = "' + READ_SHA + '"\n',
     "auth.tokens[0].name", "letters, digits"),
    ('[[auth.tokens]]\nroles = ["read"]\nsha256 = "' + READ_SHA + '"\n',
     "auth.tokens[0].name", "required"),
    ('[[auth.tokens]]\nname = "a"\nroles = ["read"]\nsha256 = "abc"\n',
     "auth.tokens[0].sha256", "64 hex digits"),
    ('[[auth.tokens]]\nname = "a"\nroles = ["read"]\nsha256 = "' + READ_SHA + '"\ncolour = 1\n',
     "auth.tokens[0].colour", "unknown key"),
    ('[[auth.tokens]]\nname = "a"\nroles = ["read"]\nsha256 = "' + READ_SHA + '"\n'
     '[[auth.tokens]]\nname = "a"\nroles = ["read"]\nsha256 = "' + "0" * 64 + '"\n',
     "auth.tokens[1].name", "already the name of auth.tokens[0]"),
    ('[[auth.tokens]]\nname = "a"\nroles = ["read"]\nsha256 = "' + READ_SHA + '"\n'
     '[[auth.tokens]]\nname = "b"\nroles = ["ingest"]\nsha256 = "' + READ_SHA + '"\n',
     "auth.tokens[1]", "same token as auth.tokens[0]"),
    ('[auth]\ntoken_file = "legacy.txt"\n[[auth.tokens]]\nname = "default"\nroles = ["read"]\n'
     'sha256 = "' + READ_SHA + '"\n', "auth.tokens[0].name",
     "already the name of auth.token_file"),
    ('[[auth.tokens]]\nname = "a"\nroles = ["read"]\ntoken_file = "missing.token"\n',
     "auth.tokens[0].token_file", "cannot read"),
    ('[receivers.otlp]\nallowed_hosts = ["http://x"]\n', "receivers.otlp.allowed_hosts",
     "not a host name"),
    ('[web]\nallowed_hosts = "x"\n', "web.allowed_hosts", "must be a list"),
    ('[web]\nendpoint = "0.0.0.0:19889"\n[[auth.tokens]]\nname = "a"\nroles = ["read"]\n'
     'sha256 = "' + READ_SHA + '"\n', "web.endpoint", "web.allow_plaintext = true"),
    ('[web.tls]\ncert_file = "dummy_cert.pem"\n', "web.tls.key_file", "needs both"),
    ('[web.tls]\ncolour = "x"\n', "web.tls.colour", "unknown key"),
]


@pytest.mark.parametrize(("text", "key", "words"), BAD_TOKENS)
def test_bad_auth_config_names_key_and_file(tmp_path: Path, text: str, key: str,
                                            words: str) -> None:
    write(tmp_path, "legacy\n", "legacy.txt")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.key, info.value.source) == (key, str(path))
    assert words in info.value.problem


def test_public_web_needs_tls_or_an_explicit_plaintext_key() -> None:
    configs = Path(__file__).parent / "configs"
    with pytest.raises(ConfigError) as info:
        load_config(configs / "bad_web_public_plaintext.toml")
    assert info.value.key == "web.endpoint" and "web.allow_plaintext" in info.value.problem
    plain = load_config(configs / "good_web_public_with_auth.toml")
    assert plain.web_access.allow_plaintext and plain.web_access.tls is None
    full = load_config(configs / "good_full.toml")  # [tls] serves the web listener too
    assert full.web_access.tls is not None and full.web_access.tls.cert_file == full.tls.cert_file
    assert full.web_access.tls.client_ca_file is None  # browsers are not asked for certificates
    own = load_config(configs / "good_web_tls.toml")
    assert own.tls is None and own.web_access.tls is not None
    assert own.web_access.tls.client_ca_file == configs / "dummy_cert.pem"
    assert own.web_access.allowed_hosts == ("fleet.example.com", "10.0.0.5")
    assert own.otlp_allowed_hosts == ("collector.internal",)


def test_check_config_prints_token_names_not_hashes(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, tokens_config(tmp_path))
    assert cli.main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["auth"]["tokens"][1] == {"name": "finance", "roles": ["read"]}
    assert READ_SHA not in out and INGEST not in out and token_digest(INGEST).hex() not in out


# -- pure parts -----------------------------------------------------------------------------

def test_credentials_identify_and_a_reload_cannot_turn_auth_off() -> None:
    spec = TokenSpec("a", frozenset({"read"}), token_digest("tok"))
    credentials = Credentials(AuthConfig((spec,)))
    assert credentials.identify("tok") == spec and credentials.identify("tok2") is None
    assert credentials.identify(" tok ") == spec  # as a token file's line is read
    assert credentials.still_valid("a", spec.digest, "read")
    assert not credentials.still_valid("a", spec.digest, "ingest")
    with pytest.raises(ReloadRefused):
        credentials.replace(AuthConfig(()))
    assert credentials.identify("tok") == spec  # unchanged
    credentials.replace(AuthConfig((TokenSpec("b", frozenset({"read"}), token_digest("new")),)))
    assert credentials.identify("tok") is None and not credentials.still_valid(
        "a", spec.digest, "read")
    with pytest.raises(ReloadRefused):
        Credentials(AuthConfig(())).replace(AuthConfig((spec,)))


def test_host_check_names() -> None:
    from collector.config import Endpoint

    loopback = host_check(Endpoint("127.0.0.1", 8889), ["fleet.example.com"])
    for ok in ("127.0.0.1:8889", "localhost:8889", "LOCALHOST", "[::1]:8889",
               "fleet.example.com", "fleet.example.com.:443", None):
        assert loopback.allows(ok), ok
    for bad in ("evil.example:8889", "127.0.0.1.nip.io:8889", "10.0.0.1:8889", "",
                "localhost.evil.example"):
        assert not loopback.allows(bad), bad
    wildcard = host_check(Endpoint("0.0.0.0", 8889), [])
    assert wildcard.allows("10.1.2.3:8889") and wildcard.allows("[fe80::1]:8889")
    assert not wildcard.allows("rebound.example:8889")
    assert HostCheck(frozenset({"a"})).allows("A:1")


def test_web_sessions_expire_end_and_stay_bounded() -> None:
    now = [0.0]
    store = WebSessions(ttl_s=10, max_sessions=3, clock=lambda: now[0])
    first = store.create("a", b"d")
    assert store.get(first) is not None and len(first) >= 40
    now[0] = 10.0
    assert store.get(first) is None  # expired
    ids = [store.create("a", b"d") for _ in range(4)]
    assert len(store) == 3 and store.get(ids[0]) is None and store.get(ids[3]) is not None
    store.end(ids[3])
    assert store.get(ids[3]) is None
    assert store.end_where(lambda s: False) == 2 and len(store) == 0


def test_the_latest_credential_wins_and_survives_every_refold() -> None:
    from collector.accounting.aggregate import Batch, credit
    from collector.signals.traces import HeldUsage, MappingResult, SpanUsage

    def record(key: bytes, end: int, credential: str | None = None) -> SpanUsage:
        return SpanUsage(key, "s", end, end, 1, 10, 5, 0, 0, 0, 0.0, True, "m", None, None,
                         None, None, "agent", credential=credential)

    batch = Batch()
    batch.add([record(b"a", 20), record(b"b", 10)], "laptops")
    batch.add([record(b"c", 15)], "ci")  # later to arrive, earlier to end: not the latest
    batch.add([record(b"d", 5)])  # carried by no token: sets nothing
    batch.add([record(b"e", 12, "held-by")])  # a resolved held record says its own
    delta = batch.sessions["s"]
    assert (delta.credential, delta.credential_ns) == ("laptops", 20)
    assert [(c, [r.key for r in rs]) for c, rs in batch.runs()] == [
        ("laptops", [b"a", b"b"]), ("ci", [b"c"]), (None, [b"d", b"e"])]
    # A retry found "a" accounted: the re-fold is exact, each record with its own token.
    rest = batch.without({b"a"})
    assert (rest.sessions["s"].credential, rest.sessions["s"].credential_ns) == ("ci", 15)
    assert [(c, [r.key for r in rs]) for c, rs in rest.runs()] == [
        ("laptops", [b"b"]), ("ci", [b"c"]), (None, [b"d", b"e"])]
    later = Batch()
    later.add([record(b"f", 30)], "ops")
    rest.absorb(later)
    assert rest.sessions["s"].credential == "ops"
    copy = Batch()
    copy.refold(rest)
    assert copy.sessions["s"] == rest.sessions["s"]
    # What waits in storage carries the token in its own record.
    held = HeldUsage(record(b"h", 1), b"t" * 16, b"s" * 8, b"")
    result = MappingResult(held=[held])
    credit(result, "laptops")
    assert result.held[0].usage.credential == "laptops" and result.held[0].trace_id == held[1]


# -- roles over real sockets ----------------------------------------------------------------

@pytest.fixture
def tokens_daemon(start_daemon: StartDaemon, tmp_path: Path) -> Daemon:
    return start_daemon(tokens_config(tmp_path))


def test_ingest_token_sends_on_every_otlp_service_and_reads_nothing(
        tokens_daemon: Daemon) -> None:
    daemon = tokens_daemon
    for signal_ in Signal:
        status, _, payload = otlp_post(daemon, signal_, INGEST, f"http-{signal_.value}")
        assert status == 200, payload
        grpc_export(daemon, signal_, INGEST, f"grpc-{signal_.value}")
    for path in READ_ROUTES:
        status, _, payload = web_get(daemon, path, Authorization=f"Bearer {INGEST}")
        assert status == 403, (path, payload)
    # Nor can it sign in to the page.
    status, headers = sign_in(daemon, INGEST)
    assert (status, headers["Location"]) == (303, "/login?failed=role")
    assert "Set-Cookie" not in headers
    assert labels(daemon)["http-traces"] == "laptops"
    assert labels(daemon)["grpc-traces"] == "laptops"


def test_read_token_is_refused_by_every_otlp_service(tokens_daemon: Daemon) -> None:
    daemon = tokens_daemon
    for signal_ in Signal:
        status, headers, payload = otlp_post(daemon, signal_, READ, "read")
        assert status == 403 and b"does not have the ingest role" in payload, payload
        assert "WWW-Authenticate" not in headers
        assert grpc_refusal(daemon, signal_, READ) == grpc.StatusCode.PERMISSION_DENIED
        # No token, or one the collector does not know: unauthenticated.
        status, headers, _ = otlp_post(daemon, signal_, None, "none")
        assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
        assert otlp_post(daemon, signal_, "not-a-token", "wrong")[0] == 401
        assert grpc_refusal(daemon, signal_, None) == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_refusal(daemon, signal_, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED
    for path in READ_ROUTES:
        status, _, payload = web_get(daemon, path, Authorization=f"Bearer {READ}")
        assert status in (200, 404), (path, payload)  # 404: the session that does not exist
        assert web_get(daemon, path, Authorization="Bearer not-a-token")[0] == 401
    assert labels(daemon) == {}
    daemon.stop()
    assert READ not in daemon.log and INGEST not in daemon.log and "not-a-token" not in daemon.log


def test_credential_label_is_the_token_never_an_attribute(tokens_daemon: Daemon,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    daemon = tokens_daemon
    forged = usage("forged", credential="laptops", **{"collector.credential": "laptops"})
    span = make_span(trace_id=new_trace(), attrs=forged, resource={"credential": "laptops"})
    status, _, _ = http_request(daemon.http_port, "POST", "/v1/traces", body=request_bytes(span),
                                headers={"Content-Type": "application/x-protobuf",
                                         "Authorization": f"Bearer {BOTH}"})
    assert status == 200
    assert otlp_post(daemon, Signal.TRACES, INGEST, "laptop-session")[0] == 200
    # The same session sent later by another token: the latest wins, as for every label.
    later = make_span(trace_id=new_trace(), attrs=usage("laptop-session"), start=2 * 10**18)
    grpc_body = request_bytes(later)
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        channel.unary_unary(TRACE_METHOD, request_serializer=None, response_deserializer=None)(
            grpc_body, timeout=20, metadata=(("authorization", f"Bearer {BOTH}"),))
    assert labels(daemon) == {"forged": "ops", "laptop-session": "ops"}
    assert otlp_post(daemon, Signal.TRACES, INGEST, "only-laptops")[0] == 200

    assert cli.main(["report", "credential", "--config", str(daemon.config_path),
                     "--json"]) == 0
    lines = {line["credential"]: line for line in json.loads(capsys.readouterr().out)["lines"]}
    assert sorted(lines) == ["laptops", "ops"]
    assert lines["ops"]["turns"] == 3 and lines["laptops"]["turns"] == 1
    auth = {"Authorization": f"Bearer {READ}"}
    status, _, payload = web_get(daemon, "/api/sessions", **auth)
    assert status == 200
    shown = {s["id"]: s["credential"] for s in json.loads(payload)["sessions"]}
    assert shown == {"forged": "ops", "laptop-session": "ops", "only-laptops": "laptops"}
    status, _, payload = web_get(daemon, "/api/sessions/only-laptops", **auth)
    assert json.loads(payload)["session"]["credential"] == "laptops"
    status, _, payload = web_get(daemon, "/api/who/credential", **auth)
    assert {line["credential"] for line in json.loads(payload)["lines"]} == {"laptops", "ops"}
    status, _, payload = web_get(daemon, "/api/sessions.csv", **auth)
    assert b"credential" in payload.splitlines()[0] and b",laptops," in payload


# Dialects that read test_signal_receivers' log records, and metric points of agent-metrics.
SIGNAL_DIALECTS = """
[dialects.agent_cli]
service_names = ["agent-cli"]
source = "logs"
calls = ["logs:agent.api_response"]
[dialects.agent_cli.attributes]
session_id = ["session.id"]
model = ["model"]
input = ["input_token_count"]
output = ["output_token_count"]
[dialects.agent_metrics]
service_names = ["agent-metrics"]
source = "metrics"
[dialects.agent_metrics.attributes]
session_id = ["session.id"]
[dialects.agent_metrics.metrics."agent.token.usage"]
type_attribute = "type"
types = { input = "input", output = "output" }
"""


def cumulative_metrics(session: str) -> bytes:
    """A cumulative token counter, as an agent's MeterProvider exports it by default."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.resources import Resource

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader],
                             resource=Resource({"service.name": "agent-metrics"}))
    tokens = provider.get_meter("agent-metrics").create_counter("agent.token.usage")
    tokens.add(1234, {"session.id": session, "type": "input"})
    tokens.add(77, {"session.id": session, "type": "output"})
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    body: bytes = encode_metrics(data).SerializeToString()
    return body


def test_logs_and_metrics_carry_the_credential_too(start_daemon: StartDaemon,
                                                   tmp_path: Path) -> None:
    daemon = start_daemon(tokens_config(tmp_path) + SIGNAL_DIALECTS)
    for token, prefix in ((INGEST, "h"), (BOTH, "g")):
        headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {token}"}
        for path, body in (("/v1/logs", raw_body(Signal.LOGS, f"{prefix}-logs")),
                           ("/v1/metrics", cumulative_metrics(f"{prefix}-metrics"))):
            assert http_request(daemon.http_port, "POST", path, body=body,
                                headers=headers)[0] == 200
    assert labels(daemon) == {"h-logs": "laptops", "h-metrics": "laptops", "g-logs": "ops",
                              "g-metrics": "ops"}
    assert daemon.row("h-metrics")["prompt_tokens"] == 1234


def test_held_usage_keeps_the_token_that_carried_it(tokens_daemon: Daemon) -> None:
    """Usage whose span names no session waits on disk for its trace to name one; when a
    request with another token names it, the usage still counts as its own token's."""
    daemon = tokens_daemon
    trace = new_trace()
    calls = [make_span(trace_id=trace, span_id=i, parent_id=1, start=T0 + MS, end=T0 + 9 * MS,
                       attrs={"gen_ai.operation.name": "chat", "gen_ai.request.model": "m",
                              "gen_ai.usage.input_tokens": 100,
                              "gen_ai.usage.output_tokens": 10}) for i in (2, 3)]
    headers = {"Content-Type": "application/x-protobuf"}
    status, _, _ = http_request(daemon.http_port, "POST", "/v1/traces",
                                body=request_bytes(*calls),
                                headers={**headers, "Authorization": f"Bearer {INGEST}"})
    assert status == 200 and labels(daemon) == {}  # held: no session named yet
    # The agent span ends first here, so the held calls are the session's latest usage.
    root = make_span(trace_id=trace, span_id=1, start=T0, end=T0 + 2 * MS,
                     attrs={"gen_ai.operation.name": "invoke_agent",
                            "gen_ai.conversation.id": "s-held"})
    status, _, _ = http_request(daemon.http_port, "POST", "/v1/traces",
                                body=request_bytes(root),
                                headers={**headers, "Authorization": f"Bearer {BOTH}"})
    assert status == 200
    assert daemon.row("s-held")["prompt_tokens"] == 200
    assert labels(daemon) == {"s-held": "laptops"}


def test_legacy_token_sessions_are_labelled_default(start_daemon: StartDaemon,
                                                    tmp_path: Path) -> None:
    (tmp_path / "token").write_text("legacy-t0ken\n")
    daemon = start_daemon(f'[auth]\ntoken_file = "{tmp_path / "token"}"\n')
    assert otlp_post(daemon, Signal.TRACES, "legacy-t0ken", "legacy")[0] == 200
    assert web_get(daemon, "/api/overview", Authorization="Bearer legacy-t0ken")[0] == 200
    assert labels(daemon) == {"legacy": LEGACY_TOKEN_NAME}


async def test_an_existing_database_gets_the_credential_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE collector_session_labels (id TEXT PRIMARY KEY, agent TEXT, "
                 "agent_ns INTEGER NOT NULL DEFAULT -1, agent_version TEXT, "
                 "agent_version_ns INTEGER NOT NULL DEFAULT -1, user_name TEXT, "
                 "user_ns INTEGER NOT NULL DEFAULT -1, host TEXT, "
                 "host_ns INTEGER NOT NULL DEFAULT -1) WITHOUT ROWID")
    conn.execute("INSERT INTO collector_session_labels (id, agent) VALUES ('old', 'bot')")
    conn.commit()
    conn.close()
    store = SQLiteStore(path, retention_s=86400)
    await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT id, agent, credential, credential_ns "
                            "FROM collector_session_labels").fetchall()
    finally:
        conn.close()
    assert rows == [("old", "bot", None, -1)]


# -- reload ---------------------------------------------------------------------------------

def test_tokens_reload_on_sighup_and_on_file_change(start_daemon: StartDaemon,
                                                    tmp_path: Path) -> None:
    daemon = start_daemon(tokens_config(tmp_path))
    assert otlp_post(daemon, Signal.TRACES, INGEST, "before")[0] == 200
    # Revoked by editing its file, told by SIGHUP.
    mark = len(daemon.lines)
    (tmp_path / "laptops.token").write_text("rotated-ingest-t0ken\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for_line(daemon, "tokens reloaded (SIGHUP)", mark)
    assert otlp_post(daemon, Signal.TRACES, INGEST, "revoked")[0] == 401
    assert otlp_post(daemon, Signal.TRACES, "rotated-ingest-t0ken", "rotated")[0] == 200
    # A token added to the config file, without a signal: the file change is enough.
    mark = len(daemon.lines)
    added = daemon.config_path.read_text() + (
        '[[auth.tokens]]\nname = "ci"\nroles = ["ingest"]\n'
        f'sha256 = "{hashlib.sha256(b"ci-t0ken").hexdigest()}"\n')
    daemon.config_path.write_text(added)
    wait_for_line(daemon, "tokens reloaded (a file changed)", mark)
    assert otlp_post(daemon, Signal.TRACES, "ci-t0ken", "from-ci")[0] == 200
    # A bad edit keeps the tokens in effect and says why, naming the key and the file.
    mark = len(daemon.lines)
    daemon.config_path.write_text(added + '[[auth.tokens]]\nname = "ci"\nroles = ["read"]\n'
                                  f'sha256 = "{"1" * 64}"\n')
    line = wait_for_line(daemon, "tokens not reloaded", mark)
    assert f"{daemon.config_path}: auth.tokens[4].name" in line and "stay" in line
    assert otlp_post(daemon, Signal.TRACES, "ci-t0ken", "still")[0] == 200
    assert labels(daemon) == {"before": "laptops", "rotated": "laptops", "from-ci": "ci",
                              "still": "ci"}


def test_sighup_without_tokens_keeps_the_daemon_running(start_daemon: StartDaemon) -> None:
    """SIGHUP's default action would end the daemon; without tokens a reload is refused."""
    daemon = start_daemon()
    mark = len(daemon.lines)
    daemon.config_path.write_text(daemon.config_path.read_text() + (
        f'[[auth.tokens]]\nname = "late"\nroles = ["ingest"]\nsha256 = "{READ_SHA}"\n'))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    line = wait_for_line(daemon, "tokens not reloaded (SIGHUP)", mark)
    assert "cannot turn authentication on; restart" in line
    assert otlp_post(daemon, Signal.TRACES, None, "still-open")[0] == 200
    assert daemon.stop() == 0


# -- web sign-in sessions -------------------------------------------------------------------

def test_sign_in_cookie_is_random_and_logout_ends_it(tokens_daemon: Daemon) -> None:
    daemon = tokens_daemon
    status, first = sign_in(daemon, READ)
    assert (status, first["Location"]) == (303, "/")
    cookie = first["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert READ not in cookie and READ_SHA not in cookie
    _, second = sign_in(daemon, READ)
    assert cookie_of(first) != cookie_of(second)  # a new random id each time
    assert web_get(daemon, "/api/overview", Cookie=cookie_of(first))[0] == 200
    assert web_get(daemon, "/api/overview", Cookie=cookie_of(first) + "x")[0] == 401
    status, headers, _ = web_get(daemon, "/api/auth", Cookie=cookie_of(first))
    # Sign-out must be a POST from our own page: a GET, or a form from elsewhere, is refused.
    assert http_request(daemon.web_port, "GET", "/logout",
                        headers={"Cookie": cookie_of(first)})[0] == 405
    for cross in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                  {"Origin": "null"}):
        status, _, _ = http_request(daemon.web_port, "POST", "/logout",
                                    headers={"Cookie": cookie_of(first), **cross})
        assert status == 403, cross
    assert web_get(daemon, "/api/overview", Cookie=cookie_of(first))[0] == 200
    host = f"127.0.0.1:{daemon.web_port}"
    status, headers, _ = http_request(daemon.web_port, "POST", "/logout", headers={
        "Cookie": cookie_of(first), "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"})
    assert (status, headers["Location"]) == (303, "/login")
    assert web_get(daemon, "/api/overview", Cookie=cookie_of(first))[0] == 401
    assert web_get(daemon, "/api/overview", Cookie=cookie_of(second))[0] == 200


def test_sign_in_from_another_site_is_refused(tokens_daemon: Daemon) -> None:
    for cross in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                  {"Sec-Fetch-Site": "same-site"}):
        status, headers = sign_in(tokens_daemon, READ, **cross)
        assert status == 403 and "Set-Cookie" not in headers, cross
    status, headers = sign_in(tokens_daemon, READ, Origin=f"http://127.0.0.1:"
                              f"{tokens_daemon.web_port}", **{"Sec-Fetch-Site": "same-origin"})
    assert status == 303 and "Set-Cookie" in headers
    status, headers = sign_in(tokens_daemon, "wrong")
    assert (status, headers["Location"]) == (303, "/login?failed=1")


def test_cookie_is_secure_over_tls(start_daemon: StartDaemon, pki: Pki,  # noqa: F811
                                   tmp_path: Path) -> None:
    daemon = start_daemon(tokens_config(tmp_path) + f'[web.tls]\ncert_file = "{pki.cert}"\n'
                          f'key_file = "{pki.key}"\n')
    context = ssl.create_default_context(cafile=str(pki.ca))
    body = urllib.parse.urlencode({"token": READ}).encode()
    status, headers, _ = http_request(daemon.web_port, "POST", "/login", body=body, headers={
        "Content-Type": "application/x-www-form-urlencoded"}, context=context)
    assert status == 303
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("__Host-collector_session=") and "Secure" in cookie
    assert "Path=/" in cookie and "Domain" not in cookie
    status, _, _ = http_request(daemon.web_port, "GET", "/api/overview",
                                headers={"Cookie": cookie.split(";")[0]}, context=context)
    assert status == 200
    # The listener speaks TLS only; OTLP stays plain (no [tls]).
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        web_get(daemon, "/login")
    assert otlp_post(daemon, Signal.TRACES, INGEST, "plain-otlp")[0] == 200


def test_web_tls_client_ca_asks_browsers_for_a_certificate(start_daemon: StartDaemon,
                                                           pki: Pki,  # noqa: F811
                                                           tmp_path: Path) -> None:
    daemon = start_daemon(tokens_config(tmp_path) + f'[web.tls]\ncert_file = "{pki.cert}"\n'
                          f'key_file = "{pki.key}"\nclient_ca_file = "{pki.ca}"\n')
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        http_request(daemon.web_port, "GET", "/login", context=anonymous)
    with_cert = ssl.create_default_context(cafile=str(pki.ca))
    with_cert.load_cert_chain(pki.client_cert, pki.client_key)
    status, _, _ = http_request(daemon.web_port, "GET", "/api/overview", context=with_cert,
                                headers={"Authorization": f"Bearer {READ}"})
    assert status == 200


# -- Host checks (DNS rebinding) ------------------------------------------------------------

def test_without_tokens_only_the_listeners_own_names_are_answered(
        start_daemon: StartDaemon) -> None:
    daemon = start_daemon('[web]\nallowed_hosts = ["fleet.example.com"]\n'
                          '[receivers.otlp]\nallowed_hosts = ["collector.internal"]\n')
    web, otlp = daemon.web_port, daemon.http_port
    for host in (f"127.0.0.1:{web}", f"localhost:{web}", "fleet.example.com"):
        assert web_get(daemon, "/api/overview", Host=host)[0] == 200, host
    for host in (f"evil.example:{web}", f"127.0.0.1.evil.example:{web}",
                 "collector.internal"):
        status, _, payload = web_get(daemon, "/api/sessions", Host=host)
        assert status == 403 and b"web.allowed_hosts" in payload, host
        assert web_get(daemon, "/", Host=host)[0] == 403
    for host in (f"127.0.0.1:{otlp}", f"localhost:{otlp}", "collector.internal"):
        assert otlp_post(daemon, Signal.TRACES, None, "legit", host=host)[0] == 200, host
    for host in (f"evil.example:{otlp}", "fleet.example.com"):
        status, _, payload = otlp_post(daemon, Signal.TRACES, None, "rebound", host=host)
        assert status == 403 and b"receivers.otlp.allowed_hosts" in payload, host
    assert "rebound" not in daemon.rows() and "legit" in daemon.rows()


def test_with_tokens_the_token_is_what_counts_not_the_host(tokens_daemon: Daemon) -> None:
    daemon = tokens_daemon
    assert otlp_post(daemon, Signal.TRACES, INGEST, "via-proxy", host="collector.example")[0] \
        == 200
    assert web_get(daemon, "/api/overview", Host="fleet.example",
                   Authorization=f"Bearer {READ}")[0] == 200


# -- the sign-in flow in a real browser -----------------------------------------------------

@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context()
    ctx.set_default_timeout(20_000)
    yield ctx
    ctx.close()


def browser_sign_in(page: Any, daemon: Daemon, token: str) -> str:
    """Sign in through the form; returns the session cookie's value."""
    page.goto(daemon.web_url + "/")
    page.wait_for_url("**/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(daemon.web_url + "/")
    page.get_by_test_id("signout").wait_for()
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "collector_session"]
    value: str = cookie["value"]
    return value


def test_browser_sign_in_out_and_revocation(context: Any, start_daemon: StartDaemon,
                                            tmp_path: Path) -> None:
    assert CHROMIUM.exists() and CHROMIUM_ARGS
    (tmp_path / "finance.token").write_text(READ + "\n")
    (tmp_path / "audit.token").write_text("audit-t0ken\n")
    daemon = start_daemon(
        f'[[auth.tokens]]\nname = "laptops"\nroles = ["ingest"]\n'
        f'sha256 = "{token_digest(INGEST).hex()}"\n'
        f'[[auth.tokens]]\nname = "finance"\nroles = ["read"]\n'
        f'token_file = "{tmp_path / "finance.token"}"\n'
        f'[[auth.tokens]]\nname = "audit"\nroles = ["read"]\n'
        f'token_file = "{tmp_path / "audit.token"}"\n')
    assert otlp_post(daemon, Signal.TRACES, INGEST, "paid-by-laptops")[0] == 200
    page = context.new_page()

    # Signed in, shown by which token; the session's credential is on its page and in the
    # Credentials tab; signed out by the button; the cookie is then dead.
    first = browser_sign_in(page, daemon, READ)
    assert page.get_by_test_id("signed-in").inner_text() == "signed in as finance"
    page.goto(daemon.web_url + "/#/session/paid-by-laptops")
    assert page.locator('[data-fact="credential"]').inner_text() == "laptops"
    page.goto(daemon.web_url + "/#/who/credential")
    assert page.locator('[data-testid="who-table"] tbody tr').get_attribute("data-key") == \
        "laptops"
    assert web_get(daemon, "/api/overview", Cookie=f"collector_session={first}")[0] == 200
    page.get_by_test_id("signout").click()
    page.wait_for_url("**/login")
    assert web_get(daemon, "/api/overview", Cookie=f"collector_session={first}")[0] == 401

    # Revoked by editing the token's file and SIGHUP: the page is sent back to sign in.
    second = browser_sign_in(page, daemon, READ)
    assert second != first
    mark = len(daemon.lines)
    (tmp_path / "finance.token").write_text("new-finance-t0ken\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for_line(daemon, "tokens reloaded", mark)
    assert web_get(daemon, "/api/overview", Cookie=f"collector_session={second}")[0] == 401
    page.goto(daemon.web_url + "/")
    page.wait_for_url("**/login")

    # Revoked by removing the token from the config file, with no signal at all.
    third = browser_sign_in(page, daemon, "audit-t0ken")
    assert page.get_by_test_id("signed-in").inner_text() == "signed in as audit"
    mark = len(daemon.lines)
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text[:text.index('[[auth.tokens]]\nname = "audit"')])
    wait_for_line(daemon, "tokens reloaded (a file changed)", mark)
    assert web_get(daemon, "/api/overview", Cookie=f"collector_session={third}")[0] == 401
    page.reload()
    page.wait_for_url("**/login")
    # The wrong token is told so on the form.
    page.fill("#token", "audit-t0ken")
    page.click("button[type=submit]")
    page.wait_for_url("**/login?failed=1")
    assert page.locator("#failed").is_visible()


OLD_PG_LABELS = ("CREATE TABLE collector_session_labels (id TEXT COLLATE \"C\" PRIMARY KEY, "
                 "agent TEXT, agent_ns BIGINT NOT NULL DEFAULT -1, agent_version TEXT, "
                 "agent_version_ns BIGINT NOT NULL DEFAULT -1, user_name TEXT, "
                 "user_ns BIGINT NOT NULL DEFAULT -1, host TEXT, "
                 "host_ns BIGINT NOT NULL DEFAULT -1)")


def test_postgres_gets_the_column_and_stores_the_credential(start_daemon: StartDaemon,
                                                             tmp_path: Path,
                                                             pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(OLD_PG_LABELS)
        conn.execute("INSERT INTO collector_session_labels (id, agent) VALUES ('old', 'bot')")
    daemon = start_daemon(tokens_config(tmp_path), postgres_url=pg_url)
    assert otlp_post(daemon, Signal.TRACES, INGEST, "pg-laptop")[0] == 200
    grpc_export(daemon, Signal.TRACES, BOTH, "pg-ops")
    with psycopg.connect(pg_url) as conn:
        rows = dict(conn.execute("SELECT id, credential FROM collector_session_labels"))
    assert rows == {"old": None, "pg-laptop": "laptops", "pg-ops": "ops"}
    status, _, payload = web_get(daemon, "/api/who/credential", Authorization=f"Bearer {READ}")
    assert status == 200
    assert {line["credential"]: line["turns"] for line in json.loads(payload)["lines"]} == {
        "laptops": 1, "ops": 1}
