"""Shared fixtures: a throwaway project directory with its own DVC repo and local remote."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import load_tiny_config, make_project

# pytest-xdist workers share the cores: each (and every process it starts: CLI runs, the daemon,
# torchrun) gets its share of threads, or the OpenMP pools of two workers spin against each other
# on the same cores (three heavy test files: 90 s with one thread per worker, 100-108 s with two).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a `slow` test first, otherwise in collection order: `make test` hands whole files
    to its workers (pytest-xdist, --dist loadfile), and a long file started last would run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True, scope="session")
def _dvc_env(tmp_path_factory: pytest.TempPathFactory):
    """DVC keeps per-repo state under /var/tmp/dvc/ and reports analytics by default: keep test
    repos' state in the test's temp dir and stay offline."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DVC_SITE_CACHE_DIR", str(tmp_path_factory.mktemp("dvc-site")))
    mp.setenv("DVC_NO_ANALYTICS", "1")
    yield
    mp.undo()


@pytest.fixture
def redis_url():
    """A redis-server of this test's own on a free loopback port (tests/servers.py), stopped after."""
    from servers import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture
def postgres_url():
    """A PostgreSQL 15 cluster of this test's own with an empty database (tests/servers.py), stopped after."""
    from servers import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path)


@pytest.fixture(scope="session")
def project_factory(tmp_path_factory: pytest.TempPathFactory):
    """For module-scoped fixtures that share one (expensive) materialized project."""
    return lambda name: make_project(tmp_path_factory.mktemp(name))


@pytest.fixture
def tiny_run_config() -> dict:
    """configs/tiny.yaml for the data group (raw_corpus, clean_corpus, deduped_shards)."""
    return load_tiny_config(["raw_corpus", "clean_corpus", "deduped_shards"])


@pytest.fixture(scope="session")
def tiny_config():
    """A function returning a fresh copy of configs/tiny.yaml (callers may mutate it)."""
    return load_tiny_config


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved, untrained tiny Llama plus a 512-token tokenizer (trained on a few stdlib modules):
    what a base_checkpoint directory holds, built in about a second for the fine-tuning tests."""
    import sysconfig

    import torch

    from llm_assets.lib.pretrain.model import build_model
    from llm_assets.lib.pretrain.model_dir import save_model
    from llm_assets.lib.tokenizer.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / m).read_text() for m in ("textwrap.py", "csv.py", "shlex.py", "heapq.py", "bisect.py")]
    tok = train_tokenizer(texts, vocab_size=512)
    torch.manual_seed(0)
    model = build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny_base")
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """tiny_base_dir's model trained 80 steps on stdlib text (a few seconds): a teacher whose
    distributions are worth matching, for distillation and pruning. (model dir, (training,
    validation) token streams, (training, validation) chats)."""
    import sysconfig

    import numpy as np
    import torch

    from llm_assets.lib.pretrain.model_dir import load_model, save_model
    from transformers import AutoTokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    train = np.array(tok((stdlib / "textwrap.py").read_text() + (stdlib / "csv.py").read_text())["input_ids"], np.int64)
    valid = np.array(tok((stdlib / "heapq.py").read_text())["input_ids"], np.int64)
    torch.manual_seed(0)
    model = load_model(tiny_base_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(80):
        starts = np.random.default_rng(step).integers(0, len(train) - 65, 8)
        x = torch.from_numpy(np.stack([train[s:s + 64] for s in starts]))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("tiny_teacher")
    save_model(model, tok, out)
    lines = [ln.strip() for ln in (stdlib / "shlex.py").read_text().splitlines() if len(ln.strip()) > 20]
    chats = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}] for a, b in zip(lines[::2], lines[1::2])]
    return out, (train, valid), (chats[:-16], chats[-16:])


@pytest.fixture(scope="session")
def tiny_gguf(tiny_teacher: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny_teacher's model directory with a repetition penalty of 1.3 in its generation_config,
    a gguf_model directory exported from it at f16 with its gguf.json), for the llama.cpp engine."""
    import shutil

    from transformers import GenerationConfig

    from llm_assets.lib.release import gguf_export

    model_dir = tmp_path_factory.mktemp("tiny_penalized")
    shutil.copytree(tiny_teacher[0], model_dir, dirs_exist_ok=True)
    config = GenerationConfig.from_pretrained(model_dir)
    config.repetition_penalty = 1.3  # both engines must apply it
    config.save_pretrained(model_dir)
    gguf_dir = tmp_path_factory.mktemp("gguf_model")
    gguf_export.export(model_dir, gguf_dir, ["f16"], threads=1)
    gguf_export.write_record(gguf_dir, {"source": str(model_dir)})  # what the gguf_model asset records
    return model_dir, gguf_dir
