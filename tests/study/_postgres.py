"""A throwaway PostgreSQL server for the multi-worker test (issue 13): the OS package's binaries
(installed with apt-get when missing and this is root, as on CI), a cluster in a temporary folder
owned by an unprivileged user, listening on a free loopback port only, trust auth, stopped and
removed at the end."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

UNPRIVILEGED = "nobody"  # PostgreSQL refuses to run as root


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


def _install() -> str | None:
    """apt-get install postgresql; None, or why it could not be done."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "PostgreSQL is not installed and this is not root with apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}"
    return None


def server_binaries() -> tuple[Path | None, str]:
    """(the folder of initdb/pg_ctl, '') or (None, why not)."""
    folder = _bin_dir()
    if folder is None:
        why = _install()
        folder = _bin_dir()
        if folder is None:
            return None, why or "apt-get installed postgresql but pg_ctl is not found"
    return folder, ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_server(binaries: Path, *, user: str = "automerge") -> Iterator[str]:
    """A running server; yields its SQLAlchemy URL (psycopg 3)."""
    run_as: dict[str, object] = {}
    folder = Path(tempfile.mkdtemp(prefix="automerge-pg-"))
    if os.geteuid() == 0:
        account = pwd.getpwnam(UNPRIVILEGED)
        os.chown(folder, account.pw_uid, account.pw_gid)
        run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    data, port = folder / "data", _free_port()

    def run(*args: str) -> None:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=120, check=False, cwd=folder, **run_as
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stdout[-1000:]}{done.stderr[-1000:]}")

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        run(
            str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"
        )
        try:
            yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/postgres"
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
