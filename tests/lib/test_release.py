import json

import pytest

from llm_assets.lib.release.release import Gate, GatesFailed, current_release, history, pointer_path, publish


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
