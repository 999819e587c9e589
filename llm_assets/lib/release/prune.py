"""Structured pruning: the least important attention heads and FFN channels of every block removed
from the weight matrices, then a short recovery by distillation from the unpruned model.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import load_model, save_model
    >>> from llm_assets.lib.release.prune import PruneSettings, prune
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> chats = [[{"role": "user", "content": f"Explain f{i}(x)."}, {"role": "assistant", "content": f"Return x + {i}."}]
    ...          for i in range(12)]
    >>> tok = train_tokenizer([m["content"] for chat in chats for m in chat], vocab_size=300)
    >>> root = Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok,
    ...            root / "model")                            # 2 blocks, 2 heads, 192 FFN channels each
    >>> tokens = np.arange(2000, dtype=np.uint16) % len(tok)
    >>> s = PruneSettings(head_share=0.5, ffn_share=0.5, importance_windows=4, corpus_windows=8, eval_examples=8,
    ...                   max_len=32, max_steps=2, batch_size=4, eval_every=1, log_every=1, precision="fp32")
    >>> (root / "out").mkdir()                                # the caller's staging dir
    >>> result = prune(s, root / "model", (tokens, tokens), (chats[:8], chats[8:]), root / "work", root / "out",
    ...                log=lambda e: None)
    >>> m = result.metrics
    >>> (m.heads_before, m.heads_after), (m.ffn_channels_before, m.ffn_channels_after)
    ((2, 1), (192, 96))
    >>> load_model(root / "out").config.num_attention_heads   # a model directory from_pretrained loads
    1

What is removed is chosen per block by first-order Taylor importance (Molchanov et al. 2019): the
loss change a unit's removal would cause, |Σ activation x gradient| over the unit's outputs and
the tokens of `importance_windows` windows of the corpus's training stream (calibration text: the
held-out text stays for measuring the result, which would be flattered if it had chosen the cuts).
A head's unit is the input of o_proj in its slice; an FFN channel's the input of down_proj.

Every block loses the same number of heads and channels because a Llama config has one
num_attention_heads and one intermediate_size: which ones differs per block. The kept head count
divides hidden_size (transformers checks that on save; keep_counts). With grouped-query
attention a key-value head goes with its group of query heads. The FFN keeps a multiple of 32
channels (bitsandbytes' 4-bit kernel needs it, so a pruned model can still be quantized). The
surgery writes a new config (num_attention_heads, num_key_value_heads, head_dim, intermediate_size)
and copies the kept rows of q/k/v/gate/up and columns of o/down into a model built from it, so the
result is a plain model directory that `from_pretrained` loads.

Recovery is distillation from the unpruned model (distill.py's KdSettings, trainer and data), as
Minitron does, with its own short schedule.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from llm_assets.lib.evaluate.evaluation import perplexity, validation_windows
from llm_assets.lib.posttrain import hf_training
from llm_assets.lib.pretrain.model_dir import load_model, save_model, weights_file
from llm_assets.lib.release import distill


class PruneSettings(distill.KdSettings):
    """The launchpad of `pruned_model`: how much to remove, and the recovery run (KdSettings)."""

    head_share: float = Field(0.25, description="Share of attention heads (key-value groups) removed from every block.")
    ffn_share: float = Field(0.25, description="Share of FFN channels removed from every block (the kept count rounded "
                                               "to a multiple of 32).")
    importance_windows: int = Field(32, description="Windows of the corpus's training stream the importance is "
                                                    "measured on (activation x gradient).")
    max_steps: int = hf_training.schedule_field("max_steps", 100)
    eval_every: int = hf_training.schedule_field("eval_every", 25)

    def validate(self) -> None:
        super().validate()
        for name in ("head_share", "ffn_share"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1) (got {getattr(self, name)})")
        if self.importance_windows < 1:
            raise ValueError(f"importance_windows: must be at least 1 (got {self.importance_windows})")


def _geometry(config) -> tuple[int, int, int]:
    """(head_dim, key-value heads, query heads per key-value head)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim, config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads


def importance(model, windows: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads (layers, key-value groups), channels (layers, intermediate_size)): first-order
    Taylor importance |Σ activation x gradient| of the LM loss on `windows` (n, tokens + 1)."""
    head_dim, kv, group = _geometry(model.config)
    layers = model.model.layers
    heads = torch.zeros(len(layers), kv)
    channels = torch.zeros(len(layers), model.config.intermediate_size)
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def keep(i: int, name: str):
        def hook(module, args):
            args[0].retain_grad()  # the unit outputs: o_proj's input (heads), down_proj's (channels)
            seen[(i, name)] = args[0]
        return hook

    handles = [h for i, block in enumerate(layers) for h in (
        block.self_attn.o_proj.register_forward_pre_hook(keep(i, "heads")),
        block.mlp.down_proj.register_forward_pre_hook(keep(i, "channels")))]
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(windows), batch):
            w = windows[start : start + batch].to(device)
            model(input_ids=w[:, :-1], labels=w[:, :-1]).loss.backward()
            for i in range(len(layers)):
                a = seen[(i, "heads")]
                per_dim = (a * a.grad).sum(dim=(0, 1))  # (query heads x head_dim)
                heads[i] += per_dim.view(kv, group * head_dim).sum(-1).abs().cpu()
                a = seen[(i, "channels")]
                channels[i] += (a * a.grad).sum(dim=(0, 1)).abs().cpu()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return heads, channels


def kept(scores: torch.Tensor, n_keep: int) -> list[torch.Tensor]:
    """Per row (a block), the indices of its n_keep highest scores, in their original order."""
    return [torch.sort(torch.topk(row, n_keep).indices).values for row in scores]


def keep_counts(config, head_share: float, ffn_share: float) -> tuple[int, int]:
    """(key-value groups, FFN channels) each block keeps. transformers' LlamaConfig refuses to save
    a head count that does not divide hidden_size (even with head_dim set), so the groups kept are
    the most, at most kv x (1 - head_share) rounded, whose heads divide it: 4 heads of a 256-wide
    model keep 2 at head_share 0.25."""
    _, kv, group = _geometry(config)
    target = max(1, round(kv * (1 - head_share)))
    groups = max(g for g in range(1, target + 1) if config.hidden_size % (g * group) == 0)
    ffn = config.intermediate_size
    channels = ffn if ffn_share == 0 else max(32, round(ffn * (1 - ffn_share) / 32) * 32)
    return groups, min(channels, ffn)


def _rows(groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """Weight rows of the kept groups, each `per_group` rows long."""
    return (groups[:, None] * per_group + torch.arange(per_group)).flatten()


def pruned_copy(model, keep_groups: list[torch.Tensor], keep_channels: list[torch.Tensor]):
    """A new model with the config's head and FFN counts reduced, holding the kept rows/columns."""
    from transformers import AutoModelForCausalLM

    head_dim, _, group = _geometry(model.config)
    cfg = copy.deepcopy(model.config)
    cfg.num_key_value_heads = len(keep_groups[0])
    cfg.num_attention_heads = cfg.num_key_value_heads * group
    cfg.head_dim = head_dim  # no longer hidden_size / num_attention_heads
    cfg.intermediate_size = len(keep_channels[0])
    state = model.state_dict()
    for i, (groups, ch) in enumerate(zip(keep_groups, keep_channels)):
        p = f"model.layers.{i}."
        q_rows, kv_rows = _rows(groups, group * head_dim), _rows(groups, head_dim)
        for name, rows in (("self_attn.q_proj", q_rows), ("self_attn.k_proj", kv_rows),
                           ("self_attn.v_proj", kv_rows), ("mlp.gate_proj", ch), ("mlp.up_proj", ch)):
            state[p + name + ".weight"] = state[p + name + ".weight"][rows]
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q_rows]
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, ch]
    pruned = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    pruned.load_state_dict({k: v.clone() for k, v in state.items()})
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.to(next(model.parameters()).device)


@dataclass(frozen=True)
class PruneMetrics:
    """metrics.json of a pruned model; perplexities on eval_examples evenly spaced windows of the
    validation stream, KL on the held-out examples of the recovery run."""

    heads_before: int  # query heads per block
    heads_after: int
    ffn_channels_before: int  # per block
    ffn_channels_after: int
    removed_heads: str  # per block, the query heads removed ("0:1,3; 1:0,2")
    parameters_before: int
    parameters_after: int
    parameter_ratio: float
    perplexity_unpruned: float
    perplexity_pruned: float  # before recovery
    perplexity_recovered: float  # after it: what out_dir holds
    held_out_kl_pruned: float  # KL(unpruned || pruned) per token, nats, before recovery
    held_out_kl_recovered: float
    steps_run: int
    best_step: int
    train_seconds: float
    precision: str
    resumed_from: str
    wall_seconds: float


@dataclass(frozen=True)
class PruneResult:
    metrics: PruneMetrics
    history: list[dict]


def _removed(keep_groups: list[torch.Tensor], n_groups: int, group: int) -> str:
    def heads(kept_groups):
        gone = sorted(set(range(n_groups)) - set(kept_groups.tolist()))
        return ",".join(str(g * group + j) for g in gone for j in range(group)) or "-"
    return "; ".join(f"{i}:{heads(k)}" for i, k in enumerate(keep_groups))


def cut(model, s: PruneSettings, calibration: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """(the pruned copy of `model`, which heads each block lost), importance on `calibration`."""
    head_scores, channel_scores = importance(model, calibration)
    n_groups, n_channels = keep_counts(model.config, s.head_share, s.ffn_share)
    keep_groups = kept(head_scores, n_groups)
    _, kv, group = _geometry(model.config)
    return pruned_copy(model, keep_groups, kept(channel_scores, n_channels)), _removed(keep_groups, kv, group)


def prune(s: PruneSettings, model_dir: Path, corpus: tuple[np.ndarray, np.ndarray], chats: tuple[list, list],
          work_dir: Path, out_dir: Path, log: hf_training.Log = print) -> PruneResult:
    """Prune the model in `model_dir`, recover it by distillation, write it to `out_dir` (the
    caller's staging dir); corpus: (training, validation) token streams; chats: likewise."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    s.validate()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    teacher = load_model(model_dir).eval()
    held_out = validation_windows(corpus[1], s.max_len - 1, s.eval_examples)
    pruned, removed = cut(teacher, s, validation_windows(corpus[0], s.max_len - 1, s.importance_windows))
    train_ex, eval_ex = distill.kd_examples(tokenizer, corpus, chats, s)
    pad = tokenizer.pad_token_id
    ppl_pruned, kl_pruned = perplexity(pruned, held_out), distill.held_out_kl(pruned, teacher, eval_ex, pad)
    log({"event": "pruned", "removed_heads": removed, "perplexity_pruned": ppl_pruned})
    run = hf_training.run_identity({"settings": s.model_dump(), "train": train_ex, "eval": eval_ex},
                                   [weights_file(model_dir)])
    torch.manual_seed(s.seed)
    summary, history, seconds = distill.train_student(pruned, teacher, train_ex, eval_ex, pad, s, work_dir, run, log)
    save_model(pruned, tokenizer, out_dir)
    before, after = distill.parameters(teacher), distill.parameters(pruned)
    metrics = PruneMetrics(
        heads_before=teacher.config.num_attention_heads, heads_after=pruned.config.num_attention_heads,
        ffn_channels_before=teacher.config.intermediate_size, ffn_channels_after=pruned.config.intermediate_size,
        removed_heads=removed, parameters_before=before, parameters_after=after, parameter_ratio=after / before,
        perplexity_unpruned=perplexity(teacher, held_out), perplexity_pruned=ppl_pruned,
        perplexity_recovered=perplexity(pruned, held_out), held_out_kl_pruned=kl_pruned,
        held_out_kl_recovered=distill.held_out_kl(pruned, teacher, eval_ex, pad),
        steps_run=summary["steps_run"], best_step=summary["best_step"], train_seconds=seconds,
        precision=summary["precision"], resumed_from=summary["resumed_from"], wall_seconds=time.perf_counter() - t0)
    hf_training.write_run_files(out_dir, asdict(metrics), {"settings": s.model_dump(), "source": str(model_dir),
                                                           "run_id": run}, history)
    log({"event": "done", **asdict(metrics)})
    return PruneResult(metrics, history)
