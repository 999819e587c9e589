"""Parameter-efficient fine-tuning with PEFT: adapter configs, 4-bit bases, merging, counting.

    model = load_model(base_dir, four_bit=settings.method == "qlora")
    model = attach_adapter(model, settings)          # a PeftModel; only the adapter trains
    trainable, total = parameter_counts(model)
    merged = merge_into_fp32(base_dir, adapter_dir)  # plain transformers model, no PEFT needed

Methods (`AdapterSettings.method`):
- `lora`:  low-rank updates (rank `r`, scale `alpha / r`, `dropout`) on `target_modules`.
- `qlora`: the same LoRA on a base loaded in 4-bit NF4 by bitsandbytes (fp32 compute: bf16 compute
  is emulated, 7-10x slower, on CPUs without bf16 instructions; see FIELD_NOTES).
- `ia3`:   learned rescaling vectors on attention keys/values and the MLP input of down_proj; about
  a tenth of LoRA's trainable parameters.

All three merge into plain weights. The merge always goes into a fresh fp32 copy of the base, never
into the 4-bit one: rounding the merged weights back to NF4 would shift the logits (FIELD_NOTES).
Prefix and prompt tuning are left out on purpose: their virtual tokens cannot be merged into
weights, so they could not give the merged model the rest of the pipeline loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

METHODS = ("lora", "qlora", "ia3")
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)  # IA3 scales the input of feed-forward layers, the output of others


@dataclass
class AdapterSettings:
    method: str = "lora"  # lora | qlora | ia3
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scale numerator: updates are scaled by alpha / r
    dropout: float = 0.05  # dropout on the LoRA input path
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR))  # LoRA targets

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: must be one of {METHODS} (got {self.method!r})")
        if self.r < 1:
            raise ValueError(f"r: must be at least 1 (got {self.r})")
        if self.alpha <= 0:
            raise ValueError(f"alpha: must be positive (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1) (got {self.dropout})")
        unknown = sorted(set(self.target_modules) - set(LLAMA_LINEAR))
        if not self.target_modules or unknown:
            raise ValueError(f"target_modules: choose from {LLAMA_LINEAR} (got {self.target_modules})")


def peft_config(s: AdapterSettings):
    from peft import IA3Config, LoraConfig, TaskType

    s.validate()
    if s.method == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(IA3_TARGETS),
                         feedforward_modules=list(IA3_FEEDFORWARD))
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                      target_modules=list(s.target_modules), bias="none")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_dir: Path, four_bit: bool = False):
    """A causal LM from a save_pretrained directory (safetensors only), in fp32 or 4-bit NF4."""
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


class CheckpointError(ValueError):
    """A checkpoint file that is missing, not safetensors, truncated or corrupt."""


def check_safetensors(model_dir: Path, name: str = "model.safetensors") -> Path:
    """The path of `model_dir/name` after checking it is a complete safetensors file. Weights load
    from safetensors only (never pickle), and a truncated or corrupt file fails here, naming it,
    instead of deep inside transformers."""
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


def keep_4bit_weights_trainable(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight into an
    inference-only layout at its first no-grad eval forward, for good; its matmul on that layout has
    no autograd kernel, so every training step after the first evaluation would get silently wrong
    gradients (torch only warns). Models we train keep the trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def attach_adapter(model, s: AdapterSettings):
    """Wrap `model` in a fresh trainable adapter; every base weight is frozen."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if s.method == "qlora":
        keep_4bit_weights_trainable(model)
        # casts norms to fp32 and enables input grads; no gradient checkpointing at this size
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, peft_config(s))


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit packed weights counted at their real element count."""
    return model.get_nb_trainable_parameters()


def merge_into_fp32(base_dir: Path, adapter_dir: Path):
    """The base in fp32 with the adapter's update folded into its weights: a plain model."""
    from peft import PeftModel

    check_safetensors(adapter_dir, "adapter_model.safetensors")
    base = load_model(base_dir, four_bit=False)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).merge_and_unload()
