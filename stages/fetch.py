"""fetch: the Magpie dataset's Parquet shards at a pinned hub revision (or local Parquet) -> data/raw/.

Only the Parquet files are downloaded; no `datasets` Arrow copy is made. Every file is read in full before it
is taken, so a truncated or corrupt shard stops this stage, named, and never reaches data/raw.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stages.core import cli, params
from stages.core.artifacts import atomic_dir
from stages.core.hub import is_hub_id
from stages.data.sources import copy_local, download_hub, local_files

log = logging.getLogger("stages.fetch")  # not __name__: `python -m` runs a stage as __main__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="out: the dataset's Parquet shards")
    args = parser.parse_args(argv)

    config = params.load("data")
    with atomic_dir(args.out) as tmp:
        if is_hub_id(config.source):
            log.info("downloading %s@%s (%s)", config.source, config.revision, config.files)
            download_hub(config, tmp)
        else:
            source = Path(config.source).expanduser()
            files = local_files(source)
            log.info("copying %d Parquet file(s) from %s", len(files), source)
            copy_local(source, files, tmp)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    cli.run(main)
