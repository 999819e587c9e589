"""Canary and rollback against a real server: a canary named by the release pointer answers its
share of requests, every logged request names the version that answered, and `llm-assets rollback`
walks the pointer back while the server runs."""

import httpx
import pytest

from helpers import uvicorn_thread
from llm_assets.cli import main
from llm_assets.lib.monitor.serving_log import read_log
from llm_assets.lib.release.release import Gate, current_release, history, publish
from llm_assets.serving.app import ServeSettings, create_app
from llm_assets.serving.routing import CanaryRouter, Split

OK = [Gate("g", True, 0, 0)]


@pytest.fixture
def project(tmp_path, tiny_base_dir, monkeypatch):
    """A project whose release is v1 with v2 as a 25% canary (the same tiny model under two versions)."""
    monkeypatch.setenv("LLM_ASSETS_PROJECT_DIR", str(tmp_path))
    releases = tmp_path / "data/releases"
    publish(tiny_base_dir, releases, "v1", OK, {"model": "test"})
    publish(tiny_base_dir, releases, "v2", OK, {"model": "test"}, canary_share=0.25)
    return tmp_path


def ask(client: httpx.Client, n: int, tag: str) -> list[str]:
    versions = []
    for i in range(n):
        r = client.post("/generate", json={"prompt": f"{tag} {i}", "max_new_tokens": 2})
        assert r.status_code == 200, r.text
        versions.append(r.json()["model_version"])
    return versions


def test_the_canary_answers_its_share_and_rollback_takes_it_back_while_serving(project, capsys):
    settings = ServeSettings(releases_dir=project / "data/releases", log_dir=project / "data/serving")
    with uvicorn_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert ask(client, 8, "split") == ["v1", "v1", "v1", "v2"] * 2
        metrics = client.get("/metrics").text
        assert 'llm_routed_requests_total{model_version="v1",route="release"} 6.0' in metrics
        assert 'llm_routed_requests_total{model_version="v2",route="canary"} 2.0' in metrics

        assert main(["rollback"]) == 0  # withdraws the canary
        assert "canary v2 withdrawn; release v1 answers every request" in capsys.readouterr().out
        assert ask(client, 4, "withdrawn") == ["v1"] * 4

        publish(project / "data/releases/v2", project / "data/releases", "v2", OK, {})  # v2 released in full
        assert ask(client, 2, "released") == ["v2"] * 2
        assert main(["rollback"]) == 0  # back to the release before v2
        assert "rolled back from v2 to v1" in capsys.readouterr().out
        assert ask(client, 2, "rolled back") == ["v1"] * 2
    log = read_log(project / "data/serving").to_pylist()
    assert len(log) == 16
    assert {r["prompt"]: r["model_version"] for r in log} == {
        **{f"split {i}": "v2" if i % 4 == 3 else "v1" for i in range(8)},
        **{f"withdrawn {i}": "v1" for i in range(4)}, "released 0": "v2", "released 1": "v2",
        "rolled back 0": "v1", "rolled back 1": "v1"}
    events = [h["event"] for h in history(project / "data/releases")]
    assert events == ["released", "canary", "canary_withdrawn", "released", "rolled_back"]


def test_rollback_command_names_what_it_cannot_do(project, capsys):
    assert main(["rollback", "v7"]) == 1
    assert "cannot roll back to v7: it was never released here (released: v2, v1)" in capsys.readouterr().err
    assert current_release(project / "data/releases")["canary"]["version"] == "v2"  # unchanged
    assert main(["rollback", "v1"]) == 0  # a named version: the canary goes with the old pointer
    assert current_release(project / "data/releases")["version"] == "v1"
    assert "canary" not in current_release(project / "data/releases")
    assert main(["rollback"]) == 1
    assert "release v1 has no previous release" in capsys.readouterr().err


def test_a_sticky_key_meets_one_version_and_the_shares_hold_over_many_keys():
    split = Split()
    assert [split.to_canary(0.1) for _ in range(100)].count(True) == 10
    keys = [f"client-{i}" for i in range(2000)]
    chosen = [split.to_canary(0.3, k) for k in keys]
    assert chosen == [split.to_canary(0.3, k) for k in keys]  # the same client, the same answer
    assert 0.27 < sum(chosen) / len(keys) < 0.33


def test_a_router_without_a_pointer_routes_everything_to_the_release(tmp_path):
    from prometheus_client import CollectorRegistry

    router = CanaryRouter(None, load=lambda *_: pytest.fail("nothing to load"), registry=CollectorRegistry())

    class Release:
        version = "dir:model"

    assert all(router.route(Release) is Release for _ in range(5))
