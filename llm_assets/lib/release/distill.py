"""Knowledge distillation: a smaller student trained to match a teacher's next-token distributions.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import save_model
    >>> from llm_assets.lib.release.distill import DistillSettings, distill
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> chats = [[{"role": "user", "content": f"Explain f{i}(x)."}, {"role": "assistant", "content": f"Return x + {i}."}]
    ...          for i in range(12)]
    >>> tok = train_tokenizer([m["content"] for chat in chats for m in chat], vocab_size=300)
    >>> root = Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok,
    ...            root / "teacher")                          # the aligned model (here untrained)
    >>> tokens = np.arange(2000, dtype=np.uint16) % len(tok)  # tokenized_shards' streams
    >>> s = DistillSettings(student_layers=1, corpus_windows=8, eval_examples=8, max_len=32, max_steps=4,
    ...                     batch_size=4, lr=3e-3, warmup_ratio=0, eval_every=2, log_every=2, precision="fp32")
    >>> (root / "out").mkdir()                                # the caller's staging dir
    >>> result = distill(s, root / "teacher", (tokens, tokens), (chats[:8], chats[8:]), root / "work", root / "out",
    ...                  log=lambda e: None)
    >>> m = result.metrics
    >>> m.student_layers, m.teacher_layers, m.steps_run, m.held_out_kl_after < m.held_out_kl_before
    (1, 2, 4, True)
    >>> sorted(p.name for p in (root / "out").iterdir())[:4]
    ['chat_template.jinja', 'config.json', 'generation_config.json', 'log_history.jsonl']

The student is a Llama like its teacher, smaller by `student_layers` (fewer decoder blocks) and
`student_width` (a narrower hidden size, heads of the teacher's head_dim, the FFN narrowed in
proportion). At the teacher's width it starts from the teacher (DistilBERT's initialization): the
embedding, the final norm and evenly spaced blocks (2 of 4: blocks 0 and 3), so a few hundred steps
suffice; a narrower student starts from a random initialization and needs many more.

The loss is Hinton et al.'s (2015): KL(teacher || student) of the next-token distributions softened
by `temperature`, times temperature² (which keeps gradients comparable across temperatures), on
every real token of windows of the corpus (tokenized_shards) and of the SFT chats (prompt and reply:
the student learns the teacher's whole distribution, not just replies). The teacher is frozen; with
`precision: auto` both run under bf16 autocast. The schedule is hf_training's: epochs capped by
max_steps, the held-out KL every eval_every steps, the checkpoint of the lowest kept, resumable.

`out_dir` (the caller's staging dir) gets the student as a model directory (the teacher's tokenizer
and generation_config.json: it decodes as its teacher does), `metrics.json`, `training_config.json`
and `log_history.jsonl`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from llm_assets.lib.evaluate.evaluation import validation_windows
from llm_assets.lib.posttrain import hf_training
from llm_assets.lib.posttrain.chat_data import PadCollator, encode_chat, pad_batch
from llm_assets.lib.pretrain.model_dir import load_model, save_model, weights_file


class KdSettings(hf_training.ScheduleSettings):
    """Training a model to match a teacher (distillation, and a pruned model's recovery): the
    schedule's fields, the temperature and the text."""

    temperature: float = Field(2.0, description="Softens both next-token distributions before the KL (Hinton et al.); "
                                                "the loss is multiplied by its square.")
    corpus_windows: int = Field(1024, description="Training windows of max_len tokens, evenly spaced over the corpus's "
                                                  "training token stream (tokenized_shards).")
    sft_examples: int = Field(2048, description="Training SFT chats (prompt and reply) distilled on, at most (0 = all).")
    eval_examples: int = Field(64, description="Held-out examples the KL is measured on: half validation-stream windows, "
                                               "half validation chats.")
    max_len: int = hf_training.schedule_field("max_len", 256)
    max_steps: int = hf_training.schedule_field("max_steps", 200)
    eval_every: int = hf_training.schedule_field("eval_every", 50)
    lr: float = hf_training.schedule_field("lr", 5e-4)

    def validate(self) -> None:
        hf_training.validate_schedule(self)
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be positive (got {self.temperature})")
        for name in ("corpus_windows", "eval_examples"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: must be at least 2 (got {getattr(self, name)})")
        if self.sft_examples < 0:
            raise ValueError(f"sft_examples: must not be negative (got {self.sft_examples})")


class DistillSettings(KdSettings):
    """The launchpad of `distilled_model`: the student's shape and KdSettings."""

    student_layers: int = Field(2, description="Decoder blocks of the student (0 = the teacher's).")
    student_width: int = Field(0, description="Hidden width of the student (0 = the teacher's: it then starts from the "
                                              "teacher's blocks); a multiple of the teacher's head_dim.")


def student_config(teacher_config, layers: int, width: int):
    """The teacher's config with `layers` blocks and `width` hidden units (0 keeps the teacher's)."""
    cfg = copy.deepcopy(teacher_config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if layers < 0 or layers > cfg.num_hidden_layers:
        raise ValueError(f"student_layers: must be in [0, {cfg.num_hidden_layers}] (got {layers})")
    if width < 0 or width > cfg.hidden_size or width % head_dim:
        raise ValueError(f"student_width: must be a multiple of the teacher's head_dim {head_dim} "
                         f"up to {cfg.hidden_size} (got {width})")
    cfg.num_hidden_layers = layers or cfg.num_hidden_layers
    if width and width != cfg.hidden_size:
        shrink = width / cfg.hidden_size
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        cfg.num_attention_heads = width // head_dim
        cfg.num_key_value_heads = max(1, cfg.num_attention_heads // group)
        # a multiple of 32: bitsandbytes' 4-bit kernel needs it, so the student can be quantized
        cfg.intermediate_size = max(32, math.ceil(cfg.intermediate_size * shrink / 32) * 32)
        cfg.hidden_size = width
    cfg.head_dim = head_dim
    return cfg


def spaced_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher blocks, first and last included: 2 of 4 -> [0, 3]."""
    return sorted({round(x) for x in np.linspace(0, n_teacher - 1, n_student)})


def make_student(teacher, layers: int, width: int) -> tuple[torch.nn.Module, list[int]]:
    """(the student, the teacher blocks it starts from: [] for a narrower, randomly initialized one)."""
    from transformers import AutoModelForCausalLM

    cfg = student_config(teacher.config, layers, width)
    student = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    if cfg.hidden_size != teacher.config.hidden_size:
        return student.to(teacher.device), []
    picked = spaced_layers(teacher.config.num_hidden_layers, cfg.num_hidden_layers)
    student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    student.model.norm.load_state_dict(teacher.model.norm.state_dict())
    for mine, theirs in zip(student.model.layers, picked):
        mine.load_state_dict(teacher.model.layers[theirs].state_dict())
    if not cfg.tie_word_embeddings:
        student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    return student.to(teacher.device), picked


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Mean over real tokens (mask: (batch, tokens), 1 = real) of KL(teacher_T || student_T) x T²;
    logits (batch, tokens, vocab), computed in fp32."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (batch, tokens)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2


def distill_trainer(teacher, temperature: float, **trainer_kwargs):
    """A Trainer whose loss is kd_loss against a frozen teacher (eval_loss: the held-out KL). Its
    class is made here, not at import: transformers' Trainer module takes seconds to import (peft,
    accelerate, datasets), which every `llm-assets` command paid on loading the definitions."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            outputs = model(input_ids=ids, attention_mask=mask)  # no labels: the KL is the loss
            with torch.no_grad():
                teacher_logits = frozen(input_ids=ids, attention_mask=mask).logits
            loss = kd_loss(outputs.logits, teacher_logits, mask, temperature)
            return (loss, outputs) if return_outputs else loss

    frozen = teacher.eval().requires_grad_(False)
    return DistillTrainer(**trainer_kwargs)


@torch.no_grad()
def held_out_kl(student, teacher, examples: Sequence[dict], pad_id: int, batch_size: int = 16) -> float:
    """Mean KL(teacher || student) per real token at temperature 1, nats."""
    student.eval()
    total, count = 0.0, 0
    device = next(student.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[i : i + batch_size], pad_id).items()}
        mask = batch["attention_mask"]
        kl = kd_loss(student(input_ids=batch["input_ids"], attention_mask=mask).logits,
                     teacher(input_ids=batch["input_ids"], attention_mask=mask).logits, mask, 1.0)
        total, count = total + kl.item() * mask.sum().item(), count + mask.sum().item()
    return total / count


def _window_examples(tokens: np.ndarray, n: int, max_len: int) -> list[dict]:
    windows = validation_windows(tokens, max_len - 1, n)  # (n, max_len): evenly spaced
    return [{"input_ids": w.tolist(), "labels": w.tolist()} for w in windows]


def _chat_examples(tokenizer, chats: list[list[dict]], n: int, max_len: int) -> list[dict]:
    """Chats encoded whole (prompt and reply count: labels are the ids), evenly spread, at most n."""
    if n and len(chats) > n:
        chats = [chats[int(i)] for i in np.linspace(0, len(chats) - 1, n)]
    encoded = [e for e in (encode_chat(tokenizer, c, max_len) for c in chats) if e is not None]
    return [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in encoded]


def kd_examples(tokenizer, corpus: tuple[np.ndarray, np.ndarray], chats: tuple[list, list],
                s: KdSettings) -> tuple[list[dict], list[dict]]:
    """(training, held-out) examples: corpus windows and SFT chats of each split."""
    train = _window_examples(corpus[0], s.corpus_windows, s.max_len) + \
        _chat_examples(tokenizer, chats[0], s.sft_examples, s.max_len)
    half = s.eval_examples // 2
    held_out = _window_examples(corpus[1], half, s.max_len) + \
        _chat_examples(tokenizer, chats[1], s.eval_examples - half, s.max_len)
    return train, held_out


def train_student(student, teacher, train_ex: list[dict], eval_ex: list[dict], pad_id: int, s: KdSettings,
                  work_dir: Path, run_id: str, log: hf_training.Log) -> tuple[dict, list[dict], float]:
    """Fit `student` to `teacher` with the shared schedule; afterwards `student` holds the best
    checkpoint. Returns (selection summary plus run figures, the curve, seconds in train())."""
    from transformers import TrainingArguments

    work_dir = Path(work_dir)
    resume_from = hf_training.prepare_work_dir(work_dir, run_id, log)
    args = TrainingArguments(**hf_training.trainer_arguments(s, work_dir, len(train_ex)),
                             train_sampling_strategy="group_by_length")  # less padding: cheaper steps
    trainer = distill_trainer(teacher.to(args.device), s.temperature, model=student, args=args, train_dataset=train_ex,
                              eval_dataset=eval_ex, data_collator=PadCollator(pad_id),
                              callbacks=hf_training.schedule_callbacks(s))
    trained, seconds, history = hf_training.fit(trainer, resume_from, log)
    summary = hf_training.selection_summary(history, hf_training.planned_steps(s, len(train_ex)))
    summary.update(train_loss=trained.training_loss, resumed_from=resume_from or "",
                   precision="bf16" if hf_training.uses_bf16(s.precision) else "fp32")
    return summary, history, seconds


def parameters(model) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class DistillMetrics:
    """metrics.json of a distilled model; KL in nats per token at temperature 1 on the held-out examples."""

    student_layers: int
    teacher_layers: int
    student_width: int
    teacher_width: int
    initialized_from_blocks: str  # the teacher blocks the student started from ("" = random)
    student_parameters: int
    teacher_parameters: int
    parameter_ratio: float  # student / teacher
    train_examples: int  # corpus windows + SFT chats
    eval_examples: int
    held_out_kl_before: float  # the initialized student
    held_out_kl_after: float  # the kept (best) checkpoint
    steps_run: int
    best_step: int
    best_eval_loss: float  # the Trainer's held-out loss there: KL x T² at the training temperature
    train_loss: float
    train_seconds: float
    precision: str
    resumed_from: str
    wall_seconds: float


@dataclass(frozen=True)
class DistillResult:
    metrics: DistillMetrics
    history: list[dict]


def distill(s: DistillSettings, teacher_dir: Path, corpus: tuple[np.ndarray, np.ndarray], chats: tuple[list, list],
            work_dir: Path, out_dir: Path, log: hf_training.Log = print) -> DistillResult:
    """Distil the model in `teacher_dir` into a student written to `out_dir` (see the module
    docstring); corpus: (training, validation) token streams; chats: (training, validation) SFT chats."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    s.validate()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = load_model(teacher_dir).eval()
    train_ex, eval_ex = kd_examples(tokenizer, corpus, chats, s)
    torch.manual_seed(s.seed)
    student, picked = make_student(teacher, s.student_layers, s.student_width)
    pad = tokenizer.pad_token_id
    kl_before = held_out_kl(student, teacher, eval_ex, pad)
    log({"event": "start", "student_parameters": parameters(student), "teacher_parameters": parameters(teacher),
         "train_examples": len(train_ex), "held_out_kl_before": kl_before})
    run = hf_training.run_identity({"settings": s.model_dump(), "train": train_ex, "eval": eval_ex},
                                   [weights_file(teacher_dir)])
    summary, history, seconds = train_student(student, teacher, train_ex, eval_ex, pad, s, work_dir, run, log)
    student.generation_config = copy.deepcopy(teacher.generation_config)  # decode as the teacher does
    save_model(student, tokenizer, out_dir)
    metrics = DistillMetrics(
        student_layers=student.config.num_hidden_layers, teacher_layers=teacher.config.num_hidden_layers,
        student_width=student.config.hidden_size, teacher_width=teacher.config.hidden_size,
        initialized_from_blocks=",".join(map(str, picked)),
        student_parameters=parameters(student), teacher_parameters=parameters(teacher),
        parameter_ratio=parameters(student) / parameters(teacher),
        train_examples=len(train_ex), eval_examples=len(eval_ex),
        held_out_kl_before=kl_before, held_out_kl_after=held_out_kl(student, teacher, eval_ex, pad),
        steps_run=summary["steps_run"], best_step=summary["best_step"], best_eval_loss=summary["best_eval_loss"],
        train_loss=summary["train_loss"], train_seconds=seconds, precision=summary["precision"],
        resumed_from=summary["resumed_from"], wall_seconds=time.perf_counter() - t0)
    hf_training.write_run_files(out_dir, asdict(metrics), {"settings": s.model_dump(), "teacher": str(teacher_dir),
                                                           "run_id": run}, history)
    log({"event": "done", **asdict(metrics)})
    return DistillResult(metrics, history)
