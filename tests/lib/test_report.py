"""Presentation helpers: markdown tables that stay tables, and plots that are real PNG images."""

import base64
import io
import re

import pytest
from PIL import Image

from llm_assets.lib.common.report import (histogram_markdown, lines_png, loss_curve_png, markdown_table,
                                          png_markdown)

DATA_URI = re.compile(r"^!\[(?P<alt>[^\]]*)\]\(data:image/png;base64,(?P<b64>[A-Za-z0-9+/=]+)\)$")


def decoded(markdown: str) -> tuple[str, Image.Image]:
    m = DATA_URI.match(markdown)
    assert m, markdown[:80]
    return m["alt"], Image.open(io.BytesIO(base64.b64decode(m["b64"])))


def test_markdown_table_rows_cells_and_number_format():
    table = markdown_table(["model", "ppl", "note"], [["base", 41.23456, "a|b"], ["lora", 3, "two\nlines"]])
    lines = table.splitlines()
    assert lines[:2] == ["| model | ppl | note |", "|---|---|---|"]
    assert lines[2] == "| base | 41.23 | a\\|b |"  # 4 significant digits; a pipe cannot split a cell
    assert lines[3] == "| lora | 3 | two lines |"  # ints as they are; a newline cannot end the row
    assert len(lines) == 4


@pytest.mark.parametrize("value, shown", [(0.000123456, "0.0001235"), (1234567.0, "1.235e+06"), (2.5, "2.5")])
def test_floats_keep_four_significant_digits(value, shown):
    assert markdown_table(["x"], [[value]]).splitlines()[2] == f"| {shown} |"


def test_png_markdown_embeds_the_bytes_unchanged():
    png = lines_png({"a": ([0, 1], [1.0, 2.0])}, "t", "x", "y")
    alt, image = decoded(png_markdown(png, "my plot"))
    assert alt == "my plot" and image.format == "PNG"
    assert base64.b64decode(DATA_URI.match(png_markdown(png, "p"))["b64"]) == png


def test_lines_png_is_a_700_by_400_png():
    png = lines_png({"train": ([0, 1, 2], [3.0, 2.5, 2.0]), "eval": (list(range(30)), [1.0] * 30)},
                    "loss", "step", "nats", hlines={"baseline": 2.7})
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size) == ("PNG", (700, 400))


def test_histogram_markdown_is_an_inline_png_titled_by_its_alt_text():
    alt, image = decoded(histogram_markdown([1.0, 2.0, 2.5, 3.0], "prompt length", "chars", bins=3))
    assert alt == "prompt length" and image.format == "PNG" and image.size[0] > 100


def test_loss_curve_png_writes_the_file(tmp_path):
    history = [{"tokens_seen": 100 * i, "train_loss": 5.0 - i / 10} for i in range(10)]
    history += [{"tokens_seen": 500, "val_loss": 4.7}, {"tokens_seen": 900, "val_loss": 4.4}]
    loss_curve_png(history, baseline_loss=4.9, path=tmp_path / "loss_curve.png")
    image = Image.open(tmp_path / "loss_curve.png")
    assert (image.format, image.size) == ("PNG", (700, 400))
