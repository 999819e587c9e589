r"""Model directories: the one writer and reader of every checkpoint the pipeline passes on.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import (CheckpointError, context_length, load_model, save_model,
    ...                                                weights_bytes, weights_file)
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["def f(x):\n    return x\n"] * 5, vocab_size=300)
    >>> out_dir = Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, out_dir)
    >>> sorted(p.name for p in out_dir.iterdir())
    ['chat_template.jinja', 'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']
    >>> model = load_model(out_dir)      # fp32 on the default device; four_bit=True: NF4 (QLoRA)
    >>> context_length(out_dir), weights_bytes(out_dir) == weights_file(out_dir).stat().st_size
    (128, True)
    >>> _ = weights_file(out_dir).write_bytes(weights_file(out_dir).read_bytes()[:1000])   # a cut copy
    >>> try:
    ...     load_model(out_dir)
    ... except CheckpointError as e:
    ...     print(str(e).removeprefix(str(out_dir)).split(" (")[0])
    /model.safetensors: not a complete safetensors file

A model directory is what `save_pretrained` of a transformers model and of its tokenizer write:
base_checkpoint is one. A fine-tuned checkpoint (lora_checkpoint, aligned_checkpoint) holds two,
at named sub-paths:

    >>> from pathlib import Path
    >>> str(merged_dir(Path("lake/lora_checkpoint"))), str(adapter_dir(Path("lake/lora_checkpoint")))
    ('lake/lora_checkpoint/merged', 'lake/lora_checkpoint/adapter')

- `merged/`: the adapter folded into fp32 weights, with the tokenizer: a model directory;
- `adapter/`: the PEFT adapter alone (adapter_config.json, adapter_model.safetensors; adapters.py).

Weights load from safetensors only, never pickle; a missing, truncated or corrupt file fails naming
it (`CheckpointError`) instead of deep inside transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch

MERGED = "merged"
ADAPTER = "adapter"
WEIGHTS = "model.safetensors"


def merged_dir(checkpoint_dir: Path) -> Path:
    """The merged model (a plain model directory) of a fine-tuned checkpoint."""
    return Path(checkpoint_dir) / MERGED


def adapter_dir(checkpoint_dir: Path) -> Path:
    """The PEFT adapter of a fine-tuned checkpoint."""
    return Path(checkpoint_dir) / ADAPTER


def weights_file(model_dir: Path) -> Path:
    """The safetensors file holding a model directory's weights."""
    return Path(model_dir) / WEIGHTS


def save_model(model, tokenizer, out_dir: Path) -> None:
    """The model (config.json, generation_config.json, model.safetensors) and its tokenizer."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, not safetensors, truncated or corrupt."""


def check_safetensors(model_dir: Path, name: str = WEIGHTS) -> Path:
    """The path of `model_dir/name` after checking it is a complete safetensors file."""
    from safetensors import safe_open

    path = Path(model_dir) / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (weights are loaded from safetensors only, never from pickle)")
    try:
        with safe_open(str(path), framework="pt") as f:  # checks the header against the file size
            for key in f.keys():
                f.get_slice(key)
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{path}: not a complete safetensors file ({e}); re-materialize the asset or "
                              f"restore an earlier version") from e
    return path


def check_4bit_shapes(model_dir: Path) -> None:
    """bitsandbytes' CPU 4-bit kernel packs output rows in blocks of 32 and fails deep inside the
    first forward otherwise: say which dimension is wrong before loading."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    for name in ("hidden_size", "intermediate_size"):
        value = getattr(config, name, None)
        if value is not None and value % 32:
            raise ValueError(f"{model_dir}/config.json: {name}={value} is not a multiple of 32, which "
                             f"bitsandbytes 4-bit needs; use a model size whose widths are")


def load_model(model_dir: Path, four_bit: bool = False):
    """A causal LM from a model directory (safetensors only), in fp32 or 4-bit NF4."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = Path(model_dir)
    check_safetensors(model_dir)
    kwargs = {"use_safetensors": True, "dtype": torch.float32}
    if four_bit:
        check_4bit_shapes(model_dir)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = {"": str(device())}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model if four_bit else model.to(device())


def context_length(model_dir: Path, cap: int = 256) -> int:
    """The model's context (max_position_embeddings from config.json), at most `cap` tokens."""
    from transformers import AutoConfig

    return min(cap, AutoConfig.from_pretrained(model_dir).max_position_embeddings)


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the weight files (*.safetensors) in a model directory."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
