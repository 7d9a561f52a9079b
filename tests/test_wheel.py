"""The package as an operator gets it: the sdist and the wheel hold every file of the package,
and the wheel, installed (not editable) into a fresh venv outside the checkout, runs the
daemon, takes an export and answers `collector sessions` and `collector report`.

The rest of the suite runs on an editable install, which reads data files from the checkout
and so cannot notice one left out of the wheel (builtin.toml once was: the installed daemon
could not load its config). Here nothing can come from the checkout: the commands run from
the venv's bin/, in a working directory under tmp_path, without PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collector import __version__
from tests.conftest import MS, READY_LINE, START_TIMEOUT_S, T0, free_port, make_span

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT_S = 900  # pip builds in fresh environments and compiles the C reader
UNIT = ROOT / "deploy" / "collector.service"
UNIT_PREFIX = "/opt/agent-usage-collector"  # where the unit expects the venv
CI_DIST = "COLLECTOR_DIST"  # set by the test command to what .ci/wheel built


@dataclass(frozen=True)
class Dist:
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Installed:
    venv: Path

    @property
    def collector(self) -> str:
        return str(self.venv / "bin" / "collector")


def clean_env() -> dict[str, str]:
    """The environment less anything that could point Python at the checkout."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}


def run(argv: list[str], *, cwd: Path, timeout: float = BUILD_TIMEOUT_S,
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=clean_env(), check=False)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result


def tracked_package_files() -> list[str]:
    """Every file under collector/ that git tracks (sources, data, the C reader and stub)."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "collector"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    files = [name for name in out.split("\0") if name]
    assert "collector/dialects/builtin.toml" in files
    return files


def built_by_ci() -> Path | None:
    """The directory `.ci/wheel` filled (sdist, wheel, venv), when the test command names it.

    CI builds and installs the package once, before the suite; testing that artifact rather
    than a second build means what CI proved installable is what these tests serve.
    """
    named = os.environ.get(CI_DIST)
    if not named:
        return None
    out = Path(named)
    assert (out / "venv" / "bin" / "collector").is_file(), f"{CI_DIST}={named}: no venv there"
    return out


def only(out: Path, pattern: str) -> Path:
    found = sorted(out.glob(pattern))
    assert len(found) == 1, f"{out}: expected one {pattern}, found {[p.name for p in found]}"
    return found[0]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The sdist, and the wheel built from that sdist (as a package index's users build it
    where no wheel fits): a file the sdist lacks is then missing from the wheel as well."""
    out = built_by_ci()
    if out is None:
        out = tmp_path_factory.mktemp("dist")
        run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)],
            cwd=out)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", str(only(out, "*.tar.gz")),
             "-w", str(out)], cwd=out)
    return Dist(sdist=only(out, "*.tar.gz"), wheel=only(out, "*.whl"))


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A fresh venv with the wheel installed, not editable (dependencies from the index)."""
    out = built_by_ci()
    if out is not None:
        return Installed(venv=out / "venv")
    venv = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=venv.parent)
    run([str(venv / "bin" / "pip"), "install", "-q", str(dist.wheel)], cwd=venv.parent)
    return Installed(venv=venv)


def test_sdist_and_wheel_hold_every_package_file(dist: Dist) -> None:
    tracked = tracked_package_files()
    with zipfile.ZipFile(dist.wheel) as wheel:
        in_wheel = set(wheel.namelist())
    with tarfile.open(dist.sdist) as sdist:
        # Every member sits under one top directory, agent_usage_collector-<version>/.
        in_sdist = {name.partition("/")[2] for name in sdist.getnames()}
    assert [f for f in tracked if f not in in_wheel] == []
    assert [f for f in tracked if f not in in_sdist] == []
    # What a deployment starts from comes with the source too.
    assert {"config.toml", "deploy/collector.service", "README.md", "setup.py",
            "pyproject.toml"} <= in_sdist
    # Nothing built or cached in the checkout leaks into the sdist.
    assert not [n for n in in_sdist if n.endswith((".so", ".pyc"))]


def test_version_is_the_installed_distributions(installed: Installed, tmp_path: Path) -> None:
    result = run([installed.collector, "--version"], cwd=tmp_path, timeout=60)
    assert result.stdout.strip() == f"collector {__version__}"
    where = run([str(installed.venv / "bin" / "python"), "-c",
                 "import collector; print(collector.__file__)"], cwd=tmp_path, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(installed.venv)


class Serving:
    """`collector serve` of the installed wheel; its log collected as it comes."""

    def __init__(self, installed: Installed, cwd: Path, *args: str) -> None:
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen([installed.collector, "serve", *args], cwd=cwd,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**clean_env(), "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self._reader.join(5)
                raise AssertionError("installed collector did not start:\n" + self.log)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if READY_LINE in line:
                self._ready.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def serving() -> Iterator[list[Serving]]:
    started: list[Serving] = []
    yield started
    for daemon in started:
        daemon.kill()


def test_installed_wheel_serves_an_export_then_sessions_and_report(
        installed: Installed, tmp_path: Path, serving: list[Serving]) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    work = tmp_path / "run"
    work.mkdir()
    http, grpc, ops, web = (free_port() for _ in range(4))
    # Listeners only: the database is the default, data/agent_sessions.db beside the config.
    (work / "collector.toml").write_text(
        f'[receivers.otlp]\ngrpc_endpoint = "127.0.0.1:{grpc}"\n'
        f'http_endpoint = "127.0.0.1:{http}"\n'
        f'[ops]\nendpoint = "127.0.0.1:{ops}"\n[web]\nendpoint = "127.0.0.1:{web}"\n')
    daemon = Serving(installed, work, "--config", "collector.toml")
    serving.append(daemon)
    span = make_span(trace_id=0xFEED, span_id=7, end=T0 + 5 * MS, attrs={
        "session.id": "wheel-session", "gen_ai.response.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 34})
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http}/v1/traces", timeout=20)
    try:
        assert exporter.export([span]) == SpanExportResult.SUCCESS, daemon.log
    finally:
        exporter.shutdown()
    assert (work / "data" / "agent_sessions.db").is_file()

    # While it runs: with the config, and without one (the defaults read ./data too).
    for config in (["--config", "collector.toml"], []):
        sessions = run([installed.collector, "sessions", "--json", *config], cwd=work,
                       timeout=60)
        (row,) = json.loads(sessions.stdout)
        assert (row["id"], row["model"], row["prompt_tokens"], row["completion_tokens"]) == (
            "wheel-session", "gpt-4o", 1200, 34)
        report = run([installed.collector, "report", "session", "--json", *config], cwd=work,
                     timeout=60)
        (line,) = json.loads(report.stdout)["lines"]
        assert (line["session"], line["input_tokens"], line["output_tokens"]) == (
            "wheel-session", 1200, 34)
        table = run([installed.collector, "report", "model", *config], cwd=work, timeout=60)
        assert "gpt-4o" in table.stdout and "1,234" in table.stdout
    assert daemon.stop() == 0, daemon.log


def namespace_prefix() -> list[str]:
    """argv that runs a command in a new network namespace with its loopback up, or [] when
    this machine cannot make one (unshare needs root or user namespaces; ip from iproute2)."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return []
    prefix = [unshare, "--net", "--", "sh", "-c", f'"{ip}" link set lo up && exec "$0" "$@"']
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=60, check=False)
    return prefix if probe.returncode == 0 else []


def test_installed_wheel_runs_on_its_defaults_without_any_config(
        installed: Installed, tmp_path: Path) -> None:
    """No --config anywhere: the documented ports (free in a network namespace of its own,
    whatever else listens on this host) and data under ./data; a second collector on the
    same defaults refuses at once naming the key to change, and harms nothing."""
    prefix = namespace_prefix()
    if not prefix:
        pytest.skip("no private network namespace here (unshare --net needs root); the "
                    "default ports may be in use by others on a shared host")
    driver = tmp_path / "driver.py"
    shutil.copy(ROOT / "tests" / "wheel_driver.py", driver)
    result = run([*prefix, str(installed.venv / "bin" / "python"), str(driver)],
                 cwd=tmp_path, timeout=300)
    seen = json.loads(result.stdout)
    assert (seen["export"], seen["readyz"], seen["web"]) == (200, 200, 200), seen
    second = seen["second"]
    assert second["code"] == 1, second
    assert "receivers.otlp.grpc_endpoint" in second["stderr"], second
    assert "no --config" in second["stderr"], second
    assert second["left"] == [], second  # no database, no directory: nothing was started
    assert seen["readyz_after_second"] == 200
    assert seen["serve_exit"] == 0
    assert "agent_sessions.db" in seen["database"]
    assert seen["sessions"]["code"] == 0, seen["sessions"]
    (row,) = json.loads(seen["sessions"]["stdout"])
    assert (row["id"], row["prompt_tokens"], row["completion_tokens"]) == (
        "defaults-session", 120, 7)
    assert seen["report"]["code"] == 0, seen["report"]
    (line,) = json.loads(seen["report"]["stdout"])["lines"]
    assert line["session"] == "defaults-session" and line["total_tokens"] == 127


def test_systemd_unit_verifies_against_the_installed_wheel(installed: Installed,
                                                          tmp_path: Path) -> None:
    """The unit as shipped, its /opt venv replaced by the fresh one (so its commands exist),
    passes `systemd-analyze verify`, where systemd is installed."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (Debian: apt-get install systemd)")
    text = UNIT.read_text()
    assert f"{UNIT_PREFIX}/bin/collector " in text
    unit = tmp_path / "agent-usage-collector.service"
    unit.write_text(text.replace(UNIT_PREFIX, str(installed.venv)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
