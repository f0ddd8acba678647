import time

import pytest
import yaml
from huggingface_hub import constants

from stages import fetch
from stages.core import params
from stages.data import sources
from tests import magpie_data
from tests.conftest import ROOT
from tests.hub_stub import closed_port_url, hub_stub, run_stage

MAGPIE = "Magpie-Align/Magpie-Reasoning-V2-250K-CoT-Deepseek-R1-Llama-70B"


def test_local_folder_is_copied_with_its_layout(tmp_path):
    source = tmp_path / "src"
    shards = magpie_data.write_shards(source / "data", magpie_data.clean_rows(6), shards=3)
    out = tmp_path / "raw"
    sources.copy_local(source, sources.local_files(source), out)
    copied = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    assert copied == sorted(p.relative_to(source) for p in shards)
    assert all((out / p).read_bytes() == (source / p).read_bytes() for p in copied)


def test_missing_source_path_is_a_clear_error(tmp_path):
    with pytest.raises(sources.FetchError, match="does not exist"):
        sources.local_files(tmp_path / "nowhere")


@pytest.mark.parametrize(("source", "is_hub"), [
    ("Magpie-Align/Magpie-Reasoning-V2-250K-CoT-Deepseek-R1-Llama-70B", True),
    ("./data/magpie", False), ("/abs/path", False), ("shard.parquet", False), ("just-a-name", False),
])
def test_hub_ids_are_told_from_paths(source, is_hub):
    assert fetch.is_hub_id(source) is is_hub


def test_unreachable_hub_says_how_to_use_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = params.DataParams(source=MAGPIE, revision="main", files="data/train-*.parquet")
    with pytest.raises(sources.FetchError, match=r"HF_HUB_OFFLINE is set.*set data\.source in params\.yaml"):
        sources.download_hub(config, tmp_path / "raw")


def test_failed_fetch_leaves_previous_output_untouched(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(
        "data: {source: /does/not/exist, revision: main, files: '*.parquet'}\n")
    out = tmp_path / "raw"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"old")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(sources.FetchError):
        fetch.main(["--out", str(out)])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []
    assert (out / "old.parquet").read_bytes() == b"old"


@pytest.mark.parametrize("stage", ["fetch", "fetch_eval"])
def test_stage_with_the_hub_unreachable_exits_2_with_one_line(tmp_path, stage):
    """The stage as run, against a closed port, the dataset pinned to a commit SHA: exit code 2, one line naming
    the dataset and revision and what to do, no traceback, no retries."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["revision"] = "0123456789abcdef0123456789abcdef01234567"  # a commit SHA, as pinned for real runs
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    code, output, seconds = run_stage(f"stages.{stage}", tmp_path, closed_port_url())
    assert code == 2 and seconds < 15, output
    errors = [line for line in output.splitlines() if " stages: " in line]
    assert len(errors) == 1 and "Traceback" not in output and "Retrying" not in output, output
    source = raw["data"] if stage == "fetch" else raw["eval_data"]["gsm8k"]
    key = "data" if stage == "fetch" else "eval_data.gsm8k"
    for part in (f"{stage}: cannot download the dataset {source['source']} at revision {source['revision']}",
                 "unreachable (ConnectError", f"set {key}.source in params.yaml"):
        assert part in errors[0], errors[0]


@pytest.mark.parametrize(("answer", "says"), [
    ({"status": 401}, "HF_TOKEN is missing, invalid or cannot read this repo; set it to a token that can, or check "
                      "data.source in params.yaml"),
    ({"status": 404, "error_code": "RepoNotFound"}, "check data.source in params.yaml"),
    ({"status": 404, "error_code": "RevisionNotFound"}, "set data.revision in params.yaml"),
    ({"status": 200, "delay": 3}, "unreachable (ReadTimeout"),
], ids=["401", "404-repo", "404-revision", "timeout"])
def test_each_failure_of_the_hub_is_one_line(tmp_path, monkeypatch, answer, says):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = params.DataParams(source=MAGPIE, revision="0123456789abcdef0123456789abcdef01234567", files="*.parquet")
    started = time.perf_counter()
    with hub_stub(**answer) as stub, pytest.raises(sources.FetchError) as error:
        monkeypatch.setattr(constants, "ENDPOINT", stub.url)
        sources.download_hub(config, tmp_path / "raw")
    message = str(error.value)
    assert "\n" not in message and "fetch: " in message and MAGPIE in message and config.revision in message
    assert says in message, message
    assert time.perf_counter() - started < 3


def truncated(file, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def damaged(file, at: float = 0.3) -> None:
    """64 bytes overwritten inside the data: the footer (Parquet's metadata, at the end) is intact."""
    data = bytearray(file.read_bytes())
    start = int(len(data) * at)
    data[start:start + 64] = b"\xff" * 64
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [truncated, damaged])
def test_a_corrupt_source_shard_is_named_and_not_copied(tmp_path, monkeypatch, corrupt):
    source = tmp_path / "magpie"
    shards = magpie_data.write_shards(source / "data", magpie_data.clean_rows(200), shards=3)
    corrupt(shards[1])
    (tmp_path / "params.yaml").write_text(f"data: {{source: {source}, revision: main, files: '*.parquet'}}\n")
    out = tmp_path / "raw"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"old")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(sources.FetchError) as error:
        fetch.main(["--out", str(out)])
    assert f"fetch: {shards[1]} (under data.source) is not readable Parquet" in str(error.value)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["magpie", "params.yaml", "raw"]
    assert [p.name for p in out.iterdir()] == ["old.parquet"] and (out / "old.parquet").read_bytes() == b"old"


def test_a_corrupt_downloaded_shard_is_named(tmp_path, monkeypatch):
    def download(repo_id, revision, *, local_dir, **kwargs):
        shards = magpie_data.write_shards(local_dir / "data", magpie_data.clean_rows(20), shards=2)
        truncated(shards[0])
        return local_dir

    monkeypatch.setattr(sources, "hub_snapshot", download)
    config = params.DataParams(source=MAGPIE, revision="main", files="data/train-*.parquet")
    with pytest.raises(sources.FetchError, match=rf"fetch: data/train-00000-of-00002\.parquet of the dataset {MAGPIE} "
                                              r"at revision main is not readable Parquet as downloaded"):
        sources.download_hub(config, tmp_path / "raw")


def test_a_whole_file_that_was_cut_is_caught(tmp_path):
    """Truncation takes the footer with it, so reading the metadata finds it; damage inside the data needs
    every page read, which parquet_problem does."""
    shard = magpie_data.write_shards(tmp_path, magpie_data.clean_rows(200), shards=1)[0]
    assert sources.parquet_problem(shard) is None
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(shard.read_bytes()[:-1])
    assert "magic bytes not found in footer" in sources.parquet_problem(cut)
