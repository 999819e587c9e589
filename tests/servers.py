"""Real servers for tests, from Debian's packages: each starts in a temporary directory on a free
loopback port, as a child of the test (never a system service), and is stopped when the `with`
block ends, whatever happened inside it.

    with redis_server() as url:          # redis://127.0.0.1:PORT/0
        ...
    with postgres_server() as url:       # postgresql://dagster@127.0.0.1:PORT/dagster
        ...
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from dagster_procs import free_port

# Debian's layout: /usr/lib/postgresql/<major>/bin (not on PATH); the newest installed (15 on bookworm).
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]),
             default=Path("/usr/lib/postgresql/15/bin/pg_ctl")).parent
PG_USER = "dagster"  # the cluster's superuser; trust authentication on loopback only


def _wait(ready, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout} s:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """redis-server 7 with no persistence (`--save ''`, no AOF), in memory only."""
    import redis

    port, base = free_port(), Path(tempfile.mkdtemp(prefix="llm-assets-redis-"))
    log = base / "redis.log"
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(base), "--logfile", str(log)], stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}: {log.read_text(errors='replace')}")
            try:
                return redis.Redis.from_url(url).ping()
            except redis.ConnectionError:
                return False
        _wait(ready, "redis-server", log)
        yield url
    finally:
        proc.terminate()  # SIGTERM: redis shuts down (nothing to save)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def _as_owner(cmd: list) -> list[str]:
    """`initdb` refuses to run as root: as root, run PostgreSQL as the `postgres` user."""
    cmd = [str(c) for c in cmd]
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_server(db: str = "dagster") -> Iterator[str]:
    """PostgreSQL (15 here): `initdb` in a temporary directory, `pg_ctl start` on a free loopback port with
    the socket in that directory, one empty database `db`; `pg_ctl stop` and the directory removed."""
    import psycopg2

    port, base = free_port(), Path(tempfile.mkdtemp(prefix="llm-assets-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data, log = base / "data", base / "postgres.log"
    try:
        # --no-sync and fsync=off: a throwaway cluster need not survive a power cut; both save seconds.
        _pg(["initdb", "-D", data, "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync"], log)
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        _pg(["pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start"], log)
        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres")) as conn:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            conn.cursor().execute(f'CREATE DATABASE "{db}"')
        yield f"postgresql://{PG_USER}@127.0.0.1:{port}/{db}"
    finally:
        if (data / "postmaster.pid").exists():
            _pg(["pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], log)
        shutil.rmtree(base, ignore_errors=True)


def _pg(cmd: list, log: Path) -> None:
    """One PostgreSQL program from PG_BIN; a failure raises with its output and the server's log."""
    done = subprocess.run(_as_owner([PG_BIN / cmd[0], *cmd[1:]]), capture_output=True, text=True)
    if done.returncode:
        server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{cmd[0]} exited with {done.returncode}:\n{done.stdout}{done.stderr}\n{server_log}")
