r"""GGUF export: a model directory written as GGUF for llama.cpp, quantized by llama.cpp, run by
llama.cpp (through llama-cpp-python), and measured there (perplexity, greedy tokens, speed).

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import save_model
    >>> from llm_assets.lib.release import gguf_export
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["def f(x):\n    return x  # café\n"] * 5, vocab_size=300)
    >>> model_dir, out = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, model_dir)
    >>> files = gguf_export.export(model_dir, out, ["f16", "q8_0", "q4_0"])
    >>> sorted(p.name for p in out.iterdir())
    ['model-f16.gguf', 'model-q4_0.gguf', 'model-q8_0.gguf']
    >>> llm = gguf_export.load(files["q8_0"], n_ctx=128)
    >>> gguf_export.tokenize(llm, "def f(x): café") == tok("def f(x): café")["input_ids"]
    True
    >>> len(gguf_export.greedy(llm, [tok.eos_token_id, 7, 8], 5))
    5

Why the export is written here with `gguf.GGUFWriter` rather than llama.cpp's
`convert_hf_to_gguf.py`: the converter ships only inside llama-cpp-python's source distribution (not
in the installed package), and it refuses the project's tokenizer ("BPE pre-tokenizer was not
recognized": it identifies pre-tokenizers by hashing known tokenizers' output). The project's
tokenizer is GPT-2's byte-level BPE with GPT-2's regex and no normalizer, which is exactly llama.cpp's
pre-tokenizer "gpt-2", so that is declared (FIELD_NOTES: llama.cpp / GGUF). The model is
`LlamaForCausalLM`, llama.cpp's `llama` architecture, so the mapping is the converter's: tensor names
from gguf's own `TensorNameMap`, and q/k projection rows permuted from Hugging Face's rotate-half
rotary layout to GGML's interleaved pairs (`_permute_qk`). The tied output embedding is left out:
llama.cpp reuses `token_embd` when `output.weight` is absent.

The GGUFWriter writes an fp32 file; llama.cpp's own quantizer (`llama_model_quantize`, what the
`llama-quantize` tool runs) turns it into each type (`GGUF_TYPES`), so every type is quantized from
full precision and 1-D tensors (norms) stay fp32 as llama.cpp expects. Q4_0 is the 4-bit type here:
its blocks are 32 wide, which every width of the tiny and demo sizes is, while Q4_K needs rows in
multiples of 256 (the demo's FFN width, 704, is not; llama.cpp would fall back per tensor).
"""

from __future__ import annotations

import ctypes
import json
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from llm_assets.lib.common.settings import Settings

# Export types -> llama.cpp's file types (llama.h `enum llama_ftype`).
GGUF_TYPES = {"f16": 1, "q8_0": 7, "q4_0": 2}


class GgufSettings(Settings):
    types: list[str] = Field(["f16", "q8_0", "q4_0"], description=f"GGUF types to write, each quantized from fp32 by llama.cpp: any of {sorted(GGUF_TYPES)}.")
    threads: int = Field(2, ge=1, description="CPU threads llama.cpp uses to quantize, score and generate.")
    perplexity_windows: int = Field(32, ge=1, description="Validation windows each type (and the fp32 PyTorch model) is scored on.")
    speed_prompts: int = Field(4, ge=1, description="Prompts greedily continued to measure tokens/s per type.")
    speed_tokens: int = Field(64, ge=1, description="Tokens generated per speed prompt.")


def gguf_path(out_dir: Path, gguf_type: str) -> Path:
    """The file of one type in a gguf_model directory (the one reader and writer of the name)."""
    return Path(out_dir) / f"model-{gguf_type}.gguf"


RECORD = "gguf.json"  # beside the files: the model they were exported from ("source") and their figures


def write_record(out_dir: Path, record: dict) -> None:
    """`gguf.json` in a gguf_model directory: `record` with the exported model's directory as "source"."""
    if "source" not in record:
        raise ValueError(f"{RECORD}: the record must name the exported model directory as 'source'")
    (Path(out_dir) / RECORD).write_text(json.dumps(record, indent=2))


def exported_from(out_dir: Path) -> Path:
    """The model directory a gguf_model directory's files were exported from (resolved)."""
    path = Path(out_dir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the GGUF files beside it do not say which model they hold")
    return Path(json.loads(path.read_text())["source"]).resolve()


def export(model_dir: Path, out_dir: Path, types: list[str], threads: int = 2) -> dict[str, Path]:
    """{type: path}: the model written once in fp32 with GGUFWriter, then quantized to each type by
    llama.cpp; the fp32 intermediate is deleted."""
    unknown = sorted(set(types) - set(GGUF_TYPES))
    if unknown or not types:
        raise ValueError(f"types: {unknown or 'none given'}; choose from {sorted(GGUF_TYPES)}")
    fp32 = Path(out_dir) / "model-f32.gguf.tmp"
    write_gguf(model_dir, fp32)
    try:
        return {t: quantize_gguf(fp32, gguf_path(out_dir, t), t, threads) for t in types}
    finally:
        fp32.unlink(missing_ok=True)


def write_gguf(model_dir: Path, path: Path) -> None:
    """The model directory (config.json, model.safetensors, tokenizer.json) as one fp32 GGUF file."""
    import gguf
    from safetensors.numpy import load_file

    from llm_assets.lib.pretrain.model_dir import check_safetensors

    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{model_dir}/config.json: model_type {config.get('model_type')!r}; the GGUF export maps llama only")
    weights = load_file(check_safetensors(model_dir))
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_hparams(writer, config, Path(model_dir).name)
    _write_tokenizer(writer, Path(model_dir), config["vocab_size"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for hf_name, array in weights.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd for the output projection
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{model_dir}: tensor {hf_name} has no GGUF name for the llama architecture")
        writer.add_tensor(name, _permute_qk(hf_name, array.astype(np.float32), config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_hparams(writer, config: dict, name: str) -> None:
    import gguf

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _write_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """GPT-2 style BPE: the token strings by id (byte-level symbols), special tokens as CONTROL,
    the merges, bos/eos/pad, `<|end|>` as end of turn, and the chat template."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {a["id"]: a["content"] for a in spec["added_tokens"]}
    by_id.update(special)
    if sorted(by_id) != list(range(vocab_size)):
        raise ValueError(f"{model_dir}/tokenizer.json: ids are not 0..{vocab_size - 1}, the model's vocab_size")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's regex, byte-level, no normalizer: the project's tokenizer
    writer.add_token_list([by_id[i] for i in range(vocab_size)])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab_size)])
    vocab = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)  # merges, bos/eos/pad, chat template
    vocab.add_to_gguf(writer, quiet=True)
    if "bos" not in vocab.add_special_token:
        writer.add_add_bos_token(False)  # the project's tokenizer adds no BOS to text
    if "<|end|>" in special.values():
        writer.add_eot_token_id(next(i for i, t in special.items() if t == "<|end|>"))


def _permute_qk(hf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    """q/k rows from HF's rotate-half rotary layout (first half, second half of each head) to GGML's
    interleaved pairs, as llama.cpp's converter does; other tensors unchanged."""
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads", config["num_attention_heads"])}
    kind = next((k for k in heads if f".{k}." in hf_name), None)
    if kind is None:
        return w
    n = heads[kind]
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_gguf(src: Path, dst: Path, gguf_type: str, threads: int = 2) -> Path:
    """llama.cpp's quantizer (`llama-quantize`) from `src` to `dst` at `gguf_type`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = GGUF_TYPES[gguf_type], threads
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {gguf_type} (status {status})")
    return Path(dst)


def load(path: Path, n_ctx: int, threads: int = 2):
    """A llama.cpp model and context over a GGUF file, keeping every position's logits (scoring)."""
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                           logits_all=True, verbose=False)


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's token ids for `text` as the project's tokenizer gives them: no BOS, and the text of a
    special token (`<|end|>`) read as that token."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    """`n` greedily chosen token ids after `prompt`: argmax of llama.cpp's logits, one decode per token."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def perplexity(llm, windows: np.ndarray) -> float:
    """exp(mean next-token NLL) over windows of seq_len + 1 ids, as evaluation.perplexity scores."""
    total, count = 0.0, 0
    for w in np.asarray(windows):
        llm.reset()
        llm.eval(w[:-1].tolist())
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        peak = logits.max(axis=1, keepdims=True)
        log_z = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
        total += float((log_z - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return float(np.exp(total / count))


def ms_per_token(llm, prompts: list[list[int]], n: int) -> list[float]:
    """Milliseconds per generated token for each prompt (greedy, `n` tokens, after one warm-up)."""
    greedy(llm, prompts[0], 2)
    out = []
    for p in prompts:
        start = time.perf_counter()
        greedy(llm, p, n)
        out.append(1000 * (time.perf_counter() - start) / n)
    return out


def measure(files: dict[str, Path], windows: np.ndarray, prompts: list[list[int]], n_ctx: int,
            s: GgufSettings) -> dict[str, dict]:
    """{type: size, validation perplexity, ms/token (p50) and tokens/s} of each exported file, run by
    llama.cpp with `s.threads` threads; every type scores the same windows and continues the same prompts."""
    if max(map(len, prompts)) + s.speed_tokens > n_ctx:
        raise ValueError(f"speed_tokens: {s.speed_tokens} tokens after a prompt do not fit the context ({n_ctx})")
    figures = {}
    for gguf_type, path in files.items():
        llm = load(path, n_ctx, s.threads)
        try:
            ms = float(np.median(ms_per_token(llm, prompts, s.speed_tokens)))
            figures[gguf_type] = {"disk_bytes": Path(path).stat().st_size, "val_perplexity": perplexity(llm, windows),
                                  "ms_per_token_p50": ms, "tokens_per_second": 1000 / ms}
        finally:
            llm.close()
    return figures
