"""Run the real `dagster-webserver` (and optionally `dagster-daemon`) against the checkout's
workspace.yaml, for tests that go through HTTP/GraphQL or a browser instead of `dg.materialize`.

    with DagsterProcesses(home=tmp / "dagster_home", env={"LLM_ASSETS_PROJECT_DIR": str(project)},
                          log_dir=tmp / "logs") as dagster:
        dagster.wait_ready()
        dagster.graphql("{ version }")
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llm_assets.cli import DAGSTER_YAML
from llm_assets.serving.load import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin/, not the interpreter's resolved location
LOCATIONS_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on PythonError { message } } } } } }"""




class DagsterProcesses:
    def __init__(self, home: Path, env: dict | None = None, daemon: bool = False, log_dir: Path | None = None):
        self.home, self.log_dir = Path(home), Path(log_dir or home / "logs")
        self.env = {**os.environ, **(env or {}), "DAGSTER_HOME": str(self.home)}
        self.daemon, self.port = daemon, free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DagsterProcesses:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not (self.home / "dagster.yaml").exists():  # telemetry off, no "join the community" modal
            (self.home / "dagster.yaml").write_text(DAGSTER_YAML)
        ws = str(REPO / "workspace.yaml")
        try:
            self._start("webserver", [BIN / "dagster-webserver", "-w", ws, "-h", "127.0.0.1", "-p", str(self.port)])
            if self.daemon:
                self._start("daemon", [BIN / "dagster-daemon", "run", "-w", ws])
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, name: str, cmd: list) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            # Own session = own process group: stop() signals the code-server children as well.
            self.procs[name] = subprocess.Popen(
                [str(c) for c in cmd], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name} (last {chars} chars)\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def wait_ready(self, timeout: float = 90) -> None:
        """Until /server_info answers and the code location has loaded; a load error raises at once."""
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"dagster {name} exited with {proc.returncode}\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/server_info", timeout=5).status_code == 200:
                    entries = self.graphql(LOCATIONS_QUERY)["workspaceOrError"]["locationEntries"]
                    states = {e["name"]: e["locationOrLoadError"] for e in entries}
                    for name, state in states.items():
                        if state and state["__typename"] == "PythonError":
                            raise RuntimeError(f"code location {name} failed to load: {state['message']}")
                    # locationOrLoadError is null while the location is still loading
                    if states and all(states.values()):
                        return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"dagster not ready after {timeout} s\n{self.logs()}")
            time.sleep(0.5)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        r = httpx.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=30)
        r.raise_for_status()
        body = r.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def stop(self, grace: float = 20) -> None:
        """SIGTERM every process group, wait up to `grace` s in total, then SIGKILL what is left."""
        for proc in self.procs.values():
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Also kill the group when the leader exited: a code server may outlive the webserver.
            self._signal(proc, signal.SIGKILL)
            proc.wait()

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # the whole group is already gone
