import pytest

from stages import fetch, params
from tests import magpie_data


def test_local_folder_is_copied_with_its_layout(tmp_path):
    source = tmp_path / "src"
    shards = magpie_data.write_shards(source / "data", magpie_data.clean_rows(6), shards=3)
    out = tmp_path / "raw"
    fetch.copy_local(source, fetch.local_files(source), out)
    copied = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    assert copied == sorted(p.relative_to(source) for p in shards)
    assert all((out / p).read_bytes() == (source / p).read_bytes() for p in copied)


def test_missing_source_path_is_a_clear_error(tmp_path):
    with pytest.raises(fetch.FetchError, match="does not exist"):
        fetch.local_files(tmp_path / "nowhere")


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
    config = params.DataParams(source="Magpie-Align/Magpie-Reasoning-V2-250K-CoT-Deepseek-R1-Llama-70B",
                               revision="main", files="data/train-*.parquet")
    with pytest.raises(fetch.FetchError, match=r"unreachable.*set data\.source"):
        fetch.download_hub(config, tmp_path / "raw")


def test_failed_fetch_leaves_previous_output_untouched(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(
        "data: {source: /does/not/exist, revision: main, files: '*.parquet'}\n")
    out = tmp_path / "raw"
    out.mkdir()
    (out / "old.parquet").write_bytes(b"old")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fetch.FetchError):
        fetch.main(["--out", str(out)])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []
    assert (out / "old.parquet").read_bytes() == b"old"
