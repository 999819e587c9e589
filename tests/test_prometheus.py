"""monitoring/ against the real tools: promtool checks the scrape config and the alert rules and runs
their unit tests; Debian's `prometheus` (started here on loopback, stopped here) scrapes a real
`llm-assets serve` serving a tiny model, and the server's figures come back through Prometheus' HTTP
API, the drift alert fires, and every query of the Grafana dashboard and the alert rules names a
metric the server exports and returns data."""

import json
import re
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import REPO
from llm_assets.lib.monitor.drift import describe, detect_drift, write_report
from llm_assets.serving.load import ServerProcess, free_port

MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "llm-assets-dashboard.json"
METRIC = re.compile(r"\b(llm_[a-z_]+|up)\b")


def promtool(*args: str) -> str:
    r = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=MONITORING)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_promtool_passes_the_scrape_config_the_rules_and_their_unit_tests():
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 5 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")  # each alert fires when it should, only then


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and {p["title"] for p in dash["panels"]} >= {
        "Requests per second by endpoint and status", "Latency percentiles", "Generated tokens per second",
        "Errors per second by reason", "Version share (release and canary)"}
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_queries() -> list[str]:
    return [r["expr"] for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def write_drift_report(report_dir: Path) -> None:
    """A real drift report that finds drift (another domain than the reference), where drift_report writes it."""
    reference = describe([f"Explain what `mod.f{i}(x, y={i})` does." for i in range(40)])
    current = describe([f"{i * 7919} {i * 104729} 0x{i:04x} {i}" for i in range(40)])
    result = detect_drift(reference, current)
    assert result.summary["drift_detected"]
    report_dir.mkdir(parents=True)
    write_report(report_dir, result, {**result.summary, "source": "serving"}, current)


@contextmanager
def prometheus(tmp: Path, target: str):
    """monitoring/prometheus.yml with the test server as target, scraping every second."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    with (tmp / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                 f"--web.listen-address={url.removeprefix('http://')}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, "prometheus ready", proc, tmp)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(ok, what: str, proc=None, tmp: Path | None = None, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{(tmp / 'prometheus.log').read_text()}")
        try:
            if ok():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"no {what} after {timeout_s} s")


def query(url: str, promql: str) -> list[dict]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert body["status"] == "success", (promql, body)
    return body["data"]["result"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_base_dir):
    """A real server (3 answered requests, 1 refused) with a drift report, scraped by a real Prometheus."""
    project = tmp_path_factory.mktemp("monitored")
    write_drift_report(project / "data/lake/drift_report")
    with ServerProcess(project, tiny_base_dir) as server:
        with httpx.Client(base_url=server, timeout=60) as client:
            for i in range(3):
                assert client.post("/generate", json={"prompt": f"q{i}", "max_new_tokens": 3}).status_code == 200
            assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 10_000}).status_code == 422
            exported = {s.name for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}
        with prometheus(project, server.removeprefix("http://")) as url:
            yield url, exported


def test_prometheus_scrapes_the_server_and_answers_through_its_http_api(stack):
    url, _ = stack
    wait_for(lambda: query(url, 'llm_requests_total{job="llm-assets"}'), "scrape of llm_requests_total")
    up = query(url, 'up{job="llm-assets"}')
    assert [s["value"][1] for s in up] == ["1"]
    requests = query(url, 'sum by (status) (llm_requests_total{endpoint="generate"})')
    assert {s["metric"]["status"]: float(s["value"][1]) for s in requests} == {"200": 3.0, "422": 1.0}
    assert float(query(url, "sum(llm_generated_tokens_total)")[0]["value"][1]) > 0
    assert [(s["metric"]["source"], s["value"][1]) for s in query(url, "llm_drift_detected")] == [("serving", "1")]
    routed = query(url, "llm_routed_requests_total")
    assert [(s["metric"]["route"], s["value"][1]) for s in routed] == [("release", "3")]  # the 422 is refused before routing

    def drift_alert_fires():
        alerts = httpx.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "LLMDriftDetected" and a["state"] == "firing"]

    wait_for(drift_alert_fires, "firing LLMDriftDetected alert")
    rules = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
    assert {r["name"] for r in rules} == {"LLMHighErrorRate", "LLMHighLatencyP95", "LLMNoTraffic", "LLMServerDown",
                                          "LLMDriftDetected"}
    assert all(r["health"] == "ok" for r in rules), rules


def test_dashboard_and_alert_queries_name_exported_metrics_and_return_data(stack):
    url, exported = stack
    for expr in dashboard_queries() + alert_queries():
        names = set(METRIC.findall(expr))
        assert names and names <= exported | {"up"}, (expr, sorted(names - exported))
    wait_for(lambda: len(query(url, 'llm_requests_total[10s]')[0]["values"]) >= 3, "three scrapes")
    for expr in dashboard_queries():
        promql = expr.replace("$job", "llm-assets").replace("$__rate_interval", "1m")
        assert query(url, promql), f"no data for the dashboard query {promql}"
