"""Group `release`, the deployment exports of the release candidate (the aligned model, as
quantized_model takes it): gguf_model (GGUF files run by llama.cpp) and onnx_model (an ONNX graph
with a KV cache run by ONNX Runtime). Each is measured in its own runtime against the aligned fp32
PyTorch model on the same validation windows; gguf_model's perplexity gate is blocking like
quantized_model's. In their own module beside release.py (which holds quantized_model and release)."""

import json

import dagster as dg
import numpy as np
from pydantic import Field

from llm_assets.defs.resources import LakeResource, artifact_metadata
from llm_assets.lib.common.report import markdown_table
from llm_assets.lib.common.settings import settings_of
from llm_assets.lib.evaluate import evaluation
from llm_assets.lib.pretrain.model_dir import context_length, load_model, merged_dir, weights_bytes
from llm_assets.lib.release import gguf_export, onnx_export
from llm_assets.lib.tokenizer import packing

GGUF_GATE = "gguf_perplexity_within_budget"
SOURCES = ["aligned_checkpoint", "tokenized_shards"]
PROMPT_TOKENS = 16  # each speed prompt: the first tokens of a validation window


class GgufConfig(dg.Config, gguf_export.GgufSettings):
    """lib/release/gguf_export.py's settings (types, threads, what is measured) and the gate."""

    perplexity_budget: float = Field(0.05, ge=-1, description="Gate: every GGUF type's validation perplexity may exceed the aligned fp32 model's by at most this share.")


class OnnxConfig(dg.Config, onnx_export.OnnxSettings):
    """lib/release/onnx_export.py's settings (int8, threads, what is measured)."""


def _reference(lake: LakeResource, n_windows: int, n_prompts: int) -> tuple:
    """(aligned model dir, its validation windows, speed prompts, its fp32 PyTorch perplexity)."""
    source = merged_dir(lake.artifact_dir("aligned_checkpoint"))
    tokens = packing.load_tokens(lake.artifact_dir("tokenized_shards"), "validation")
    windows = evaluation.validation_windows(tokens, context_length(source), n_windows)
    prompts = [w[:PROMPT_TOKENS].tolist() for w in windows[:n_prompts]]
    return source, windows, prompts, evaluation.perplexity(load_model(source), windows)


def _table(figures: dict[str, dict], aligned_ppl: float, aligned_bytes: int) -> str:
    rows = [("fp32 PyTorch (aligned)", aligned_bytes, 1.0, aligned_ppl, 1.0, "", "")]
    rows += [(name, f["disk_bytes"], f["disk_bytes"] / aligned_bytes, f["val_perplexity"],
              f["val_perplexity"] / aligned_ppl, f["ms_per_token_p50"], f["tokens_per_second"]) for name, f in figures.items()]
    return markdown_table(["variant", "size (B)", "size ratio", "val perplexity", "perplexity ratio", "ms/token p50",
                           "tokens/s"], rows)


def _flat(figures: dict[str, dict]) -> dict:
    return {f"{name}_{k}": v for name, f in figures.items() for k, v in f.items()}


@dg.asset(group_name="release", kinds={"llama.cpp", "dvc"}, deps=SOURCES, check_specs=[dg.AssetCheckSpec(
    GGUF_GATE, asset="gguf_model", blocking=True,
    description="Every GGUF type's validation perplexity (run by llama.cpp) is within perplexity_budget of the aligned fp32 model's.")])
def gguf_model(context: dg.AssetExecutionContext, config: GgufConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The aligned model exported to GGUF with its tokenizer (gguf's GGUFWriter) at each type in
    `types` (f16, Q8_0, Q4_0 by llama.cpp's quantizer), run by llama.cpp: size, perplexity and tokens/s
    per type in `gguf.json` and the metadata. Load a file with `llama_cpp.Llama(path)` or llama.cpp's CLI."""
    s = settings_of(config, gguf_export.GgufSettings)
    source, windows, prompts, aligned_ppl = _reference(lake, s.perplexity_windows, s.speed_prompts)
    with lake.write("gguf_model") as tmp:
        files = gguf_export.export(source, tmp, s.types, s.threads)
        figures = gguf_export.measure(files, windows.numpy(), prompts, context_length(source), s)
        worst = max(f["val_perplexity"] for f in figures.values()) / aligned_ppl
        gate = {"name": GGUF_GATE, "passed": worst <= 1 + config.perplexity_budget, "threshold": 1 + config.perplexity_budget,
                "observed": worst, "rule": "max over types of perplexity / aligned fp32 perplexity <= 1 + budget"}
        found = {**_beside(source, aligned_ppl), "types": figures, "gate": gate}
        gguf_export.write_record(tmp, found)
    return _recorded(lake, "gguf_model", found, figures, {"aligned_disk_bytes": found["aligned_disk_bytes"]},
                     [dg.AssetCheckResult(check_name=GGUF_GATE, passed=gate["passed"], metadata={
                         "threshold": gate["threshold"], "observed": worst, "rule": gate["rule"]})])


def _beside(source, aligned_ppl: float) -> dict:
    """The figures of the aligned model an export is measured against (the head of its json)."""
    return {"source": str(source), "aligned_val_perplexity": aligned_ppl, "aligned_disk_bytes": weights_bytes(source)}


def _recorded(lake: LakeResource, asset: str, found: dict, figures: dict, extra: dict,
              checks: list | None = None) -> dg.MaterializeResult:
    """Record `asset` with DVC; its metadata: figures per type, `extra`, and the comparison table."""
    version = lake.record(asset)
    aligned_ppl = found["aligned_val_perplexity"]
    return dg.MaterializeResult(
        metadata={**artifact_metadata(lake.artifact_dir(asset), version), **_flat(figures), **extra,
                  "aligned_val_perplexity": aligned_ppl,
                  "comparison": dg.MetadataValue.md(_table(figures, aligned_ppl, found["aligned_disk_bytes"]))},
        data_version=dg.DataVersion(version.md5), check_results=checks or [])


@dg.asset(group_name="release", kinds={"onnx", "dvc"}, deps=SOURCES)
def onnx_model(context: dg.AssetExecutionContext, config: OnnxConfig, lake: LakeResource) -> dg.MaterializeResult:
    """The aligned model as an ONNX graph with a KV cache (`model.onnx`; inputs input_ids,
    attention_mask, position_ids, past_key_values.<layer>.key|value; outputs logits, present.*), and
    with `int8` its dynamically quantized copy (`model-int8.onnx`), run by ONNX Runtime: size,
    perplexity, tokens/s and the largest logit difference from PyTorch in `onnx.json` and the metadata."""
    s = settings_of(config, onnx_export.OnnxSettings)
    source, windows, prompts, aligned_ppl = _reference(lake, s.perplexity_windows, s.speed_prompts)
    with lake.write("onnx_model") as tmp:
        files = onnx_export.export(source, tmp, int8=s.int8)
        figures = onnx_export.measure(files, windows.numpy(), prompts, s)
        probe = windows[:2, :-1]
        diff = float(np.abs(onnx_export.OnnxLM(files["fp32"], s.threads).logits(probe.numpy())
                            - load_model(source).eval()(input_ids=probe).logits.detach().numpy()).max())
        found = {**_beside(source, aligned_ppl), "max_abs_logit_diff_fp32": diff, "variants": figures}
        (tmp / "onnx.json").write_text(json.dumps(found, indent=2))
    return _recorded(lake, "onnx_model", found, figures, {"max_abs_logit_diff_fp32": diff})
