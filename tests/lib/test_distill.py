"""Distillation on the tiny model: the student's KL to its teacher falls, it starts from the teacher's
spaced blocks, a narrower student's config is consistent, and it saves a model directory that loads."""

import pytest
import torch

from llm_assets.lib.evaluate.evaluation import perplexity, validation_windows
from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.release.distill import (DistillSettings, distill, kd_loss, make_student, spaced_layers,
                                            student_config)

FAST = dict(epochs=20.0, corpus_windows=24, sft_examples=24, eval_examples=16, max_len=64, batch_size=8, lr=3e-3, warmup_ratio=0,
            eval_every=10, log_every=5, precision="fp32")


def test_kd_loss_is_zero_for_the_teacher_itself_and_ignores_padding():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert kd_loss(teacher, teacher, mask, 2.0).item() == pytest.approx(0, abs=1e-6)
    assert kd_loss(student, teacher, mask, 2.0).item() > 0
    changed = student.clone()
    changed[0, 3:] += 5  # padding positions: no effect
    assert kd_loss(changed, teacher, mask, 2.0).item() == pytest.approx(kd_loss(student, teacher, mask, 2.0).item())


def test_student_shapes_and_initialization(tiny_teacher):
    teacher = load_model(tiny_teacher[0])  # 2 blocks, width 64, 2 heads of 32, FFN 192
    assert spaced_layers(4, 2) == [0, 3] and spaced_layers(2, 1) == [0]
    student, picked = make_student(teacher, 1, 0)
    assert picked == [0] and student.config.num_hidden_layers == 1
    for (name, mine), theirs in zip(student.model.layers[0].state_dict().items(), teacher.model.layers[0].state_dict().values()):
        assert torch.equal(mine, theirs), name
    narrow = student_config(teacher.config, 0, 32)
    assert (narrow.hidden_size, narrow.num_attention_heads, narrow.num_key_value_heads, narrow.head_dim,
            narrow.intermediate_size, narrow.num_hidden_layers) == (32, 1, 1, 32, 96, 2)
    student, picked = make_student(teacher, 0, 32)
    assert picked == [] and student(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, teacher.config.vocab_size)
    with pytest.raises(ValueError, match="student_width"):
        student_config(teacher.config, 1, 48)
    with pytest.raises(ValueError, match="student_layers"):
        student_config(teacher.config, 3, 0)


def test_the_students_kl_to_its_teacher_falls(tiny_teacher, tmp_path):
    teacher_dir, corpus, chats = tiny_teacher
    s = DistillSettings(student_layers=1, max_steps=30, **FAST)
    events = []
    result = distill(s, teacher_dir, corpus, chats, tmp_path / "work", tmp_path, log=events.append)
    m = result.metrics
    assert (m.student_layers, m.teacher_layers, m.steps_run, m.initialized_from_blocks) == (1, 2, 30, "0")
    assert m.held_out_kl_after < 0.8 * m.held_out_kl_before, (m.held_out_kl_before, m.held_out_kl_after)
    assert m.student_parameters < m.teacher_parameters and m.parameter_ratio == pytest.approx(
        m.student_parameters / m.teacher_parameters)
    assert [r["step"] for r in result.history if "eval_loss" in r] == [10, 20, 30]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    student, teacher = load_model(tmp_path), load_model(teacher_dir)  # a model directory from_pretrained loads
    assert student.generation_config.to_diff_dict() == teacher.generation_config.to_diff_dict()
    windows = validation_windows(corpus[1], 64, 8)
    assert perplexity(student, windows) < 3 * perplexity(teacher, windows)  # close to, not equal to, its teacher
