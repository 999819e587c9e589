r"""ONNX export with a KV cache, run by ONNX Runtime, and optionally int8 (dynamic quantization).

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import save_model
    >>> from llm_assets.lib.release import onnx_export
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["def f(x):\n    return x\n"] * 5, vocab_size=300)
    >>> model_dir, out = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, model_dir)
    >>> files = onnx_export.export(model_dir, out, int8=True)
    >>> sorted(p.name for p in out.glob("*.onnx")), (out / "config.json").is_file()
    (['model-int8.onnx', 'model.onnx'], True)
    >>> lm = onnx_export.OnnxLM(files["fp32"])
    >>> lm.logits(np.array([[1, 7, 8, 9]])).shape == (1, 4, len(tok))   # (batch, tokens, vocab), no cache
    True
    >>> len(lm.greedy([1, 7, 8], 5))                        # one cached step per token
    5

The graph is `torch.onnx.export` (TorchScript tracing) of the transformers model wrapped so the
cache is explicit tensors: inputs `input_ids`, `attention_mask` (past + new tokens), `position_ids`
and `past_key_values.<layer>.key|value` (batch, heads, past, head_dim); outputs `logits` and
`present.<layer>.key|value`, the same layout with the new tokens appended (the names optimum uses).
Batch, sequence and past lengths are dynamic; a first step passes a past of length 0. Eager
attention is exported (its masking traces to plain ops). `int8` is onnxruntime's dynamic
quantization: int8 weights of every MatMul/Gather, activations quantized on the fly per call.
The model directory's config.json and tokenizer are copied beside the graphs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from llm_assets.lib.common.settings import Settings

FP32, INT8 = "model.onnx", "model-int8.onnx"
OPSET = 17


class OnnxSettings(Settings):
    int8: bool = Field(True, description="Also write model-int8.onnx: onnxruntime dynamic quantization (int8 weights).")
    threads: int = Field(2, ge=1, description="ONNX Runtime intra-op threads for scoring and generation.")
    perplexity_windows: int = Field(32, ge=1, description="Validation windows each graph (and the PyTorch model) is scored on.")
    speed_prompts: int = Field(4, ge=1, description="Prompts greedily continued to measure tokens/s.")
    speed_tokens: int = Field(64, ge=1, description="Tokens generated per speed prompt.")


class _ExplicitCache(torch.nn.Module):
    """The causal LM with its KV cache as flat tensors in and out (what ONNX can carry)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export(model_dir: Path, out_dir: Path, int8: bool = True) -> dict[str, Path]:
    """{"fp32": model.onnx[, "int8": model-int8.onnx]} written into out_dir, with config and tokenizer."""
    from transformers import AutoModelForCausalLM

    from llm_assets.lib.pretrain.model_dir import check_safetensors

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_safetensors(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    c = model.config
    heads, head_dim = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or head_dim
    inputs, outputs = _io_names(c.num_hidden_layers)
    past_len, new = 3, 2  # tracing sizes; every length is a dynamic axis
    args = (torch.tensor([[5, 6]]), torch.ones(1, past_len + new, dtype=torch.int64),
            torch.tensor([[past_len, past_len + 1]]),
            *[torch.zeros(1, heads, past_len, head_dim) for _ in range(2 * c.num_hidden_layers)])
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "total"} for n in outputs[1:]})
    with torch.no_grad():
        torch.onnx.export(_ExplicitCache(model), args, str(out_dir / FP32), input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    files = {"fp32": out_dir / FP32}
    if int8:
        files["int8"] = quantize_int8(files["fp32"], out_dir / INT8)
    for p in model_dir.iterdir():
        if p.suffix in (".json", ".jinja"):
            shutil.copy2(p, out_dir / p.name)
    return files


def quantize_int8(src: Path, dst: Path) -> Path:
    """onnxruntime's dynamic quantization: int8 weights, activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return Path(dst)


class OnnxLM:
    """An exported graph in an ONNX Runtime session: full-window logits, cached greedy decoding."""

    def __init__(self, path: Path, threads: int = 2):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        config = json.loads((self.path.parent / "config.json").read_text())
        self.n_layers, self.heads = config["num_hidden_layers"], config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]

    def _run(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        batch, new = ids.shape
        seen = past[0].shape[2]
        feed = {"input_ids": ids.astype(np.int64),
                "attention_mask": np.ones((batch, seen + new), dtype=np.int64),
                "position_ids": np.broadcast_to(np.arange(seen, seen + new, dtype=np.int64), (batch, new)).copy()}
        inputs, _ = _io_names(self.n_layers)
        feed.update(zip(inputs[3:], past))
        logits, *present = self.session.run(None, feed)
        return logits, present

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.heads, 0, self.head_dim), dtype=np.float32) for _ in range(2 * self.n_layers)]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """(batch, tokens, vocab) logits of whole windows (an empty cache)."""
        return self._run(np.asarray(ids), self.empty_cache(len(ids)))[0]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """`n` greedily chosen ids after `prompt`: the prompt once, then one cached step per token."""
        logits, past = self._run(np.array([prompt]), self.empty_cache())
        out = []
        for _ in range(n):
            out.append(int(np.argmax(logits[0, -1])))
            logits, past = self._run(np.array([[out[-1]]]), past)
        return out

    def perplexity(self, windows: np.ndarray, batch: int = 8) -> float:
        """exp(mean next-token NLL) over windows of seq_len + 1 ids, as evaluation.perplexity scores."""
        windows = np.asarray(windows)
        total, count = 0.0, 0
        for i in range(0, len(windows), batch):
            w = windows[i : i + batch]
            logits = torch.from_numpy(self.logits(w[:, :-1]))
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(w[:, 1:]).flatten(),
                                                       reduction="sum").item()
            count += w[:, 1:].size
        return float(np.exp(total / count))

    def ms_per_token(self, prompts: list[list[int]], n: int) -> list[float]:
        """Milliseconds per generated token for each prompt (greedy, `n` tokens, after one warm-up)."""
        self.greedy(prompts[0], 2)
        out = []
        for p in prompts:
            start = time.perf_counter()
            self.greedy(p, n)
            out.append(1000 * (time.perf_counter() - start) / n)
        return out


def measure(files: dict[str, Path], windows: np.ndarray, prompts: list[list[int]], s: OnnxSettings) -> dict[str, dict]:
    """{variant: size, validation perplexity, ms/token (p50) and tokens/s} of each graph in ONNX Runtime;
    every variant scores the same windows and continues the same prompts."""
    figures = {}
    for variant, path in files.items():
        lm = OnnxLM(path, s.threads)
        ms = float(np.median(lm.ms_per_token(prompts, s.speed_tokens)))
        figures[variant] = {"disk_bytes": Path(path).stat().st_size, "val_perplexity": lm.perplexity(windows),
                            "ms_per_token_p50": ms, "tokens_per_second": 1000 / ms}
    return figures
