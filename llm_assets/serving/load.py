"""Traffic for the model server: start `llm-assets serve` as a real process on loopback, send prompts
from concurrent clients, stop it with SIGTERM (which flushes the request log).

`with ServerProcess(project_dir) as url:` starts the server (tests/test_serving.py does, with a tiny
model) and gives its URL; `send` posts prompts to it and `summarize` sums the results up. Against a
port nothing listens on, every request fails, as a result with status 0, not an exception:

    >>> from llm_assets.serving.load import free_port, send, summarize
    >>> results = send(f"http://127.0.0.1:{free_port()}", ["Explain f()."] * 3, concurrency=2, max_new_tokens=8)
    >>> [(r["status"], r["tokens"]) for r in results]
    [(0, 0), (0, 0), (0, 0)]
    >>> answered = [{"status": 200, "seconds": s, "prompt": "p", "text": "t", "tokens": 8} for s in (0.5, 1.5)]
    >>> summarize(results + answered, wall_seconds=2.0)
    {'requests': 5, 'ok': 2, 'errors': 3, 'latency_p50_s': 1.0, 'latency_p95_s': 1.5, 'requests_per_second': 1.0, 'tokens_per_second': 8.0}

    python -m llm_assets.serving.load --requests 40 --concurrency 4   # what `make demo` runs

The module entry point sends instruction prompts from sft_dataset (`--split train`, the default:
traffic like what the model was tuned on; `validation`: functions of modules it never saw) to the
current release and prints a few answers. Without a release (the gates refused the last
candidate) it says so and serves the candidate in data/lake/quantized_model instead, so the demo's
drift report has traffic; the log then names that directory, not a release, as the model version.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from llm_assets.lib.common.paths import ProjectPaths, default_project_dir


def free_port() -> int:
    """A free loopback port: binding port 0 lets the kernel pick (the small race until the server
    binds it is acceptable)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m llm_assets.cli serve` in a subprocess; yields its base URL once /health is ok."""

    def __init__(self, project_dir: Path, model_dir: Path | None = None, extra_args: list[str] | None = None,
                 start_timeout_s: float = 120.0):
        self.project_dir, self.model_dir = Path(project_dir), model_dir
        self.extra_args, self.start_timeout_s = extra_args or [], start_timeout_s
        self.output = ""

    def __enter__(self) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "llm_assets.cli", "serve", "--port", str(port), *self.extra_args]
        if self.model_dir is not None:
            cmd += ["--model", str(self.model_dir)]
        env = {**os.environ, "LLM_ASSETS_PROJECT_DIR": str(self.project_dir)}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok":
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server not healthy after {self.start_timeout_s} s:\n{self.output}")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)  # graceful: the request log is flushed
        try:
            self.output, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output, _ = self.proc.communicate()


def send(url: str, prompts: list[str], concurrency: int, max_new_tokens: int) -> list[dict]:
    """POST /generate for every prompt from `concurrency` client threads; one result per prompt.
    Each thread keeps one connection open, as real clients do (a new httpx client per request costs
    the load generator more CPU than a small model's reply)."""
    local = threading.local()

    def one(prompt: str) -> dict:
        start = time.perf_counter()
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=300)
            clients.append(local.client)
        try:
            r = local.client.post(f"{url}/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens})
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            return {"status": r.status_code, "seconds": time.perf_counter() - start, "prompt": prompt,
                    "text": body.get("text", "") if r.status_code == 200 else r.text, "tokens": body.get("completion_tokens", 0)}
        except httpx.HTTPError as e:
            return {"status": 0, "seconds": time.perf_counter() - start, "prompt": prompt, "text": str(e), "tokens": 0}

    clients: list[httpx.Client] = []
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, prompts))
    finally:
        for client in clients:
            client.close()


def summarize(results: list[dict], wall_seconds: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["seconds"] for r in ok) or [float("nan")]
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
            "latency_p50_s": statistics.median(latencies),
            "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "requests_per_second": len(ok) / wall_seconds,
            "tokens_per_second": sum(r["tokens"] for r in ok) / wall_seconds}


def sft_prompts(project_dir: Path, n: int, split: str = "validation") -> list[str]:
    """n user prompts spread evenly over a split of sft_dataset."""
    from llm_assets.lib.posttrain.posttrain_data import read_chats, user_prompts

    chats = read_chats(ProjectPaths(project_dir).artifact("sft_dataset"), split)
    prompts = user_prompts(chats)
    return [prompts[i * len(prompts) // n] for i in range(min(n, len(prompts)))]


def main(argv: list[str] | None = None) -> int:
    from llm_assets.lib.release.release import current_release

    parser = argparse.ArgumentParser(description="Send instruction prompts to the released model over HTTP.")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--split", default="train", choices=["train", "validation"],
                        help="prompts like the training ones (default), or from held-out modules, whose names and "
                             "lengths differ enough for the drift report to flag them")
    args = parser.parse_args(argv)
    project = default_project_dir()
    model_dir = None
    if current_release(ProjectPaths(project).releases) is None:
        model_dir = ProjectPaths(project).artifact("quantized_model")
        print(f"no release (the gates refused the candidate): serving {model_dir.relative_to(project)} for the demo traffic")
    prompts = sft_prompts(project, args.requests, args.split)
    start = time.perf_counter()
    with ServerProcess(project, model_dir) as url:
        results = send(url, prompts, args.concurrency, args.max_new_tokens)
    stats = summarize(results, time.perf_counter() - start)
    for r in [r for r in results if r["status"] == 200][:3]:
        print(f"\n> {r['prompt']}\n{r['text'] or '(empty)'}")
    for r in [r for r in results if r["status"] != 200]:
        print(f"\nFAILED ({r['status'] or 'no response'}): {r['prompt'][:80]!r}: {r['text'][:300]}")
    print(f"\nserved {stats['ok']}/{stats['requests']} requests, p50 {stats['latency_p50_s']:.2f} s, "
          f"p95 {stats['latency_p95_s']:.2f} s; logged to data/serving/")
    return 0 if stats["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
