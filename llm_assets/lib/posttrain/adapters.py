r"""Parameter-efficient fine-tuning with PEFT: adapter configs, attaching, merging, counting.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> from llm_assets.lib.posttrain.adapters import AdapterSettings, attach_adapter, merge_into_fp32, parameter_counts
    >>> from llm_assets.lib.pretrain import model_dir
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["def f(x):\n    return x\n"] * 5, vocab_size=300)
    >>> base_dir, out = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> model_dir.save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id),
    ...                      tok, base_dir)                                    # a base_checkpoint
    >>> settings = AdapterSettings(method="lora", r=4, alpha=8)
    >>> model = model_dir.load_model(base_dir, four_bit=settings.method == "qlora")
    >>> model = attach_adapter(model, settings)          # a PeftModel; only the adapter trains
    >>> parameter_counts(model)                          # (trainable, total)
    (10240, 134784)
    >>> with torch.no_grad():                            # stand-in for training: lora_B starts at zero
    ...     for name, p in model.named_parameters():
    ...         _ = p.fill_(0.01) if "lora_B" in name else None
    >>> model.save_pretrained(model_dir.adapter_dir(out))
    >>> sorted(p.name for p in model_dir.adapter_dir(out).glob("adapter_*"))
    ['adapter_config.json', 'adapter_model.safetensors']
    >>> merged = merge_into_fp32(base_dir, model_dir.adapter_dir(out))  # plain model, no PEFT needed
    >>> base = model_dir.load_model(base_dir)
    >>> type(merged).__name__, [torch.equal(getattr(merged.model, part).weight, getattr(base.model, part).weight)
    ...                         for part in ("embed_tokens", "norm")]     # frozen parts: unchanged
    ('LlamaForCausalLM', [True, True])
    >>> torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    False
    >>> parameter_counts(attach_adapter(model_dir.load_model(base_dir), AdapterSettings(method="ia3")))[0]
    640

Model directories themselves (loading, 4-bit bases, the `adapter/` and `merged/` sub-paths) are
lib/pretrain/model_dir.py's.

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

from pathlib import Path

from pydantic import Field

from llm_assets.lib.common.settings import Settings, settings_of
from llm_assets.lib.pretrain import model_dir

METHODS = ("lora", "qlora", "ia3")
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)  # IA3 scales the input of feed-forward layers, the output of others


class AdapterSettings(Settings):
    """The PEFT adapter a fine-tuning run trains (its fields sit flat in SftSettings and DpoSettings)."""

    method: str = Field("lora", description="lora | qlora (the same LoRA on the base loaded in 4-bit NF4 by "
                                            "bitsandbytes) | ia3 (learned rescaling vectors).")
    r: int = Field(16, description="LoRA rank.")
    alpha: int = Field(32, description="LoRA scale numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, description="Dropout on the LoRA input path.")
    target_modules: list[str] = Field(list(LLAMA_LINEAR), description=f"Linear layers LoRA adapts, from {LLAMA_LINEAR} "
                                                                      "(IA3 always scales k_proj, v_proj, down_proj).")

    @property
    def adapter(self) -> AdapterSettings:
        """The adapter fields alone (of a workflow's settings that extend these), as peft_config takes them."""
        return settings_of(self, AdapterSettings)

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

    model_dir.check_safetensors(adapter_dir, "adapter_model.safetensors")
    base = model_dir.load_model(base_dir, four_bit=False)
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).merge_and_unload()
