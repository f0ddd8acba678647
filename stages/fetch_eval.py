"""fetch_eval: the evaluation sets of eval_data (hub datasets at pinned revisions, or local files) ->
data/eval/sets/{name}.parquet, each with columns id, problem, gold, level, numeric.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from stages.core import cli, params
from stages.core.artifacts import atomic_dir
from stages.core.hub import is_hub_id
from stages.data.eval_sets import READERS, read_files
from stages.data.sources import download_hub, local_files

log = logging.getLogger("stages.fetch_eval")  # not __name__: `python -m` runs a stage as __main__
SUFFIXES = (".parquet", ".jsonl", ".json")


def fetch_set(name: str, config: params.EvalSetParams, workdir: Path) -> list[Path]:
    key = f"eval_data.{name}"
    if is_hub_id(config.source):
        log.info("downloading %s@%s (%s)", config.source, config.revision, config.files)
        download_hub(config, workdir, key=key, stage="fetch_eval")
        return local_files(workdir, key, SUFFIXES)
    return local_files(Path(config.source).expanduser(), f"{key}.source", SUFFIXES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="out: one <set>.parquet per eval_data set")
    args = parser.parse_args(argv)

    sets = params.load("eval_data")
    with atomic_dir(args.out) as out, tempfile.TemporaryDirectory() as downloads:
        for name, config in sets.items():
            files = fetch_set(name, config, Path(downloads) / name)
            table = READERS[config.format](read_files(files), name, config.source)
            pq.write_table(table, out / f"{name}.parquet")
            log.info("%s: %d problems from %s", name, table.num_rows, config.source)


if __name__ == "__main__":
    cli.run(main)
