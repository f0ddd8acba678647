"""Write everything a laptop smoke run needs (no GPU, no hub): Magpie-schema shards with messy rows,
GSM8K / MATH-500 files in their published layouts, and the tiny random model; print the command.

    python -m tests.smoke /tmp/smoke

The command is a `dvc exp run --temp`: the experiment runs in a temporary copy of the repo (it needs
a git commit; uncommitted changes to tracked files go with it, untracked files only with `-C PATH`),
so params.yaml, dvc.lock, metrics and outputs of the checkout stay as they were. `dvc exp show`
lists its results; `dvc exp branch` or `dvc exp apply` keeps it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from tests import eval_data, magpie_data, tiny_model

# Small enough for a CPU in a few minutes, large enough to exercise every stage.
SMOKE_PARAMS = {"model.max_seq_length": 1024, "train.max_steps": 10, "train.eval_every_steps": 5,
                "train.sequences_per_step": 4, "eval.limit": 4, "eval.max_new_tokens": 32}


def write_inputs(root: Path) -> dict[str, object]:
    """The smoke run's data and model under root; returns the param overrides that point at them."""
    magpie_data.write_shards(root / "magpie", [r for r, _ in magpie_data.messy_rows()] + magpie_data.clean_rows(200))
    sets = eval_data.write_all(root / "eval")
    model = tiny_model.build(root / "tiny-r1")
    return {"data.source": root / "magpie", "model.name": model,
            **{f"eval_data.{name}.source": path for name, path in sets.items()}, **SMOKE_PARAMS}


def command(overrides: dict[str, object]) -> str:
    """An experiment in a temporary directory: the checkout, params.yaml included, is left untouched."""
    return "dvc exp run --temp " + " ".join(f"-S {shlex.quote(f'{k}={v}')}" for k, v in overrides.items())


def main(out: str) -> None:
    print(command(write_inputs(Path(out).resolve())))


if __name__ == "__main__":
    main(sys.argv[1])
