import json

import pytest

from llm_assets.lib.release.release import (Gate, GatesFailed, current_release, history, pointer_path, publish,
                                            released_versions, rollback)


def model_dir(tmp_path, name, text):
    d = tmp_path / name
    d.mkdir()
    (d / "model.safetensors").write_text(text)
    return d


def test_release_moves_only_when_every_gate_passes(tmp_path):
    releases = tmp_path / "releases"
    ok = [Gate("a", True, 1.05, 1.01), Gate("b", True, 0, 0)]
    first = publish(model_dir(tmp_path, "m1", "one"), releases, "v1", ok, {"model": "quantized_model"})
    assert current_release(releases)["version"] == "v1"
    assert current_release(releases) == json.loads(pointer_path(releases).read_text()) == first
    assert (releases / "v1" / "model.safetensors").read_text() == "one"
    assert json.loads((releases / "v1" / "release.json").read_text())["gates"][0]["name"] == "a"
    assert first["previous"] is None

    bad = [Gate("a", False, 1.05, 1.31), Gate("b", True, 0, 0)]
    with pytest.raises(GatesFailed, match=r"stays v1: failed a \(observed 1.31, threshold 1.05\)"):
        publish(model_dir(tmp_path, "m2", "two"), releases, "v2", bad, {})
    assert current_release(releases)["version"] == "v1"
    assert not (releases / "v2").exists()

    with pytest.raises(GatesFailed, match="no gates"):
        publish(model_dir(tmp_path, "m3", "three"), releases, "v3", [], {})

    second = publish(model_dir(tmp_path, "m4", "four"), releases, "v4", ok, {})
    assert current_release(releases)["version"] == "v4" and second["previous"] == "v1"
    assert [h["event"] for h in history(releases)] == ["released", "refused", "refused", "released"]


OK = [Gate("a", True, 0, 0)]


def test_a_canary_takes_its_share_beside_the_release_until_released_or_withdrawn(tmp_path):
    releases = tmp_path / "releases"
    publish(model_dir(tmp_path, "m1", "one"), releases, "v1", OK, {})
    with pytest.raises(ValueError, match="canary_share"):
        publish(model_dir(tmp_path, "m2", "two"), releases, "v2", OK, {}, canary_share=1.0)
    pointer = publish(tmp_path / "m2", releases, "v2", OK, {}, canary_share=0.2)
    assert pointer == current_release(releases)
    assert pointer["version"] == "v1" and pointer["path"] == str(releases / "v1")
    assert pointer["canary"] == {"version": "v2", "path": str(releases / "v2"), "share": 0.2}
    assert (releases / "v2" / "model.safetensors").read_text() == "two"
    assert "canary" not in rollback(releases) and current_release(releases)["version"] == "v1"
    publish(tmp_path / "m2", releases, "v2", OK, {}, canary_share=0.2)
    promoted = publish(tmp_path / "m2", releases, "v2", OK, {})  # released in full: the canary is gone
    assert promoted["version"] == "v2" and "canary" not in current_release(releases)
    assert [h["event"] for h in history(releases)] == ["released", "canary", "canary_withdrawn", "canary", "released"]


def test_the_first_release_asked_as_a_canary_is_released_in_full(tmp_path):
    releases = tmp_path / "releases"
    record = publish(model_dir(tmp_path, "m1", "one"), releases, "v1", OK, {}, canary_share=0.5)
    assert record["version"] == "v1" and "canary" not in current_release(releases)


def test_rollback_walks_back_one_release_at_a_time_or_to_a_named_one(tmp_path):
    releases = tmp_path / "releases"
    for i in (1, 2, 3):
        publish(model_dir(tmp_path, f"m{i}", str(i)), releases, f"v{i}", OK, {"model": "quantized_model"})
    assert rollback(releases)["version"] == "v2"
    assert current_release(releases) == {**json.loads((releases / "v2" / "release.json").read_text()),
                                         "path": str(releases / "v2")}
    assert rollback(releases)["version"] == "v1"
    with pytest.raises(ValueError, match="release v1 has no previous release"):
        rollback(releases)
    assert rollback(releases, "v3")["version"] == "v3"  # forward again, by name
    with pytest.raises(ValueError, match=r"never released here \(released: v3, v2, v1\)"):
        rollback(releases, "v9")
    assert released_versions(releases) == ["v3", "v2", "v1"]
    lines = [h for h in history(releases) if h["event"] == "rolled_back"]
    assert [(h["from"], h["version"]) for h in lines] == [("v3", "v2"), ("v2", "v1"), ("v1", "v3")]
    assert all(h["time"].endswith("Z") for h in lines)


def test_rollback_with_nothing_released_says_so(tmp_path):
    with pytest.raises(ValueError, match="nothing to roll back"):
        rollback(tmp_path / "releases")
