"""lib/posttrain's trainers under torchrun: what lora_checkpoint (sft), reward_model (reward) and
aligned_checkpoint (align) launch when `nproc_per_node` > 1; with 1 they call the same function in
the step's own process.

    torchrun --standalone --nproc_per_node 2 -m llm_assets.workers.posttrain REQUEST

REQUEST is a JSON file `write_request` wrote: the stage and the very arguments the asset passes the
lib function in-process (settings, model dirs, the examples, work and output dirs). Every process
trains its share of each step (transformers' Trainer under DDP: gloo on CPU, nccl on GPU; a step
still holds `batch_size` examples); rank 0 alone writes the output dir, and under Dagster Pipes
forwards progress as log lines. The asset then reads the result back from the files the stage
wrote (`Stage.read_result`), so the artifact is the one an in-process run writes.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from llm_assets.lib.posttrain import align, reward, sft
from llm_assets.lib.posttrain.preferences import PreferencePair


@dataclass(frozen=True)
class Stage:
    """A post-training stage: its settings class, its lib function and the reader of its result."""

    settings: type
    train: Callable
    read_result: Callable[[Path], object]


STAGES = {"sft": Stage(sft.SftSettings, sft.train_sft, sft.read_result),
          "reward": Stage(reward.RewardSettings, reward.train_reward_model, reward.read_result),
          "align": Stage(align.AlignSettings, align.train_align, align.read_result)}


def _plain(value):
    """JSON for what the arguments hold besides JSON types: paths and dataclasses (pairs, OnlineData)."""
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value):
        return asdict(value)
    raise TypeError(f"cannot write a {type(value).__name__} into a post-training request")


def write_request(path: Path, stage: str, settings, **arguments) -> None:
    """The request the worker runs: `stage` (a key of STAGES), its settings and the keyword
    arguments of its lib function (log aside)."""
    if stage not in STAGES:
        raise ValueError(f"stage: must be one of {sorted(STAGES)} (got {stage!r})")
    path.write_text(json.dumps({"stage": stage, "settings": settings.model_dump(), "arguments": arguments},
                               default=_plain))


def _arguments(raw: dict) -> dict:
    """The lib function's keyword arguments back from their JSON: dirs as paths, pairs, OnlineData."""
    out = {}
    for name, value in raw.items():
        if name.endswith("_dir"):
            value = Path(value)
        elif name.endswith("_pairs"):
            value = [PreferencePair(**p) for p in value]
        elif name == "compare":
            value = {model: Path(d) for model, d in value.items()}
        elif name == "sources" and value is not None:
            value = tuple(value)
        elif name == "online" and value is not None:
            value = align.OnlineData(value["train_chats"], value["eval_chats"],
                                     value["reward_model_dir"] and Path(value["reward_model_dir"]))
        out[name] = value
    return out


def read_request(path: Path) -> tuple[Stage, object, dict]:
    """(the stage, its settings, the keyword arguments of its lib function) of a written request."""
    request = json.loads(Path(path).read_text())
    stage = STAGES[request["stage"]]
    return stage, stage.settings(**request["settings"]), _arguments(request["arguments"])


def _train(stage: Stage, settings, arguments: dict) -> None:
    """Run the stage; rank 0 forwards its progress (Pipes log lines, else JSON lines on stdout)."""
    if os.environ.get("RANK", "0") != "0":
        stage.train(settings, **arguments, log=lambda event: None)  # one voice: rank 0
    elif not os.environ.get("DAGSTER_PIPES_CONTEXT"):
        stage.train(settings, **arguments, log=lambda event: print(json.dumps(event), flush=True))
    else:
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            stage.train(settings, **arguments, log=lambda event: pipes.log.info(json.dumps(event)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("request", type=Path, help="the JSON file write_request wrote")
    stage, settings, arguments = read_request(parser.parse_args(argv).request)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        # before the lib runs: its work-dir preparation waits on this group (the Trainer reuses it)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    _train(stage, settings, arguments)
    if distributed:  # on success only: a failed rank exits at once and torchrun stops the others
        dist.barrier()  # no rank tears the group down before rank 0 has written
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
