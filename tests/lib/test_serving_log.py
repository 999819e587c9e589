from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from llm_assets.lib.monitor.serving_log import SCHEMA, ServingLog, parts, read_log


def row(prompt: str, when=None) -> dict:
    return {"time": when or datetime.now(timezone.utc), "request_id": prompt, "prompt": prompt, "response": "r",
            "prompt_tokens": 1, "response_tokens": 1, "latency_seconds": 0.1, "model_version": "v", "status": "ok",
            "engine": "torch"}


def test_buffered_parts_are_flushed_by_size_time_and_close(tmp_path):
    log = ServingLog(tmp_path, flush_rows=3, flush_seconds=0.2)
    for i in range(4):
        log.append(row(f"p{i}"))
    assert read_log(tmp_path).num_rows == 3  # the size flush
    deadline = datetime.now() + timedelta(seconds=5)
    while read_log(tmp_path).num_rows < 4 and datetime.now() < deadline:
        pass  # the timer flushes the fourth
    assert read_log(tmp_path).num_rows == 4
    log.append(row("p4"))
    log.close()
    assert sorted(read_log(tmp_path)["prompt"].to_pylist()) == [f"p{i}" for i in range(5)]
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_two_logs_in_one_second_never_overwrite_each_other_and_windows_filter(tmp_path):
    old = datetime.now(timezone.utc) - timedelta(days=2)
    for prompt, when in (("a", old), ("b", None)):
        log = ServingLog(tmp_path)
        log.append(row(prompt, when))
        log.close()
    assert sorted(read_log(tmp_path)["prompt"].to_pylist()) == ["a", "b"]
    recent = read_log(tmp_path, since=datetime.now(timezone.utc) - timedelta(days=1))
    assert recent["prompt"].to_pylist() == ["b"]
    assert read_log(tmp_path / "missing").num_rows == 0


def test_rows_read_back_as_written_one_part_per_flush(tmp_path):
    log = ServingLog(tmp_path, flush_rows=100)
    written = [row(f"p{i}") for i in range(3)]
    for r in written[:2]:
        log.append(r)
    first = log.flush()
    log.append(written[2])
    log.close()
    assert parts(tmp_path)[0] == first and len(parts(tmp_path)) == 2 and parts(tmp_path / "missing") == []
    (tmp_path / f".{first.name}.tmp").write_bytes(b"half a part")  # a part being written is not read
    assert read_log(tmp_path).to_pylist() == written
    assert pq.read_schema(first) == SCHEMA


def test_parts_written_before_the_engine_column_read_back_with_it_null(tmp_path):
    old_schema = SCHEMA.remove(SCHEMA.get_field_index("engine"))
    written = row("old")
    pq.write_table(pa.Table.from_pylist([{k: written[k] for k in old_schema.names}], schema=old_schema),
                   tmp_path / "requests-20260101T000000-1-abcd-000001.parquet")
    assert read_log(tmp_path).to_pylist() == [{**written, "engine": None}]
