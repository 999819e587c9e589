"""Model directories: what save_model writes, load_model reads back, and the named sub-paths."""

from pathlib import Path

import torch
from transformers import AutoTokenizer

from llm_assets.lib.pretrain.model import build_model
from llm_assets.lib.pretrain.model_dir import (adapter_dir, context_length, load_model, merged_dir, save_model,
                                               weights_bytes, weights_file)


def test_a_saved_model_loads_back_with_the_same_weights_and_tokenizer(tiny_base_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    torch.manual_seed(1)
    model = build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    save_model(model, tok, tmp_path)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / name).is_file(), name
    assert weights_file(tmp_path) == tmp_path / "model.safetensors"
    assert weights_bytes(tmp_path) == weights_file(tmp_path).stat().st_size > 0

    again = load_model(tmp_path)
    assert next(again.parameters()).dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name].cpu()), name
    assert AutoTokenizer.from_pretrained(tmp_path)("def f(x):")["input_ids"] == tok("def f(x):")["input_ids"]
    assert context_length(tmp_path) == 128 and context_length(tmp_path, cap=64) == 64  # tiny: 128


def test_sub_paths_keep_the_on_disk_layout():
    assert merged_dir(Path("lake/lora_checkpoint")) == Path("lake/lora_checkpoint/merged")
    assert adapter_dir("lake/aligned_checkpoint") == Path("lake/aligned_checkpoint/adapter")
