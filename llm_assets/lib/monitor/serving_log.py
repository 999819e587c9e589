"""The serving log: every request the model server answered, as Parquet parts under `data/serving/`.

    >>> import tempfile
    >>> from datetime import datetime, timedelta, timezone
    >>> from pathlib import Path
    >>> from llm_assets.lib.monitor.serving_log import ServingLog, parts, read_log
    >>> directory = Path(tempfile.mkdtemp())            # data/serving/ in a project
    >>> now = datetime.now(timezone.utc)
    >>> log = ServingLog(directory, flush_rows=2, flush_seconds=5.0)
    >>> for minutes_ago, prompt in [(90, "old"), (2, "Explain f()."), (1, "What does g do?")]:
    ...     log.append({"time": now - timedelta(minutes=minutes_ago), "prompt": prompt,
    ...                 "response": "...", "status": "ok"})      # thread-safe, buffered
    >>> len(parts(directory))          # two rows made one part; the third waits in memory
    1
    >>> log.close()                    # flushes what is left
    >>> len(parts(directory)), read_log(directory).num_rows
    (2, 3)
    >>> read_log(directory, since=now - timedelta(hours=1))["prompt"].to_pylist()
    ['Explain f().', 'What does g do?']

Rows are buffered in memory and written as a new part file `requests-<utc time>-<pid>-<token>-<n>.parquet`
when `flush_rows` rows are waiting, when the oldest waiting row is `flush_seconds` old (a
background timer), and on close (the server's shutdown, which uvicorn runs on SIGTERM and SIGINT).
Each part is written to a dot-prefixed temp file and renamed, so a reader never sees half a part.
Parts are never rewritten: appending is writing a new part, which is what lets the log grow
without a lock across processes.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([
    ("time", pa.timestamp("us", tz="UTC")),
    ("request_id", pa.string()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("response_tokens", pa.int32()),
    ("latency_seconds", pa.float64()),
    ("model_version", pa.string()),
    ("status", pa.string()),  # "ok" or the error class of a request that failed during generation
    ("engine", pa.string()),  # what ran the model: torch | llama.cpp (null in parts written before it was logged)
])
PART_GLOB = "requests-*.parquet"


class ServingLog:
    def __init__(self, directory: Path, flush_rows: int = 64, flush_seconds: float = 5.0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._parts = 0
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._oldest: float | None = None
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._flush_periodically, name="serving-log-flush", daemon=True)
        self._timer.start()

    def append(self, row: dict) -> None:
        with self._lock:
            self._rows.append(row)
            self._oldest = self._oldest or time.monotonic()
            full = len(self._rows) >= self.flush_rows
        if full:
            self.flush()

    def flush(self) -> Path | None:
        """Write the waiting rows as one part; returns its path (None when nothing waited)."""
        with self._lock:
            rows, self._rows, self._oldest = self._rows, [], None
            if not rows:
                return None
            self._parts += 1
            # time first (parts sort by age), then this log's own token: two logs never share a name
            name = f"requests-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{self._token}-{self._parts:06d}.parquet"
            path, tmp = self.directory / name, self.directory / f".{name}.tmp"
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
            os.replace(tmp, path)
            return path

    def _flush_periodically(self) -> None:
        while not self._stop.wait(min(1.0, self.flush_seconds)):
            with self._lock:
                due = self._oldest is not None and time.monotonic() - self._oldest >= self.flush_seconds
            if due:
                self.flush()

    def close(self) -> None:
        self._stop.set()
        self._timer.join()
        self.flush()


def parts(directory: Path) -> list[Path]:
    """The complete part files, oldest first (a part being written is a dot-prefixed temp file)."""
    return sorted(Path(directory).glob(PART_GLOB)) if Path(directory).is_dir() else []


def read_log(directory: Path, since=None) -> pa.Table:
    """All parts as one table (empty with the schema when there are none), rows at or after `since`
    (a timezone-aware datetime) when given."""
    files = parts(directory)
    table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in files]) if files else SCHEMA.empty_table()
    if since is not None and table.num_rows:
        import pyarrow.compute as pc

        table = table.filter(pc.greater_equal(table["time"], pa.scalar(since, type=SCHEMA.field("time").type)))
    return table
