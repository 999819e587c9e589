"""bitsandbytes quantization on CPU and the safetensors-only loading rule, on a tiny model."""

import pytest
import torch

from llm_assets.lib.pretrain.model_dir import CheckpointError, load_model, weights_bytes
from llm_assets.lib.release.quantize import load_quantized, quantize


@pytest.mark.parametrize("method, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_model_saves_reloads_identically_and_generates(tiny_base_dir, tmp_path, method, layer):
    out = tmp_path / method
    out.mkdir()
    model = quantize(tiny_base_dir, out, method)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == layer
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert weights_bytes(out) < weights_bytes(tiny_base_dir)
    again = load_quantized(out)
    x = torch.tensor([[0, 4, 100, 200, 300, 5]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=x).logits, again.eval()(input_ids=x).logits)
        full = load_model(tiny_base_dir).eval()(input_ids=x).logits
        quantized = again(input_ids=x).logits
    assert (quantized - full).abs().max() < 1.0  # close to the fp32 model, not equal
    generated = again.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert generated.shape[1] > x.shape[1]


def test_unknown_method_fails_naming_it(tiny_base_dir, tmp_path):
    with pytest.raises(ValueError, match="method"):
        quantize(tiny_base_dir, tmp_path, "fp8")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupt_or_missing_checkpoint_fails_naming_the_file(tiny_base_dir, tmp_path, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base_dir, broken)
    weights = broken / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    else:
        weights.unlink()
        torch.save({"w": torch.zeros(1)}, broken / "pytorch_model.bin")  # a pickle is never loaded
    with pytest.raises(CheckpointError, match=str(weights)):
        load_model(broken)
    with pytest.raises(CheckpointError, match=str(weights)):
        quantize(broken, tmp_path, "nf4")
