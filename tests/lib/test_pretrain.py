"""Pretraining on CPU with the tiny model: learning, outputs that reload and generate, settings
validation, resume after kill -9, no resume across configs, and DDP with two gloo ranks.

The fixtures build the whole input in-process: a byte-level BPE tokenizer trained on a few stdlib
modules and token streams in the packed-shard format (train.bin / validation.bin / meta.json)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_assets.lib.pretrain.model import MODEL_SIZES, build_model, count_parameters, estimate_parameters
from llm_assets.lib.pretrain.checkpoints import latest_checkpoint
from llm_assets.lib.pretrain.pretrain import PretrainSettings, eval_starts, lr_factor, train, train_batch
from llm_assets.lib.pretrain.run_metrics import PretrainMetrics
from llm_assets.lib.tokenizer.packing import write_streams

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# ~25 ms a step, 60 steps. One thread keeps runs bit-reproducible across processes (and is polite).
TINY = PretrainSettings(size="tiny", seq_len=64, micro_batch=8, max_steps=60, lr=1e-2,
                        warmup_steps=4, eval_every=30, eval_batches=2, checkpoint_every=30,
                        log_every=5, num_threads=1)


def make_tokenizer(texts: list[str], out: Path, vocab_size: int = 400):
    """Byte-level BPE with the project's specials (<|bos|>=0, <|eos|>=1, <|pad|>=2, chat 3..6)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(out)
    return fast


def write_tokens(out: Path, splits: dict[str, list[list[int]]], vocab_size: int) -> Path:
    """The packed-shard format (packing's own writer): documents joined by eos (id 1), plus meta.json."""
    streams = {split: [t for doc in docs for t in [*doc, 1]] for split, docs in splits.items()}
    write_streams(out, streams, vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(tokens_dir, tokenizer_dir) from ~20 stdlib modules: ~60k train, ~10k validation tokens."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse", "bisect", "calendar", "colorsys", "csv", "difflib", "fractions", "heapq",
             "ipaddress", "keyword", "numbers", "operator", "pprint", "queue", "random", "sched",
             "shlex", "string", "textwrap", "uuid"]
    texts = [(stdlib / f"{n}.py").read_text(encoding="utf-8") for n in names]
    tok = make_tokenizer(texts[:-3], root / "tokenizer")
    docs = [tok.encode(t) for t in texts]
    write_tokens(root / "tokens", {"train": docs[:-3], "validation": docs[-3:]}, len(tok))
    return root / "tokens", root / "tokenizer"


def run_train(settings, corpus, root: Path, name: str = "run", events: list | None = None) -> PretrainMetrics:
    tokens, tokenizer = corpus
    sink = events if events is not None else []
    return train(settings, tokens, tokenizer, root / name / "work", root / name / "out", log=sink.append)


# ---------------------------------------------------------------------------------- model + pieces


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_parameter_estimate_matches_the_built_model(size):
    model = build_model(size, vocab_size=512, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    assert count_parameters(model) == estimate_parameters(MODEL_SIZES[size], 512)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


def test_lr_warms_up_then_decays_to_min():
    s = TINY.model_copy(update=dict(max_steps=100, warmup_steps=10, min_lr_ratio=0.1))
    f = [lr_factor(i, s) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[-1] == pytest.approx(0.1)


def test_batches_are_a_function_of_seed_step_rank_micro():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = train_batch(tokens, TINY, step=3, rank=0, micro=0)
    assert x.shape == y.shape == (TINY.micro_batch, TINY.seq_len)
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(x, train_batch(tokens, TINY, 3, 0, 0)[0])
    assert not torch.equal(x, train_batch(tokens, TINY, 3, 1, 0)[0])
    assert not torch.equal(x, train_batch(tokens, TINY, 4, 0, 0)[0])
    starts = eval_starts(len(tokens), TINY)
    assert len(starts) == TINY.eval_batches * TINY.micro_batch and starts[-1] + TINY.seq_len < len(tokens)


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("change, field", [
    ({"seq_len": 129}, "seq_len"),  # tiny context is 128
    ({"size": "huge"}, "size"),
    ({"precision": "fp16"}, "precision"),
    ({"compile": "yes"}, "compile"),
    ({"micro_batch": 0}, "micro_batch"),
    ({"warmup_steps": 60}, "warmup_steps"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"lr": "0.1"}, "lr"),
    ({"max_step": 10}, "max_step"),  # a typo is an unknown setting, not a silent default
])
def test_bad_settings_fail_naming_the_field(change, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        PretrainSettings.from_dict({**TINY.model_dump(), **change})


@pytest.mark.parametrize("splits, field", [
    ({"train": [], "validation": [[5] * 100]}, "train.bin: empty"),
    ({"train": [[5] * 500], "validation": [[5] * 20]}, "seq_len: validation.bin holds 21 tokens"),
    ({"train": [[5] * 500, [999]], "validation": [[5] * 100]}, "vocab_size: train.bin holds id 999"),
])
def test_bad_token_shards_fail_before_training(corpus, tmp_path, splits, field):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, splits, vocab_size=400)
    with pytest.raises(ValueError, match=field):
        train(TINY, tokens, corpus[1], tmp_path / "work", tmp_path / "out", log=lambda e: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------- training


def test_tiny_model_learns_and_its_output_reloads_and_generates(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    events: list[dict] = []
    final = run_train(TINY, corpus, tmp_path, events=events)
    out = tmp_path / "run" / "out"
    for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "training_config.json", "metrics.jsonl", "loss_curve.png", "final_metrics.json"]:
        assert (out / name).is_file(), name

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert train_rows[-1]["step"] == 60 and train_rows[-1]["tokens_seen"] == 60 * 8 * 64
    # It learns: from ~ln(400) = 6.0 nats at init to below the unigram model's loss (~5.1).
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"] - 0.8
    assert [r["step"] for r in rows if "val_loss" in r] == [30, 60]
    assert final.val_perplexity < final.unigram_perplexity  # already beats the baseline
    assert final.steps == 60 and final.resumed_from_step == 0
    assert final.tokens_seen == 60 * 8 * 64 and final.parameters == final.estimated_parameters
    assert final.memory_bytes == 16 * final.parameters
    assert final.compute_flops == 6 * final.parameters * final.tokens_seen
    assert 0 < final.mfu < 1.5  # against a matmul peak measured in the same process
    assert json.loads((out / "final_metrics.json").read_text()) == asdict(final)
    config = json.loads((out / "training_config.json").read_text())
    assert config["settings"] == TINY.model_dump() and config["data_meta"]["vocab_size"] == 400
    assert events[-1]["event"] == "done"

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(TINY.seed)  # the same init train() started from
    init = build_model("tiny", 400, 0, 1, 2)
    changed = [n for n, p in init.named_parameters()
               if not torch.equal(p, model.get_parameter(n))]
    assert len(changed) == len(list(init.parameters()))  # every tensor moved, norms included
    ids = tokenizer("def ", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_changed_config_does_not_resume(corpus, tmp_path):
    short = TINY.model_copy(update=dict(max_steps=6, warmup_steps=2, checkpoint_every=3, eval_every=3))
    run_train(short, corpus, tmp_path)
    assert latest_checkpoint(tmp_path / "run" / "work").name == "checkpoint-00000006"

    events: list[dict] = []  # same settings: the finished run is picked up, nothing retrains
    again = run_train(short.model_copy(update=dict(log_every=2)), corpus, tmp_path, events=events)
    assert again.resumed_from_step == 6 and any(e["event"] == "resume" for e in events)

    events = []
    fresh = run_train(short.model_copy(update=dict(lr=1e-3)), corpus, tmp_path, events=events)
    assert fresh.resumed_from_step == 0
    assert [e for e in events if e["event"] == "start_over"]
    assert not [e for e in events if e["event"] == "resume"]


def cli(settings: PretrainSettings, corpus, root: Path, tmp_path: Path) -> list[str]:
    path = tmp_path / f"{root.name}.json"
    path.write_text(json.dumps(settings.model_dump()))
    return ["--settings", str(path), "--tokens", str(corpus[0]), "--tokenizer", str(corpus[1]),
            "--work", str(root / "work"), "--out", str(root / "out")]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    return {**env, "PYTHONPATH": str(REPO)}


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_resume_after_kill_matches_an_uninterrupted_run(corpus, tmp_path):
    from safetensors.torch import load_file

    s = TINY.model_copy(update=dict(checkpoint_every=2))
    reference = run_train(s, corpus, tmp_path, name="reference")

    root = tmp_path / "killed"
    cmd = [sys.executable, "-m", "llm_assets.lib.pretrain.pretrain", *cli(s, corpus, root, tmp_path)]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while latest_checkpoint(root / "work") is None and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(root / "work").name.split("-")[1])
    assert 0 < killed_at < 60 and not (root / "out").exists()

    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    events = events_of(done.stdout)
    resumed = next(e for e in events if e["event"] == "resume")
    assert resumed["step"] >= killed_at > 0
    final = events[-1]
    assert final["event"] == "done" and final["steps"] == 60
    assert final["tokens_seen"] == reference.tokens_seen
    assert final["val_loss"] == pytest.approx(reference.val_loss, rel=1e-5)
    ours = load_file(root / "out" / "model.safetensors")
    theirs = load_file(tmp_path / "reference" / "out" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_two_rank_ddp_run_writes_a_loadable_model(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = TINY.model_copy(update=dict(max_steps=12, eval_every=6, checkpoint_every=6, log_every=3))
    root = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llm_assets.lib.pretrain.pretrain", *cli(s, corpus, root, tmp_path)]
    done = subprocess.run(cmd, env={**child_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    final = [e for e in events_of(done.stdout) if e["event"] == "done"]
    assert len(final) == 1  # only rank 0 reports
    assert final[0]["tokens_seen"] == 12 * 2 * 8 * 64  # both ranks' batches count
    config = json.loads((root / "out" / "training_config.json").read_text())
    assert config["world_size"] == 2
    assert latest_checkpoint(root / "work").name == "checkpoint-00000012"
    model = AutoModelForCausalLM.from_pretrained(root / "out")
    ids = AutoTokenizer.from_pretrained(root / "out")("import ", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] > ids.shape[1]


@pytest.mark.slow
def test_a_compiled_run_trains_like_the_eager_one(corpus, tmp_path):
    """compile: on (what auto picks on CUDA) trains the same model as eager, within float noise:
    torch.compile changes how, not what, the step computes."""
    short = TINY.model_copy(update={"max_steps": 6, "warmup_steps": 1, "eval_every": 0, "checkpoint_every": 0,
                                    "precision": "fp32"})
    events: list[dict] = []
    compiled = run_train(short.model_copy(update={"compile": "on"}), corpus, tmp_path, "compiled", events)
    eager = run_train(short.model_copy(update={"compile": "off"}), corpus, tmp_path, "eager")
    assert events[0]["compiled"] is True
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-3)
    assert compiled.train_loss == pytest.approx(eager.train_loss, rel=1e-3)
