"""The `llm-assets` command: set up, materialize, inspect and restore the asset graph.

    llm-assets init [--postgres URL]                 # Dagster home + DVC remote (idempotent)
    llm-assets materialize [--select SEL] [--config configs/demo.yaml]
    llm-assets ingest [--config configs/demo.yaml]   # each new file in data/incoming/ (no daemon)
    llm-assets serve [--host 127.0.0.1] [--port 8000] [--model DIR] [--engine torch|llama.cpp]
    llm-assets status                                # latest versions, and what DVC sees
    llm-assets restore ASSET MD5                     # bring back an earlier artifact version
    llm-assets rollback [VERSION]                    # withdraw the canary, or serve the previous release

Runs go through the Dagster instance in $DAGSTER_HOME (default: <project>/.dagster), so they show
up in `dagster dev` exactly like runs launched from the UI. Selections use Dagster's selection
syntax (`raw_corpus`, `group:data`, `+deduped_shards`, ...).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from llm_assets.lib.common.atomic import owner, owner_gone
from llm_assets.lib.common.instance_config import (DRIVER_SCHEME, dagster_yaml, postgres_url_value, storage_kind,
                                                   with_driver, write_dagster_yaml)
from llm_assets.lib.common.paths import ProjectPaths, default_project_dir


# What `llm-assets init` writes to a new DAGSTER_HOME (SQLite); lib/common/instance_config.py is its
# one writer, `--postgres` included.
DAGSTER_YAML = dagster_yaml()
# What resources.artifact_metadata puts first in every artifact's metadata: the summary shows these
# on the asset's path line, not among its figures.
ARTIFACT_FIELDS = ("path", "dvc_md5", "files", "bytes")
# Run tag naming the process that executes a run this command launched ("<pid>@<host>"): runs
# execute inside that process, so once it is gone (killed) `status` can tell the run is dead.
RUN_OWNER_TAG = "llm_assets/owner"


def project_dir() -> Path:
    return default_project_dir()


def ensure_dagster_home(project: Path, postgres_url: str | None = None) -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(project / ".dagster"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    write_dagster_yaml(home, postgres_url)
    return home


def check_postgres(postgres_url: str) -> None:
    """Open an instance on the database before dagster.yaml points at it: this creates Dagster's
    tables, and an unreachable or refused database fails here, leaving the old file in place."""
    import tempfile

    import dagster as dg
    from dagster_postgres.utils import DagsterPostgresException

    with tempfile.TemporaryDirectory() as scratch:
        write_dagster_yaml(Path(scratch), postgres_url)
        try:
            with dg.DagsterInstance.from_config(scratch) as instance:
                instance.get_runs_count()
        except DagsterPostgresException as e:
            # dagster-postgres retried; its cause says why (refused, unknown host, bad password).
            cause = str(e.__cause__ or e).strip().splitlines()[0]
            raise SystemExit(f"--postgres: cannot open the database ({cause}); dagster.yaml left as it was") from None


def cmd_init(args: argparse.Namespace) -> int:
    from llm_assets.lib.common.versioning import init_dvc

    project = project_dir()
    if args.postgres:
        try:
            value = postgres_url_value(args.postgres)
            if isinstance(value, dict):  # env:NAME, read now as the instance will read it
                postgres_url_value(os.environ.get(value["env"], ""))
                if not os.environ[value["env"]].startswith(DRIVER_SCHEME):
                    raise ValueError(f"${value['env']} must name the driver: {with_driver(os.environ[value['env']])}")
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
        check_postgres(args.postgres)
    home = ensure_dagster_home(project, args.postgres)
    init_dvc(project)
    for directory in ProjectPaths(project).user_dirs():
        directory.mkdir(parents=True, exist_ok=True)
    print(f"project      {project}\nDAGSTER_HOME {home} ({storage_kind(home)} storage)\n"
          f"DVC          initialized, default remote configured")
    return 0


def _load_defs():
    from llm_assets.definitions import defs

    return defs()


def _run_config(paths: list[str], selected_ops: set[str], overrides: dict[str, dict] | None = None) -> dict:
    """Merge run-config YAML files; drop `ops` entries for assets outside the selection so one
    file (configs/demo.yaml) serves every selection."""
    from llm_assets.lib.common.run_config import merge

    merged = merge(paths, selected_ops, overrides)
    # Step-level DEBUG events drown the summary in a terminal; the UI keeps every event anyway.
    merged.setdefault("loggers", {"console": {"config": {"log_level": "INFO"}}})
    return merged


SELECTION_FORMS = ("Accepted forms: 'raw_corpus', 'key:a or key:b', '+lora_checkpoint' (and one layer up), "
                   "'lora_checkpoint+' (and one down), 'group:data', 'not group:monitoring'.")


def cmd_materialize(args: argparse.Namespace) -> int:
    import dagster as dg
    from dagster._core.definitions.asset_selection import DagsterInvalidAssetSelectionError  # not exported

    project = project_dir()
    ensure_dagster_home(project)
    defs = _load_defs()
    graph = defs.resolve_asset_graph()
    # By default everything but monitoring (drift_report needs serving traffic: select it by name)
    # and the incoming batches (partitions: `llm-assets ingest`, or incoming_data_sensor).
    try:
        keys = dg.AssetSelection.from_string(args.select or "not group:monitoring").resolve(graph)
    except (DagsterInvalidAssetSelectionError, dg.DagsterInvalidSubsetError) as e:
        print(f"--select {args.select!r}: {str(e).split('. ')[0]}. {SELECTION_FORMS}", file=sys.stderr)
        return 2
    keys = {k for k in keys if k in graph.materializable_asset_keys}
    partitioned = {k for k in keys if graph.get(k).is_partitioned}
    if partitioned and args.select:
        names = ", ".join(sorted(k.to_user_string() for k in partitioned))
        print(f"left out {names}: partitioned (one partition per incoming file), `llm-assets ingest` runs it",
              file=sys.stderr)
    keys -= partitioned
    if not keys:
        print(f"selection {args.select!r} matches no asset this command runs", file=sys.stderr)
        return 2
    job = defs.resolve_implicit_global_asset_job_def()
    run_config = _run_config(args.config, {k.to_user_string() for k in keys})
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(run_config=run_config, instance=instance, asset_selection=sorted(keys),
                                        raise_on_error=False, tags={RUN_OWNER_TAG: owner()})
        print_summary(instance, [k for k in graph.toposorted_asset_keys if k in keys], project, skipped_assets(result))
        print_evaluation(instance, project)
        refused = refused_gates(result)
    if not result.success:
        if refused:
            # The run did its job: a model that failed a gate was not released. Not a crash.
            names = ", ".join(f"{a.to_user_string()}:{c}" for a, c in refused)
            print(f"\nRELEASE REFUSED by blocking gate(s) {names}; the previous release stays "
                  f"(see the asset checks in `make ui`)", file=sys.stderr)
            return 0
        print(f"\nrun {result.run_id} FAILED; see `make ui` (Runs) for the logs", file=sys.stderr)
        return 1
    return 0


def refused_gates(result) -> list:
    """(asset key, check name) of the blocking checks that failed, when they explain every failed
    step of the run (a gate said no); [] when something else failed too (a crash)."""
    gates = [(e.asset_key, e.check_name) for e in result.get_asset_check_evaluations() if not e.passed and e.blocking]
    failed_steps = {e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"}
    return gates if gates and failed_steps <= {key.to_user_string() for key, _ in gates} else []


def print_evaluation(instance, project: Path) -> None:
    """The eval_report comparison table and the current release, when there are any."""
    import dagster as dg

    from llm_assets.lib.release.release import current_release

    event = instance.get_latest_materialization_event(dg.AssetKey("eval_report"))
    if event is not None:
        md = event.asset_materialization.metadata
        print(f"\nEvaluation ({Path(md['report'].value).relative_to(project)}):\n{md['comparison'].value}")
    current = current_release(ProjectPaths(project).releases)
    if current:
        print(f"\nReleased: {current['model']} {current['version'][:12]} at {current['released_at']} -> "
              f"{Path(current['path']).relative_to(project)}")


def _fmt(name: str, value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if name.endswith(("_rate", "_share", "_accuracy")):
            return f"{value:.2%}"
        if abs(value) >= 1e7:
            return f"{value:.3g}"  # FLOP counts and rates
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def figures(metadata: dict) -> list[tuple[str, object]]:
    """The entries of an asset's metadata that read as figures, in the order the asset emitted them:
    numbers, booleans and texts. Paths, markdown (tables, plots), JSON, empty texts and texts that
    are absolute paths are left to the UI; the artifact's own entries go on its path line."""
    import dagster as dg

    scalar = (dg.IntMetadataValue, dg.FloatMetadataValue, dg.BoolMetadataValue)
    return [(name, entry.value) for name, entry in metadata.items() if name not in ARTIFACT_FIELDS and (
        isinstance(entry, scalar)
        or (isinstance(entry, dg.TextMetadataValue) and entry.value and not os.path.isabs(entry.value)))]


def _wrap(items: list[str], width: int) -> list[str]:
    """`items` joined by two spaces into lines of at most `width` characters (longer items alone)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += "  " + item
        else:
            lines.append(item)
    return lines or [""]


def skipped_assets(result) -> dict[str, str]:
    """Asset name -> why the run left it out, from observations with `skipped` metadata (drift_report
    on too few rows): the latest materialization's figures are not this run's."""
    observations = [e.asset_observation_data.asset_observation for e in result.get_asset_observation_events()]
    return {o.asset_key.to_user_string(): o.metadata["skipped"].value for o in observations if "skipped" in o.metadata}


def print_summary(instance, keys, project: Path, skipped: dict[str, str] | None = None) -> None:
    width = max(60, shutil.get_terminal_size((120, 24)).columns - 20)  # right of the asset column
    print(f"\n{'asset':<19} figures")
    for key in keys:
        if key.to_user_string() in (skipped or {}):
            print(f"{key.to_user_string():<19} skipped: {skipped[key.to_user_string()]}")
            continue
        event = instance.get_latest_materialization_event(key)
        if event is None:
            print(f"{key.to_user_string():<17} not materialized")
            continue
        md = event.asset_materialization.metadata
        lines = _wrap([f"{name}={_fmt(name, value)}" for name, value in figures(md)], width)
        for name, line in zip([key.to_user_string(), *[""] * len(lines)], lines):
            print(f"{name:<19} {line}")
        if "path" in md:
            artifact = [f"dvc {md['dvc_md5'].value[:12] if 'dvc_md5' in md else '-'}",
                        *(f"{_fmt(n, md[n].value)} {n[:-1] if md[n].value == 1 else n}" for n in ("files", "bytes") if n in md)]
            print(f"{'':<19} {Path(md['path'].value).relative_to(project)}  ({', '.join(artifact)})")
    print(f"\nDagster home: {os.environ['DAGSTER_HOME']}\nOpen the UI:  make ui  ->  http://127.0.0.1:3000")


def cmd_status(args: argparse.Namespace) -> int:
    import dagster as dg

    from llm_assets.lib.common.versioning import dvc_status

    project = project_dir()
    ensure_dagster_home(project)
    defs = _load_defs()
    with dg.DagsterInstance.get() as instance:
        graph = defs.resolve_asset_graph()
        for key in [k for k in graph.toposorted_asset_keys if k in graph.materializable_asset_keys]:
            event = instance.get_latest_materialization_event(key)
            if event is None:
                print(f"{key.to_user_string():<17} never materialized")
                continue
            version = event.asset_materialization.tags.get("dagster/data_version", "-")
            print(f"{key.to_user_string():<17} {event.timestamp and _ts(event.timestamp)}  version {version}  run {event.run_id[:8]}")
        print_unfinished_runs(instance)
    status = dvc_status(project)
    print("\ndvc status: " + ("data and pipelines are up to date" if not status else ""))
    for stage, changes in status.items():
        # dvc status gives [{"changed deps": {path: state}}, {"changed outs": {...}}] per stage
        parts = [f"{kind} ({', '.join(f'{p} {st}' for p, st in paths.items())})"
                 for change in changes if isinstance(change, dict) for kind, paths in change.items()]
        print(f"  {stage}: {'; '.join(parts) or changes}")
    return 0


def print_unfinished_runs(instance) -> None:
    """Runs still STARTING or STARTED. Those this command launched whose process is gone (killed,
    they would show as running forever) are marked failed."""
    import dagster as dg

    records = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]))
    if records:
        print("\nruns not finished:")
    for record in records:
        run, tag = record.dagster_run, record.dagster_run.tags.get(RUN_OWNER_TAG)
        # The run was created by its owner process, so that process started before the run did.
        gone = owner_gone(tag, record.create_timestamp.timestamp()) if tag else None
        if gone:
            instance.report_run_failed(run, f"the process running it ({tag}) is gone, killed before the run "
                                            "ended; marked failed by `llm-assets status`")
            state = f"process {tag} is gone: marked FAILED"
        elif gone is None:  # no owner tag, or another host's process: Dagster's run monitoring is theirs
            state = "not checked (launched by the daemon, the UI or on another host)"
        else:
            state = f"running (process {tag})"
        print(f"  {run.run_id[:8]}  {_ts(record.create_timestamp.timestamp())}  {state}")


def _ts(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def cmd_restore(args: argparse.Namespace) -> int:
    import dagster as dg

    from llm_assets.lib.common.versioning import restore_version

    project = project_dir()
    ensure_dagster_home(project)
    version = restore_version(project, args.asset, args.md5)
    with dg.DagsterInstance.get() as instance:
        # The restore is recorded as an observation carrying the restored data version, so the UI
        # shows that the artifact on disk no longer matches the latest materialization.
        instance.report_runless_asset_event(dg.AssetObservation(
            asset_key=args.asset, tags={"dagster/data_version": version.md5},
            metadata={"restored_md5": version.md5, "path": dg.MetadataValue.path(str(project / version.path))}))
    print(f"restored {args.asset} to {version.md5} ({version.nfiles} files, {version.size:,} bytes) at {version.path}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Move data/releases/current.json back (lib/release/release.py's rollback): the server picks it
    up on its next request."""
    from llm_assets.lib.release.release import current_release, rollback

    releases = ProjectPaths(project_dir()).releases
    before = current_release(releases)
    try:
        record = rollback(releases, args.version)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if before and before.get("canary") and args.version is None:
        print(f"canary {before['canary']['version']} withdrawn; release {record['version']} answers every request")
    else:
        print(f"rolled back from {before['version']} to {record['version']} ({record['path']})")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """What incoming_data_sensor does, without the daemon: each file in data/incoming/ not ingested
    yet (no materialization of its batch: a batch whose run failed is taken again) becomes an
    incoming_batch partition, ingested and drift-reported by ingest_job."""
    import dagster as dg

    from llm_assets.defs.ingestion import incoming_batches, ingested_batches
    from llm_assets.defs.jobs import INGEST_ASSETS
    from llm_assets.lib.data import ingest

    project = project_dir()
    ensure_dagster_home(project)
    job = _load_defs().resolve_job_def("ingest_job")
    failed = 0
    for skipped in ingest.skipped_links(ProjectPaths(project).incoming):
        print(f"warning: {skipped}")
    with dg.DagsterInstance.get() as instance:
        ingested = ingested_batches(instance)
        for path in ingest.candidates(ProjectPaths(project).incoming):
            key = ingest.batch_key(path)
            if key in ingested and not args.again:
                print(f"{path.name}: batch {key} already ingested (--again to redo)")
                continue
            if not instance.has_dynamic_partition(incoming_batches.name, key):
                instance.add_dynamic_partitions(incoming_batches.name, [key])
            run_config = _run_config(args.config, set(INGEST_ASSETS), {"drift_report": {"incoming_batch": key}})
            result = job.execute_in_process(run_config=run_config, instance=instance, partition_key=key,
                                            raise_on_error=False,
                                            tags={"llm_assets/cause": "llm-assets ingest", RUN_OWNER_TAG: owner()})
            print_summary(instance, [dg.AssetKey(a) for a in INGEST_ASSETS], project, skipped_assets(result))
            failed += not result.success
            print(f"{path.name}: batch {key} {'ingested' if result.success else 'FAILED, run ' + result.run_id}")
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from llm_assets.serving.app import API_KEY_ENV, ServeSettings, serve

    paths = ProjectPaths(project_dir())
    flags = {"max_prompt_tokens": args.max_prompt_tokens, "max_new_tokens_cap": args.max_new_tokens,
             "max_batch_size": args.max_batch_size, "max_queue": args.max_queue, "torch_threads": args.threads,
             "api_key": args.api_key or os.environ.get(API_KEY_ENV) or None,
             "engine": args.engine, "gguf_type": args.gguf_type}  # a flag left out keeps the default
    settings = ServeSettings(releases_dir=paths.releases, log_dir=paths.serving, drift_dir=paths.artifact("drift_report"),
                             gguf_dir=paths.artifact("gguf_model"),
                             model_dir=Path(args.model).resolve() if args.model else None,
                             **{k: v for k, v in flags.items() if v is not None})
    # One batching thread per model uses every core (torch's default); SIGTERM/SIGINT shut down
    # gracefully, which flushes the request log.
    serve(settings, args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="prepare DAGSTER_HOME and DVC (idempotent)")
    p.add_argument("--postgres", metavar="URL", help="keep the Dagster instance (runs, events, schedules) in this "
                   "PostgreSQL database, e.g. postgresql://user:pw@host:5432/dagster, or env:VAR to read it from $VAR")
    p.set_defaults(fn=cmd_init)
    p = sub.add_parser("materialize", help="materialize all assets or a selection")
    p.add_argument("--select", help="Dagster asset selection, e.g. 'raw_corpus' or 'group:data' (default: all)")
    p.add_argument("--config", action="append", default=[], help="run-config YAML (repeatable), e.g. configs/demo.yaml")
    p.set_defaults(fn=cmd_materialize)
    p = sub.add_parser("ingest", help="ingest each new file in data/incoming/ and report its drift")
    p.add_argument("--config", action="append", default=[], help="run-config YAML (repeatable), e.g. configs/demo.yaml")
    p.add_argument("--again", action="store_true", help="ingest files whose batch was ingested before again")
    p.set_defaults(fn=cmd_ingest)
    sub.add_parser("status", help="latest versions and DVC status").set_defaults(fn=cmd_status)
    p = sub.add_parser("restore", help="restore an earlier version of an asset's artifact")
    p.add_argument("asset")
    p.add_argument("md5", help="the DVC hash shown as dvc_md5 in the asset's metadata")
    p.set_defaults(fn=cmd_restore)
    p = sub.add_parser("rollback", help="withdraw the running canary, or point the release back at the previous (or named) one")
    p.add_argument("version", nargs="?", help="an earlier released version (default: the current release's previous)")
    p.set_defaults(fn=cmd_rollback)
    p = sub.add_parser("serve", help="serve the released model over HTTP (POST /generate, /v1/chat/completions, "
                       "/v1/completions, /health, /metrics)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="serve this model directory instead of data/releases/current.json")
    # Defaults and meanings: ServeSettings in llm_assets/serving/app.py (not imported here: it loads torch).
    p.add_argument("--max-prompt-tokens", type=int, help="ServeSettings.max_prompt_tokens: longest prompt, in tokens")
    p.add_argument("--max-new-tokens", type=int, help="ServeSettings.max_new_tokens_cap: cap on a request's max_new_tokens")
    p.add_argument("--max-batch-size", type=int, help="ServeSettings.max_batch_size: requests decoded together")
    p.add_argument("--max-queue", type=int, help="ServeSettings.max_queue: requests waiting once the batch is full; more get 429")
    p.add_argument("--threads", type=int, help="ServeSettings.torch_threads: torch CPU threads (0: every core)")
    p.add_argument("--engine", choices=["torch", "llama.cpp"], help="ServeSettings.engine: torch (default) or "
                   "llama.cpp (the GGUF export of the served model, from gguf_model)")
    p.add_argument("--gguf-type", help="ServeSettings.gguf_type: which GGUF file llama.cpp serves (default q8_0)")
    p.add_argument("--api-key", help="ServeSettings.api_key: bearer token clients must send (default: $LLM_ASSETS_API_KEY; "
                   "none: no authentication, warned about off loopback)")
    p.set_defaults(fn=cmd_serve)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
