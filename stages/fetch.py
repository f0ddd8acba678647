"""fetch: the Magpie dataset's Parquet shards at a pinned hub revision (or local Parquet) -> data/raw/.

Only the Parquet files are downloaded; no `datasets` Arrow copy is made.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
from pathlib import Path

from stages import cli, params
from stages.artifacts import atomic_dir

log = logging.getLogger("stages.fetch")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class FetchError(cli.StageError):
    """The source could not be read or downloaded."""


def is_hub_id(source: str) -> bool:
    """A hub id looks like owner/name and is not an existing or explicitly local path."""
    explicit_path = source.startswith(("/", "./", "../", "~")) or source.endswith((".parquet", ".jsonl", ".json"))
    return not explicit_path and not Path(source).exists() and bool(HUB_ID.match(source))


def local_files(source: Path, key: str = "data.source", suffixes: tuple[str, ...] = (".parquet",)) -> list[Path]:
    """The data files of a local file or directory, in a stable order."""
    if not source.exists():
        raise FetchError(f"fetch: {key} {source} does not exist; point it at a data file, a folder of them, "
                         "or a hub dataset id (owner/name)")
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.suffix in suffixes)
    if not files:
        raise FetchError(f"fetch: no {' or '.join('*' + s for s in suffixes)} files under {key} {source}")
    return files


def copy_local(source: Path, files: list[Path], out: Path) -> None:
    base = source if source.is_dir() else source.parent
    for file in files:
        target = out / file.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)


def download_hub(config: params.DataParams | params.EvalSetParams, out: Path, key: str = "data") -> None:
    """Download the files matching config.files at config.revision; a clear error when the hub is unreachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        snapshot_download(repo_id=config.source, repo_type="dataset", revision=config.revision,
                          allow_patterns=[config.files], local_dir=out)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        raise FetchError(
            f"fetch: could not download the dataset {config.source} at revision {config.revision} from the "
            f"Hugging Face Hub ({type(e).__name__}: {e}). The hub is unreachable from this machine or offline "
            "mode is on. Download the Parquet shards elsewhere (e.g. `hf download "
            f"{config.source} --repo-type dataset --revision {config.revision} --local-dir DIR`), copy DIR "
            f"here and set {key}.source in params.yaml to that local directory; the rest of the pipeline is "
            "unchanged."
        ) from e
    except HfHubHTTPError as e:
        raise FetchError(f"fetch: the hub refused {config.source}@{config.revision}: {e}. Check the id and "
                         "revision in params.yaml, and HF_TOKEN if the dataset is gated.") from e
    shutil.rmtree(out / ".cache", ignore_errors=True)
    if not any(p.is_file() for p in out.rglob("*")):
        raise FetchError(f"fetch: no file of {config.source}@{config.revision} matches {key}.files={config.files!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
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
