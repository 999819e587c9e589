"""compare: a smaller candidate beside its reference, the figures computed on the same held-out data."""

import pytest

from llm_assets.lib.pretrain.model_dir import load_model
from llm_assets.lib.release.compare import HeldOut, measure, rows, versus
from llm_assets.lib.release.distill import make_student


def test_a_smaller_student_is_measured_beside_its_teacher(tiny_teacher, tmp_path):
    from transformers import AutoTokenizer

    teacher_dir, (_, valid), (_, chats) = tiny_teacher
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    held_out = HeldOut.build(tok, valid, chats, windows=4, prompts=4, max_new_tokens=6, seq_len=64)
    assert held_out.windows.shape == (4, 65) and len(held_out.prompts) == len(held_out.references) == 4
    teacher = load_model(teacher_dir)
    student, _ = make_student(teacher, 1, 0)
    student.save_pretrained(tmp_path)
    t, s = measure(teacher, teacher_dir, tok, held_out), measure(student, tmp_path, tok, held_out)
    assert s.parameters < t.parameters and s.disk_bytes < t.disk_bytes
    v = versus(s, t)
    assert v["size_ratio"] == pytest.approx(s.disk_bytes / t.disk_bytes) and v["size_ratio"] < 1
    assert v["rouge_l_gap"] == pytest.approx(s.rouge_l - t.rouge_l)
    assert v["perplexity_ratio"] == pytest.approx(s.val_perplexity / t.val_perplexity) and s.val_perplexity > 1
    assert [r[0] for r in rows(s, t)][0] == "size on disk (bytes)" and rows(s, t)[3][3] == v["perplexity_ratio"]


def test_no_prompt_that_fits_is_an_error(tiny_teacher):
    from transformers import AutoTokenizer

    teacher_dir, (_, valid), (_, chats) = tiny_teacher
    with pytest.raises(ValueError, match="seq_len"):
        HeldOut.build(AutoTokenizer.from_pretrained(teacher_dir), valid, chats, 2, 2, max_new_tokens=64, seq_len=64)
