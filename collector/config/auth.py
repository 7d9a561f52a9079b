"""[auth] and the exposure of the listeners: named tokens with roles, the web listener's TLS,
plaintext opt-in and the Host names each listener answers.

Tokens are named, and each has roles: `ingest` (the OTLP services) and/or `read` (the fleet
view and its API). Each is held as the SHA-256 of its text only (from a `token_file`, or given
as `sha256` in the file), so the config and memory hold no usable secret for tokens given by
hash. The legacy single `[auth] token_file` is one token named LEGACY_TOKEN_NAME with both roles.

`load_auth` re-reads only the [auth] section and the token files, for a reload without restart
(SIGHUP, or a change to one of the files; collector.daemon). It raises ConfigError like the
first load, so a bad edit keeps the tokens in effect.

Pure: no I/O beyond reading the named files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import collector.config as _config  # the package; only used at call time (it imports us)

ROLE_INGEST = "ingest"
ROLE_READ = "read"
ROLES = (ROLE_INGEST, ROLE_READ)
# The name the single `[auth] token_file` token goes by (in the credential label too).
LEGACY_TOKEN_NAME = "default"
MAX_TOKEN_FILE_BYTES = 4096
# A token's name is stored with every session it carried and shown on pages and in reports.
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
TOKEN_KEYS = ("name", "roles", "token_file", "sha256")
AUTH_KEYS = ("token_file", "tokens")
MAX_TOKENS = 10_000
MAX_ALLOWED_HOSTS = 256
HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\.?")
# Host names every listener answers whatever its address (DNS rebinding cannot make these).
LOCAL_HOST_NAMES = ("localhost",)


def token_digest(token: str) -> bytes:
    """What a token is known by: its SHA-256 (of its ASCII text, without surrounding space)."""
    return hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True, slots=True)
class TokenSpec:
    name: str
    roles: frozenset[str]
    digest: bytes = field(repr=False)
    file: Path | None = None  # where its text is read from, if not given as sha256


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """The tokens in effect. No tokens: authentication is off (loopback-only rules apply)."""

    tokens: tuple[TokenSpec, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    @property
    def files(self) -> tuple[Path, ...]:
        """The token files to watch for changes."""
        return tuple(t.file for t in self.tokens if t.file is not None)


@dataclass(frozen=True, slots=True)
class WebAccess:
    """How the fleet view's listener may be reached."""

    tls: _config.TlsConfig | None = None  # [web.tls], else [tls] without its client CA
    allow_plaintext: bool = False
    allowed_hosts: tuple[str, ...] = ()


def read_token_file(source: str, key: str, path: Path) -> str:
    """A token file's one token. Never logged or printed."""
    raw = _config._readable(source, key, path)
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise _config.ConfigError(source, key, f"{path} is too large for a token")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _config.ConfigError(source, key, f"{path}: token must be ASCII") from None
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise _config.ConfigError(source, key, f"{path}: must hold one token without spaces")
    return token


def parse_auth(values: Mapping[str, Any], *, source: str, base_dir: Path) -> AuthConfig:
    """`values`: the flattened config ("auth.token_file", "auth.tokens")."""
    tokens: list[tuple[str, TokenSpec]] = []  # (its key in the file, the token)
    legacy = values.get("auth.token_file", "")
    if legacy.strip():
        path = _config._resolve(base_dir, legacy)
        text = read_token_file(source, "auth.token_file", path)
        tokens.append(("auth.token_file", TokenSpec(LEGACY_TOKEN_NAME, frozenset(ROLES),
                                                    token_digest(text), path)))
    table = values.get("auth.tokens", [])
    if not isinstance(table, list):
        raise _config.ConfigError(source, "auth.tokens",
                                  "must be an array of tables ([[auth.tokens]])")
    if len(table) > MAX_TOKENS:
        raise _config.ConfigError(source, "auth.tokens", f"at most {MAX_TOKENS} tokens")
    for index, item in enumerate(table):
        key = f"auth.tokens[{index}]"
        tokens.append((key, _parse_token(source, base_dir, key, item)))
    names: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for key, token in tokens:
        if token.name in names:
            raise _config.ConfigError(source, f"{key}.name", f"{token.name!r} is already the "
                                      f"name of {names[token.name]}")
        if token.digest in digests:
            raise _config.ConfigError(source, key, f"same token as {digests[token.digest]}; "
                                      "each name needs its own token")
        names[token.name] = key
        digests[token.digest] = key
    return AuthConfig(tokens=tuple(token for _, token in tokens))


def _parse_token(source: str, base_dir: Path, key: str, item: Any) -> TokenSpec:
    if not isinstance(item, dict):
        raise _config.ConfigError(source, key, "must be a table with name, roles and "
                                  "token_file or sha256")
    for name in item:
        if name not in TOKEN_KEYS:
            raise _config.ConfigError(source, f"{key}.{name}", "unknown key")
    name = item.get("name")
    if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
        raise _config.ConfigError(source, f"{key}.name",
                                  "required: 1-64 letters, digits, '.', '_' or '-', starting "
                                  f"with a letter or digit; got {name!r}")
    roles = item.get("roles")
    if (not isinstance(roles, list) or not roles
            or any(not isinstance(r, str) or r not in ROLES for r in roles)):
        raise _config.ConfigError(source, f"{key}.roles",
                                  f'required: a list of "{ROLE_INGEST}" and/or "{ROLE_READ}"; '
                                  f"got {roles!r}")
    if len(set(roles)) != len(roles):
        raise _config.ConfigError(source, f"{key}.roles", f"a role is listed twice: {roles!r}")
    file_value = item.get("token_file")
    hex_value = item.get("sha256")
    if (file_value is None) == (hex_value is None):
        raise _config.ConfigError(source, key, "needs exactly one of token_file and sha256")
    if file_value is not None:
        if not isinstance(file_value, str) or not file_value.strip():
            raise _config.ConfigError(source, f"{key}.token_file",
                                      f"must be a file name; got {file_value!r}")
        path = _config._resolve(base_dir, file_value)
        text = read_token_file(source, f"{key}.token_file", path)
        return TokenSpec(name, frozenset(roles), token_digest(text), path)
    if not isinstance(hex_value, str) or not SHA256_HEX.fullmatch(hex_value):
        raise _config.ConfigError(source, f"{key}.sha256",
                                  "must be 64 hex digits (e.g. `printf %s TOKEN | sha256sum`)")
    return TokenSpec(name, frozenset(roles), bytes.fromhex(hex_value))


def load_auth(path: Path) -> AuthConfig:
    """Re-read the [auth] section of a config file and its token files (for a reload).

    Only [auth] is taken: other sections take effect at the next start."""
    source = str(path)
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise _config.ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _config.ConfigError(source, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise _config.ConfigError(source, "", f"invalid TOML: {exc}") from None
    section = doc.get("auth", {})
    if not isinstance(section, dict):
        raise _config.ConfigError(source, "auth", "must be a table")
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in AUTH_KEYS:
            raise _config.ConfigError(source, f"auth.{key}", "unknown key")
        if key == "token_file" and not isinstance(value, str):
            raise _config.ConfigError(source, "auth.token_file", f"must be a str; got {value!r}")
        values[f"auth.{key}"] = value
    return parse_auth(values, source=source, base_dir=path.resolve().parent)


def parse_allowed_hosts(source: str, key: str, value: Any) -> tuple[str, ...]:
    """Host names (or IP addresses) a listener answers besides its own address and
    localhost; lower case, without a port."""
    if not isinstance(value, list):
        raise _config.ConfigError(source, key, f"must be a list of host names; got {value!r}")
    if len(value) > MAX_ALLOWED_HOSTS:
        raise _config.ConfigError(source, key, f"at most {MAX_ALLOWED_HOSTS} names")
    hosts: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise _config.ConfigError(source, key, f"must be a list of host names; got {item!r}")
        host = item.strip().lower()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not _is_ip(host) and not HOST_NAME.fullmatch(host):
            raise _config.ConfigError(source, key, f"{item!r} is not a host name or IP address "
                                      "(give it without a port or scheme)")
        hosts.append(host.rstrip("."))
    return tuple(hosts)


def parse_web_access(values: Mapping[str, Any], *, source: str, base_dir: Path,
                     tls: _config.TlsConfig | None) -> WebAccess:
    """[web] tls, allow_plaintext and allowed_hosts. `tls`: the [tls] section, used when
    [web.tls] is absent."""
    table = values.get("web.tls")
    # [tls]'s certificate, but not its client CA: browsers seldom hold client certificates
    # (a [web.tls] client_ca_file asks for them).
    web_tls = None if tls is None else _config.TlsConfig(tls.cert_file, tls.key_file)
    if table is not None:
        flat: dict[str, Any] = {}
        for key, value in table.items():
            if key not in ("cert_file", "key_file", "client_ca_file"):
                raise _config.ConfigError(source, f"web.tls.{key}", "unknown key")
            if not isinstance(value, str):
                raise _config.ConfigError(source, f"web.tls.{key}",
                                          f"must be a str; got {value!r}")
            flat[f"web.tls.{key}"] = value
        web_tls = _config._parse_tls(source, base_dir, flat, prefix="web.tls")
    return WebAccess(tls=web_tls, allow_plaintext=values.get("web.allow_plaintext", False),
                     allowed_hosts=parse_allowed_hosts(source, "web.allowed_hosts",
                                                       values.get("web.allowed_hosts", [])))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
