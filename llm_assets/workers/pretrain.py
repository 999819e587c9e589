"""`lib.pretrain` under Dagster Pipes: the command `base_checkpoint` launches (also under torchrun).

    python -m llm_assets.workers.pretrain --settings ... --tokens ... --tokenizer ... --work ... --out ...

Rank 0 alone opens Pipes, forwards progress as log lines and reports the final metrics: a second
reporter would make two materializations of one asset. Other ranks, and runs without Pipes
(no DAGSTER_PIPES_CONTEXT), train exactly as `python -m llm_assets.lib.pretrain.pretrain`.
"""

import json
import os
from dataclasses import asdict

from llm_assets.lib.pretrain.pretrain import parse_args, train


def main(argv: list[str] | None = None) -> None:
    settings, paths = parse_args(argv)
    if not os.environ.get("DAGSTER_PIPES_CONTEXT") or os.environ.get("RANK", "0") != "0":
        train(settings, **paths)
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        final = train(settings, **paths, log=lambda event: pipes.log.info(json.dumps(event)))
        pipes.report_asset_materialization(metadata=asdict(final))  # all numbers: the UI charts them


if __name__ == "__main__":
    main()
