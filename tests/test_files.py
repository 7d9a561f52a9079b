"""The SQLite files of a real daemon: a place others could tamper with is refused at start with
an error naming it; a symbolic link is followed only to an existing file this user owns; the
-wal and -shm files have the database file's mode."""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_span
from tests.test_receivers import new_trace


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def refused(daemon: Daemon) -> str:
    """Start a daemon that must refuse; its log."""
    with pytest.raises(RuntimeError, match="did not start"):
        daemon.start()
    assert daemon.proc is not None and daemon.proc.returncode == 1, daemon.log
    assert "cannot start" in daemon.log and "Traceback" not in daemon.log, daemon.log
    return daemon.log


def export_one(daemon: Daemon, session: str) -> None:
    daemon.export_http([make_span(trace_id=new_trace(), attrs={
        "session.id": session, "gen_ai.response.model": "m",
        "gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 1})])


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o1777])
def test_a_data_directory_others_can_write_is_refused(tmp_path: Path, daemons: list[Daemon],
                                                      bits: int) -> None:
    data = tmp_path / "shared"
    data.mkdir()
    data.chmod(bits)
    daemon = Daemon(tmp_path / "d", db_path=data / "sessions.db")
    daemons.append(daemon)
    log = refused(daemon)
    assert f"data directory {data} is writable by group or others" in log
    assert f"{bits & 0o7777:04o}" in log
    assert list(data.iterdir()) == []  # no database was created there


@pytest.mark.parametrize("bits", [0o666, 0o620, 0o602])
def test_a_database_file_others_can_write_is_refused(tmp_path: Path, daemons: list[Daemon],
                                                     bits: int) -> None:
    first = Daemon(tmp_path / "d", db_path=tmp_path / "d" / "data" / "sessions.db")
    daemons.append(first)
    first.start()
    export_one(first, "before")
    assert first.stop() == 0
    first.db_path.chmod(bits)
    log = refused(first)
    assert f"database file {first.db_path} is writable by group or others" in log


def test_a_dangling_symlink_is_never_followed(tmp_path: Path, daemons: list[Daemon]) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    target = tmp_path / "elsewhere" / "planted.db"
    target.parent.mkdir(mode=0o700)
    link = data / "sessions.db"
    link.symlink_to(target)
    daemon = Daemon(tmp_path / "d", db_path=link)
    daemons.append(daemon)
    log = refused(daemon)
    assert f"database path {link} is a symbolic link" in log and "does not exist" in log
    assert not target.exists() and list(target.parent.iterdir()) == []
    assert link.is_symlink()


def test_a_symlink_to_what_is_not_a_regular_file_is_refused(tmp_path: Path,
                                                            daemons: list[Daemon]) -> None:
    link = tmp_path / "data" / "sessions.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to("/dev/null")
    daemon = Daemon(tmp_path / "d", db_path=link)
    daemons.append(daemon)
    assert "not a regular file owned by this user" in refused(daemon)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file owned by another user needs root")
def test_a_symlink_to_another_users_file_is_refused(tmp_path: Path,
                                                    daemons: list[Daemon]) -> None:
    other = pwd.getpwnam("nobody")
    target = tmp_path / "theirs" / "their.db"
    target.parent.mkdir(mode=0o700)
    target.touch(mode=0o600)
    os.chown(target, other.pw_uid, other.pw_gid)
    link = tmp_path / "data" / "sessions.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(target)
    daemon = Daemon(tmp_path / "d", db_path=link)
    daemons.append(daemon)
    assert "not a regular file owned by this user" in refused(daemon)
    assert target.stat().st_size == 0


def test_a_symlink_to_an_own_database_is_followed(tmp_path: Path,
                                                  daemons: list[Daemon]) -> None:
    target = tmp_path / "real" / "sessions.db"
    target.parent.mkdir(mode=0o700)
    target.touch(mode=0o600)
    link = tmp_path / "data" / "sessions.db"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(target)
    daemon = Daemon(tmp_path / "d", db_path=link)
    daemons.append(daemon)
    daemon.start()
    export_one(daemon, "through-the-link")
    assert daemon.row("through-the-link")["prompt_tokens"] == 3
    assert link.is_symlink() and target.stat().st_size > 0
    assert daemon.stop() == 0


def test_wal_and_shm_get_the_database_files_mode(tmp_path: Path, daemons: list[Daemon]) -> None:
    """Under umask 0 (so nothing but the collector decides), with the database relaxed to
    0640 by its operator and the -wal/-shm files a killed daemon left behind (not empty, so
    SQLite keeps their mode) at 0666: both end up 0640, and nothing committed is lost."""
    daemon = Daemon(tmp_path / "d", db_path=tmp_path / "d" / "data" / "sessions.db")
    daemons.append(daemon)
    daemon.start()
    export_one(daemon, "first")
    daemon.kill()
    db = daemon.db_path
    assert mode(db) == 0o600 and mode(db.parent) == 0o700
    db.chmod(0o640)
    for suffix in ("-wal", "-shm"):
        left = Path(f"{db}{suffix}")
        assert left.stat().st_size > 0
        left.chmod(0o666)
    old = os.umask(0)
    try:
        daemon.start()
    finally:
        os.umask(old)
    export_one(daemon, "second")
    assert (mode(Path(f"{db}-wal")), mode(Path(f"{db}-shm"))) == (0o640, 0o640)
    assert daemon.stop() == 0
    assert set(daemon.rows()) == {"first", "second"}


def test_new_wal_and_shm_files_get_the_database_files_mode(tmp_path: Path,
                                                           daemons: list[Daemon]) -> None:
    """Created by SQLite under umask 0: they still get the database file's mode, not 0666."""
    daemon = Daemon(tmp_path / "d", db_path=tmp_path / "d" / "data" / "sessions.db")
    daemons.append(daemon)
    old = os.umask(0)
    try:
        daemon.start()
    finally:
        os.umask(old)
    export_one(daemon, "fresh")
    db = daemon.db_path
    assert [mode(db), mode(Path(f"{db}-wal")), mode(Path(f"{db}-shm"))] == [0o600] * 3
    assert daemon.stop() == 0
