"""A release candidate beside the model it was made from: size, speed, perplexity and ROUGE-L on
the same held-out data, and the ratios and gaps a person decides on.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import load_model, save_model
    >>> from llm_assets.lib.release.compare import HeldOut, measure, versus
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> chats = [[{"role": "user", "content": f"Explain f{i}(x)."}, {"role": "assistant", "content": f"Return x + {i}."}]
    ...          for i in range(8)]
    >>> tok = train_tokenizer([m["content"] for chat in chats for m in chat], vocab_size=300)
    >>> model_dir = Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, model_dir)
    >>> tokens = np.arange(600, dtype=np.uint16) % len(tok)        # tokenized_shards' validation stream
    >>> held_out = HeldOut.build(tok, tokens, chats, windows=4, prompts=2, max_new_tokens=4, seq_len=64)
    >>> f = measure(load_model(model_dir), model_dir, tok, held_out)
    >>> f.val_perplexity > 1, 0 <= f.rouge_l <= 1, f.tokens_per_second > 0, f.parameters > 0
    (True, True, True, True)
    >>> v = versus(f, f)
    >>> v["size_ratio"], v["speedup"], v["perplexity_ratio"], v["rouge_l_gap"]
    (1.0, 1.0, 1.0, 0.0)

The figures are eval_report's own measures (lib/evaluate/evaluation.py: perplexity on evenly
spaced validation windows, greedy generation with the model's shipped generation config on the
EVALUATION half of held-out prompts, ROUGE-L against the references), on fewer examples: what a
candidate's asset reports about itself before eval_report compares every model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from llm_assets.lib.evaluate import evaluation
from llm_assets.lib.posttrain import generation
from llm_assets.lib.posttrain.chat_data import prompt_ids
from llm_assets.lib.pretrain.model_dir import weights_bytes


@dataclass(frozen=True)
class HeldOut:
    windows: torch.Tensor  # (n, seq_len + 1) validation token windows
    prompts: list[list[int]]  # generation prompts (token ids)
    references: list[str]  # their reference replies
    max_new_tokens: int

    @classmethod
    def build(cls, tokenizer, tokens: np.ndarray, chats: list[list[dict]], windows: int, prompts: int,
              max_new_tokens: int, seq_len: int) -> HeldOut:
        picked = generation.held_out_prompts(tokenizer, chats, prompts, generation.EVALUATION, max_new_tokens, seq_len)
        if not picked:
            raise ValueError(f"seq_len: no held-out chat leaves room for {max_new_tokens} new tokens in {seq_len}")
        return cls(evaluation.validation_windows(tokens, seq_len, windows),
                   [prompt_ids(tokenizer, c[:-1]) for c in picked], [c[-1]["content"] for c in picked], max_new_tokens)


@dataclass(frozen=True)
class Figures:
    val_perplexity: float
    rouge_l: float  # greedy generations, the shipped generation config, against the references
    tokens_per_second: float  # batch size 1, all generated tokens over all generation time
    parameters: int
    disk_bytes: int  # the safetensors files


def measure(model, model_dir: Path, tokenizer, held_out: HeldOut) -> Figures:
    """The figures of `model` (loaded from `model_dir`) on `held_out`."""
    start = time.perf_counter()
    texts, _, n_tokens, _ = evaluation.generate(model, tokenizer, held_out.prompts, held_out.max_new_tokens)
    seconds = time.perf_counter() - start
    return Figures(val_perplexity=evaluation.perplexity(model, held_out.windows),
                   rouge_l=evaluation.rouge_l(texts, held_out.references), tokens_per_second=n_tokens / seconds,
                   parameters=sum(p.numel() for p in model.parameters()), disk_bytes=weights_bytes(model_dir))


def versus(candidate: Figures, reference: Figures) -> dict:
    """What a candidate costs and saves against its reference: size_ratio (disk), parameter_ratio,
    speedup (tokens/s), perplexity_ratio, rouge_l_gap (candidate - reference)."""
    return {"size_ratio": candidate.disk_bytes / reference.disk_bytes,
            "parameter_ratio": candidate.parameters / reference.parameters,
            "speedup": candidate.tokens_per_second / reference.tokens_per_second,
            "perplexity_ratio": candidate.val_perplexity / reference.val_perplexity,
            "rouge_l_gap": candidate.rouge_l - reference.rouge_l}


def rows(candidate: Figures, reference: Figures) -> list[tuple]:
    """(figure, candidate, reference, ratio or gap) rows for a markdown table."""
    v = versus(candidate, reference)
    c, r = asdict(candidate), asdict(reference)
    return [("size on disk (bytes)", c["disk_bytes"], r["disk_bytes"], v["size_ratio"]),
            ("parameters", c["parameters"], r["parameters"], v["parameter_ratio"]),
            ("tokens/s (greedy, batch 1)", c["tokens_per_second"], r["tokens_per_second"], v["speedup"]),
            ("validation perplexity", c["val_perplexity"], r["val_perplexity"], v["perplexity_ratio"]),
            ("ROUGE-L (gap)", c["rouge_l"], r["rouge_l"], v["rouge_l_gap"])]
