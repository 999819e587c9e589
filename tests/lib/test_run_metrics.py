import math

import numpy as np
import pytest
import torch

from llm_assets.lib.pretrain.pretrain import PretrainSettings
from llm_assets.lib.pretrain.run_metrics import ProgressWindow, run_metrics, unigram_perplexity


def test_unigram_perplexity_is_the_add_one_model_of_the_train_split():
    train = np.array([0, 0, 0, 1], dtype=np.uint16)
    expected = math.exp(-(math.log(4 / 6) + math.log(2 / 6)) / 2)
    assert unigram_perplexity(train, np.array([0, 1]), vocab_size=2) == pytest.approx(expected)
    # a token never seen in train still gets probability 1 / (n + V), not zero
    assert unigram_perplexity(train, np.array([2]), vocab_size=3) == pytest.approx(7.0)


def test_progress_window_averages_the_steps_since_the_last_row():
    window = ProgressWindow(torch.device("cpu"))
    window.loss += 3.0
    window.loss += 5.0
    window.steps = 2
    row = window.row(step=2, lr=0.1, tokens_seen=64, tokens_per_step=32, world=1)
    assert row["train_loss"] == pytest.approx(4.0) and row["step"] == 2 and row["tokens_per_second"] > 0
    assert window.steps == 0 and window.loss.item() == 0.0  # the next window starts empty


def test_run_metrics_reads_the_last_rows_and_a_finished_run_reports_its_last_rate():
    history = [{"step": 1, "train_loss": 5.0, "tokens_per_second": 100.0}, {"step": 1, "val_loss": 4.0},
               {"step": 2, "train_loss": 3.0, "tokens_per_second": 200.0}, {"step": 2, "val_loss": 2.0}]
    s = PretrainSettings(size="tiny", max_steps=2)
    m = run_metrics(history, s, tokens_seen=128, trained=128, loop_seconds=2.0, parameters=10, start_step=0)
    assert (m.train_loss, m.val_loss, m.val_perplexity, m.tokens_per_second) == (3.0, 2.0, math.exp(2.0), 64.0)
    again = run_metrics(history, s, tokens_seen=128, trained=0, loop_seconds=0.1, parameters=10, start_step=2)
    assert again.tokens_per_second == 200.0 and again.resumed_from_step == 2
