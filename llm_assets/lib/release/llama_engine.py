r"""The model server's engine over a GGUF export run by llama.cpp (llama-cpp-python): the same
interface as BatchEngine (`submit(request, on_event) -> Sequence`, `Sequence.cancel()`, `close`,
QueueFull past `max_queue`), so the server and its endpoints do not care which one answers.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from llm_assets.lib.posttrain.chat_data import prompt_ids
    >>> from llm_assets.lib.pretrain.model import build_model
    >>> from llm_assets.lib.pretrain.model_dir import save_model
    >>> from llm_assets.lib.release import gguf_export
    >>> from llm_assets.lib.release.batching import GenerationRequest, collect
    >>> from llm_assets.lib.release.llama_engine import LlamaCppEngine, load_gguf
    >>> from llm_assets.lib.tokenizer.tokenizer import train_tokenizer
    >>> tok = train_tokenizer(["Explain f(x). Return x + 1."] * 5, vocab_size=300)
    >>> model_dir, out = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> save_model(build_model("tiny", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok, model_dir)
    >>> files = gguf_export.export(model_dir, out, ["f16"])
    >>> engine = LlamaCppEngine(load_gguf(files["f16"], model_dir, n_ctx=64), tok, max_queue=8)
    >>> asks = [GenerationRequest(prompt_ids(tok, [{"role": "user", "content": f"Explain f{i}(x)."}]), max_new_tokens=5)
    ...         for i in range(3)]
    >>> [(r.finish_reason, len(r.generated) <= 5) for r in collect(engine, asks)]   # one after another
    [('length', True), ('length', True), ('length', True)]
    >>> engine.close()

Requests run one at a time on the engine's thread (llama.cpp's context holds one sequence here;
its own multi-sequence batching is left for when a model is big enough to gain from it): the
prompt is evaluated in one llama.cpp decode, then one decode per generated token.

The next token is chosen exactly as the torch engine chooses it (QueuedEngine.penalized and .pick,
on llama.cpp's logits of the last position): the model directory's generation_config.json
repetition penalty over prompt and reply, its no-repeat n-gram size and min_new_tokens, greedy below
MIN_TEMPERATURE, otherwise temperature, top_p and a draw from the request's seeded generator.
llama.cpp's own sampler has a repetition penalty too (`penalty_repeat`), but over the last
`last_n` accepted tokens only, and no no-repeat n-gram rule; choosing here keeps the two engines'
replies the same for the same logits. Stops are the torch engine's: `<|end|>`, eos, the
generation config's eos ids, a stop string, max_new_tokens; text is decoded by the project's
tokenizer as BatchEngine's Sequence does it (a half UTF-8 character is held back while streaming).
A reply also ends ("length") when the context (`n_ctx`) is full.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from llm_assets.lib.release import gguf_export
from llm_assets.lib.release.batching import QueuedEngine, Sequence

MAKE_GGUF = "llm-assets materialize --select gguf_model"


class GgufModel(NamedTuple):
    """A GGUF file loaded by llama.cpp, with the generation config of the model directory it was made
    from (its penalties and eos ids, as BatchEngine reads them from the torch model)."""

    llm: Any  # llama_cpp.Llama keeping every position's logits
    path: Path
    generation_config: Any  # transformers GenerationConfig


def load_gguf(path: Path, model_dir: Path, n_ctx: int, threads: int = 1) -> GgufModel:
    """llama.cpp over `path`, and `model_dir`'s generation_config.json."""
    from transformers import GenerationConfig

    return GgufModel(gguf_export.load(path, n_ctx, threads), Path(path), GenerationConfig.from_pretrained(model_dir))


def made_from(model_dir: Path) -> set[Path]:
    """The model directory and, for a quantized model, the model it quantized (quantization.json's
    source): a GGUF export of either holds the served weights (llama.cpp's own quantization of them)."""
    model_dir = Path(model_dir).resolve()
    found = {model_dir}
    record = model_dir / "quantization.json"
    if record.is_file():
        found.add(Path(json.loads(record.read_text())["source"]).resolve())
    return found


def served_gguf(model_dir: Path, gguf_dir: Path, gguf_type: str) -> Path:
    """The GGUF file of type `gguf_type` in `gguf_dir` exported from the model in `model_dir`;
    FileNotFoundError / ValueError naming the path and the command that makes it otherwise."""
    path = gguf_export.gguf_path(gguf_dir, gguf_type)
    make = f"make it with `{MAKE_GGUF}` (its config's types must include {gguf_type})"
    if gguf_type not in gguf_export.GGUF_TYPES:
        raise ValueError(f"gguf_type: {gguf_type!r}; choose from {sorted(gguf_export.GGUF_TYPES)}")
    if not path.is_file():
        raise FileNotFoundError(f"--engine llama.cpp: no GGUF export at {path}; {make}")
    source = gguf_export.exported_from(gguf_dir)
    if source not in made_from(model_dir):
        raise ValueError(f"--engine llama.cpp: {path} was exported from {source}, not from the served model "
                         f"{model_dir} (nor the model it was made from); {make}")
    return path


class LlamaCppEngine(QueuedEngine):
    """One request at a time through llama.cpp on a thread of its own; see the module docstring.
    The queue, stops and token choice are QueuedEngine's, the torch engine's: same penalties, order
    and seeded draws, on llama.cpp's logits."""

    kind = "llama.cpp"

    def __init__(self, model: GgufModel, tokenizer, max_queue: int = 64, on_step: Callable[[int], None] | None = None):
        # Sequence keeps its sampling generator on the device: llama.cpp's logits come to the CPU
        super().__init__(tokenizer, model.generation_config, torch.device("cpu"), max_queue, on_step)
        self.model, self.llm = model, model.llm
        self.running: Sequence | None = None
        self._start()

    def _free(self) -> int:
        # an idle engine takes one at once, and so does one whose request has already finished (its
        # client may have the reply and submit again before the engine thread clears `running`)
        busy = self.running is not None and self.running.finish_reason is None
        return 0 if busy else 1

    def _full(self) -> str:
        return "for llama.cpp, which answers one at a time"

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self.closed:
                    self._cond.wait()
                if not self.waiting:
                    return  # closed and nothing left
                self.running = self.waiting.popleft()
            try:
                self._generate(self.running)
            except Exception as e:  # a failure inside llama.cpp fails this request, not the engine
                self.running.fail(e)
            finally:
                with self._cond:
                    self.running = None

    def _generate(self, seq: Sequence) -> None:
        """Evaluate the prompt, then a token at a time until the sequence finishes or is cancelled."""
        llm = self.llm
        if seq.cancelled:  # its client left while it waited
            seq.finish_reason = "cancelled"
            return
        llm.reset()
        llm.eval(seq.request.prompt_ids)
        while not seq.cancelled:
            logits = torch.from_numpy(llm.scores[llm.n_tokens - 1].copy())  # (vocab,) of the last position
            seq.choose(self.penalized([seq], logits[None])[0])
            if seq.finish_reason is not None:
                return
            if llm.n_tokens >= llm.n_ctx():  # no room for the token just chosen
                return seq.finish("length")
            llm.eval([seq.generated[-1]])
            if self.on_step is not None:
                self.on_step(1)
        seq.finish_reason = "cancelled"
