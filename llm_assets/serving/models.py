"""The model being served: a release's model and tokenizer loaded together (`Served`), and the one
the release pointer names now (`LoadedModel`), swapped when the pointer moves."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, NamedTuple

import torch

from llm_assets.lib.release.release import current_release, pointer_path


class Served(NamedTuple):
    """One loaded release; replaced as a whole, so a request never mixes two releases."""

    model: Any
    tokenizer: Any
    version: str


def load_served(path: Path, version: str, settings: ServeSettings | None = None) -> Served:
    """A release's model and tokenizer, warmed up, ready to answer (the release and a canary alike):
    the PyTorch model, or with `settings.engine` llama.cpp the GGUF export of it (lib/release/llama_engine.py)."""
    from transformers import AutoTokenizer

    from llm_assets.lib.release.quantize import load_for_inference

    if settings is not None and settings.engine == "llama.cpp":
        from llm_assets.lib.release.llama_engine import load_gguf, served_gguf

        gguf = served_gguf(path, settings.gguf_dir, settings.gguf_type)
        # room for the longest prompt and reply the server accepts (llama.cpp warns past the trained context)
        n_ctx = settings.max_prompt_tokens + settings.max_new_tokens_cap
        return Served(load_gguf(gguf, path, n_ctx, settings.llama_threads), AutoTokenizer.from_pretrained(path), version)

    model = load_for_inference(path)
    # One forward before any request: bitsandbytes repacks 4-bit weights for CPU inference
    # in place on the first eval forward, and two requests doing that at once corrupt them.
    with torch.no_grad():
        model.eval()(input_ids=torch.tensor([[0, 1]], device=next(model.parameters()).device))
    return Served(model, AutoTokenizer.from_pretrained(path), version)


class LoadedModel:
    """The model being served and where it came from; swapped when the release pointer moves."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.current: Served | None = None
        self._pointer_stamp = None
        self._lock = threading.Lock()

    def _source(self) -> tuple[Path, str] | None:
        if self.settings.model_dir is not None:
            return Path(self.settings.model_dir), f"dir:{Path(self.settings.model_dir).name}"
        release = current_release(self.settings.releases_dir)
        return (Path(release["path"]), release["version"]) if release else None

    def refresh(self) -> Served | None:
        """Load the current release if it is not the one loaded (a stat per call when unchanged)."""
        pointer = pointer_path(Path(self.settings.releases_dir))
        stamp = pointer.stat().st_mtime_ns if pointer.is_file() else None
        if self.current is not None and (self.settings.model_dir is not None or stamp == self._pointer_stamp):
            return self.current
        with self._lock:
            source = self._source()
            if source is None or (self.current is not None and source[1] == self.current.version):
                self._pointer_stamp = stamp
                return self.current
            self.current = load_served(*source, self.settings)
            self._pointer_stamp = stamp
            return self.current
