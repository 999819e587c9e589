"""The ONNX export with a KV cache run by ONNX Runtime on the trained tiny model: logits within 1e-3
of PyTorch on held-out windows (whole windows, and step by step through the cache), greedy tokens
equal, and the int8 graph smaller with perplexity close to fp32's."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from llm_assets.lib.evaluate import evaluation
from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.release import onnx_export

STDLIB = Path(sysconfig.get_paths()["stdlib"])
HELD_OUT = ("string.py", "glob.py", "fnmatch.py")


@pytest.fixture(scope="module")
def exported(tiny_teacher, tmp_path_factory):
    model_dir = tiny_teacher[0]
    files = onnx_export.export(model_dir, tmp_path_factory.mktemp("onnx"), int8=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    stream = np.array(tok("".join((STDLIB / m).read_text() for m in HELD_OUT))["input_ids"], np.int64)
    windows = evaluation.validation_windows(stream, 64, 8)
    return model_dir, files, {k: onnx_export.OnnxLM(p, threads=1) for k, p in files.items()}, windows


def test_logits_within_1e_3_of_pytorch_on_held_out_windows(exported):
    model_dir, _, lms, windows = exported
    with torch.no_grad():
        reference = load_model(model_dir).eval()(input_ids=windows[:, :-1]).logits.numpy()
    assert np.abs(lms["fp32"].logits(windows[:, :-1].numpy()) - reference).max() < 1e-3


def test_cached_steps_give_the_same_logits_and_greedy_tokens(exported):
    model_dir, _, lms, windows = exported
    lm, ids = lms["fp32"], windows[0, :24].numpy()
    with torch.no_grad():
        reference = load_model(model_dir).eval()(input_ids=torch.from_numpy(ids[None])).logits[0].numpy()
    logits, past = lm._run(ids[None, :16], lm.empty_cache())  # a prompt, then one token at a time
    steps = [logits[0]]
    for t in ids[16:]:
        logits, past = lm._run(np.array([[t]]), past)
        steps.append(logits[0])
    assert past[0].shape[2] == 24
    assert np.abs(np.concatenate(steps) - reference).max() < 1e-3
    prompt, model = ids[:8].tolist(), load_model(model_dir).eval()
    expected = []
    with torch.no_grad():  # plain argmax, whole sequence each step: no cache on the PyTorch side
        for _ in range(8):
            expected.append(int(model(input_ids=torch.tensor([prompt + expected])).logits[0, -1].argmax()))
    assert lm.greedy(prompt, 8) == expected


def test_int8_is_smaller_and_scores_close_to_fp32(exported):
    _, files, lms, windows = exported
    assert files["int8"].stat().st_size < 0.6 * files["fp32"].stat().st_size
    fp32, int8 = lms["fp32"].perplexity(windows.numpy()), lms["int8"].perplexity(windows.numpy())
    assert fp32 * 0.95 < int8 < fp32 * 1.05
