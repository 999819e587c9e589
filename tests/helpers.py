"""Helpers shared by the tests (importable because pytest's `pythonpath` includes tests/): test
modules share code through this module and fixtures through conftest.py, never by importing each
other (tests/test_every_module_tested.py checks)."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import yaml

# dagster is imported inside the helpers that need it: conftest.py imports this module in every
# session, lib tests included, and those never load dagster.
REPO = Path(__file__).resolve().parents[1]
# What base_checkpoint is trained from, and the post-training assets after it, in graph order.
UPSTREAM = ["raw_corpus", "clean_corpus", "deduped_shards", "tokenizer", "tokenized_shards"]
POST = ["sft_dataset", "preference_dataset", "lora_checkpoint", "aligned_checkpoint"]


def make_project(base: Path) -> Path:
    """A project root like the checkout: dvc.yaml, the code it lists as deps, data/raw, and DVC
    initialized with a local-directory remote beside it."""
    from llm_assets.lib.common.versioning import init_dvc

    root = base / "project"
    root.mkdir()
    # A git work tree with the checkout's .gitignore, as after `git clone`: DVC behaves differently
    # in git mode (it refuses a git-ignored dvc.lock, writes .gitignore entries for outputs).
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "llm_assets").symlink_to(REPO / "llm_assets")  # dvc.yaml lists code files as deps
    for user_dir in ("raw", "sft", "preferences"):
        (root / "data" / user_dir).mkdir(parents=True)
    init_dvc(root, remote_url=str(base / "remote"))
    return root


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped, as a SIGKILLed run's is."""
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    return int(done.stdout)


def load_tiny_config(assets: list[str] | None = None) -> dict:
    """configs/tiny.yaml, optionally restricted to `assets` (Dagster rejects config for assets
    outside the run)."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    if assets is not None:
        cfg["ops"] = {k: v for k, v in cfg["ops"].items() if k in assets}
    return cfg


def materialize(project: Path, run_config: dict, selection: list[str], instance):
    """Run `selection` of the real code location (`defs()`) in-process against `project`."""
    import dagster as dg

    from llm_assets.definitions import defs

    job = defs().resolve_implicit_global_asset_job_def()
    resources = {"lake": {"config": {"project_dir": str(project)}}}
    return job.execute_in_process(
        run_config={**run_config, "resources": resources}, instance=instance,
        asset_selection=[dg.AssetKey(k) for k in selection], raise_on_error=False)


def metadata(instance, asset: str) -> dict:
    """The latest materialization's metadata of `asset`, as plain values."""
    import dagster as dg

    md = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata
    return {k: v.value for k, v in md.items()}


def log_prompts(project: Path, prompts: list[str], version: str = "v") -> None:
    """Requests in the project's serving log, as if the server (model `version`) had answered `prompts` just now."""
    from llm_assets.lib.monitor.serving_log import ServingLog

    log = ServingLog(project / "data/serving")
    for p in prompts:
        log.append({"time": datetime.now(timezone.utc), "request_id": "r", "prompt": p, "response": "x",
                    "prompt_tokens": 5, "response_tokens": 1, "latency_seconds": 0.01, "model_version": version, "status": "ok"})
    log.close()


def materialize_assets(assets: list, project: Path, run_config: dict, selection=None, instance=None):
    """`dg.materialize` of `assets` against the throwaway `project`; failures come back as results."""
    import dagster as dg

    from llm_assets.defs.resources import LakeResource

    return dg.materialize(
        assets, selection=selection, run_config=run_config, instance=instance,
        resources={"lake": LakeResource(project_dir=str(project))}, raise_on_error=False)


def lock_md5(project: Path, stage: str) -> str:
    """The hash dvc.lock records for a stage's output directory."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return lock["stages"][stage]["outs"][0]["md5"]


def shifted_batch(n: int = 40) -> str:
    """A JSONL batch unlike the stdlib corpus: short Python modules (named by "path", so they yield
    instruction pairs) whose docstrings are the openings of the Python licence's paragraphs (short
    enough that the pairs fit the tiny config's 128-token examples: longer ones are dropped)."""
    import json
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    paras = [" ".join(p.split()[:12]) for p in text.split("\n\n") if len(p.split()) >= 12]
    lines = []
    for i in range(n):
        first, second = paras[i % len(paras)], paras[(i + 1) % len(paras)]
        source = (f'"""Licensing terms, clause {i}."""\n\n\ndef clause_{i}(licensee, year={1990 + i}):\n'
                  f'    """{first}"""\n    return licensee, year\n\n\n'
                  f'def holder_{i}(name, country="NL"):\n    """{second}"""\n    return name, country\n')
        lines.append(json.dumps({"path": f"licensing/clause_{i}.py", "text": source}))
    return "\n".join(lines) + "\n"


@contextmanager
def uvicorn_thread(app, **config):
    """Serve a FastAPI app on a real uvicorn on loopback, in a thread; yields its base URL, stops it
    the way SIGTERM stops `llm-assets serve` (graceful shutdown, which flushes the serving log).
    `config`: more uvicorn.Config options (the server's header timeout: http=...). No log_config:
    uvicorn's own would attach handlers to whatever sys.stderr is now (a test's capsys buffer, closed
    when that test ends) and keep them for the rest of the session; its records reach the root
    logger (pytest's log capture) instead."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited before it started")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
