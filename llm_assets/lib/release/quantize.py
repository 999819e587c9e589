r"""Post-training quantization with bitsandbytes through `transformers` (both methods run on CPU).

    >>> import tempfile
    >>> from pathlib import Path
    >>> import bitsandbytes as bnb
    >>> import torch
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import save_model, weights_bytes
    >>> from llm_assets.lib.release.quantize import load_for_inference, load_quantized, quantize
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["def f(x):\n    return x\n"] * 5, vocab_size=300)
    >>> merged, out = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())   # out: the caller's staging dir
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, merged)
    >>> _ = quantize(merged, out, method="nf4")
    >>> round(weights_bytes(out) / weights_bytes(merged), 2)    # the tied embedding stays fp32
    0.31
    >>> model = load_quantized(out)      # quantized again from its own config.json
    >>> sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())   # 7 projections x 2 blocks
    14
    >>> load_for_inference(out)(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, len(tok))
    True

Methods:
- `nf4`:  4-bit NormalFloat weights (QLoRA's format) with double quantization of the scales,
          fp32 compute (bf16 compute is emulated, 7-10x slower, on CPUs without bf16 instructions).
- `int8`: LLM.int8() 8-bit weights with fp16 outlier handling (`llm_int8_threshold`).

bitsandbytes quantizes `nn.Linear` layers only: the (tied) embedding stays fp32, so the size ratio
depends on how much of the model is Linear weight (FIELD_NOTES: 0.19x for nf4 at ~4.5M parameters).
The result is saved with `save_pretrained` as one `model.safetensors` holding the packed weights and
their quantization state, with the tokenizer beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llm_assets.lib.pretrain.model_dir import check_4bit_shapes, check_safetensors, device, load_model, save_model

METHODS = ("nf4", "int8")


class _DropInt8CastNotice(logging.Filter):
    """MatMul8bitLt logs 'inputs will be cast...' on every matmul of an int8 model on CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


_DROP_CAST_NOTICE = _DropInt8CastNotice()  # one instance: addFilter ignores repeats of the same object


def quantization_config(method: str):
    from transformers import BitsAndBytesConfig

    if method == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"method: must be one of {METHODS} (got {method!r})")


def quantize(model_dir: Path, out_dir: Path, method: str):
    """Load `model_dir` (safetensors) quantized with `method`, save it to `out_dir` (which must
    exist: the caller's staging dir) with the tokenizer, and return the quantized model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    config = quantization_config(method)
    if method == "nf4":
        check_4bit_shapes(model_dir)
    check_safetensors(model_dir)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DROP_CAST_NOTICE)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, use_safetensors=True,
                                                 dtype=torch.float32, device_map={"": str(device())})
    save_model(model, AutoTokenizer.from_pretrained(model_dir), out_dir)
    return model


def load_quantized(model_dir: Path):
    """A saved quantized model, quantized again on load from its own config.json."""
    from transformers import AutoModelForCausalLM

    check_safetensors(model_dir)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DROP_CAST_NOTICE)
    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True,
                                                device_map={"": str(device())})


def load_for_inference(model_dir: Path):
    """A saved model in eval mode: quantized again from its config.json when it was saved
    quantized (a quantized_model or a release of one), else the fp32 model."""
    from transformers import AutoConfig

    quantized = getattr(AutoConfig.from_pretrained(model_dir), "quantization_config", None) is not None
    return (load_quantized(model_dir) if quantized else load_model(model_dir)).eval()
