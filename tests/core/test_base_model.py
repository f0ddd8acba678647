"""Hub access of the base model: every failure of the hub or the network is one line that names the model and
its revision and says what to do, within seconds; a snapshot already in the Hugging Face cache is used when
the hub cannot be reached; only config, tokenizer, chat template and safetensors files are ever fetched."""

import fnmatch
import shutil
import socket
import time

import pytest
import yaml
from huggingface_hub import constants

from stages.core import base_model, params
from stages.core.base_model import ModelLoadError, load_tokenizer, local_model_dir
from stages.generation import batched as generation
from stages.training import model as train_model
from tests import magpie_data
from tests.conftest import ROOT
from tests.hub_stub import closed_port_url, hub_stub, run_stage

REPO, SHA = "tiny-org/tiny-r1", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Online, no token, an empty Hugging Face cache; returns a setter of the hub's endpoint."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    base_model._hub_model_dir.cache_clear()
    yield lambda url: monkeypatch.setattr(constants, "ENDPOINT", url)
    base_model._hub_model_dir.cache_clear()


def model(name: str = REPO, revision: str = SHA) -> params.ModelParams:
    return params.ModelParams(name=name, revision=revision, max_seq_length=1024, directive="")


def load_error(call, *args) -> tuple[str, float]:
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        call(*args)
    return str(error.value), time.perf_counter() - started


def assert_one_line(message: str, *names: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert all(name in message for name in names), message


def test_filter_with_the_hub_unreachable_exits_2_with_one_line(tmp_path):
    """The stage as run, against a closed port, its workers reading meanwhile: no traceback, no retries, the
    model and revision named, nothing written."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["filter"].update(workers=2, decontaminate=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    magpie_data.write_shards(tmp_path / "data" / "raw", magpie_data.clean_rows(8))
    code, output, seconds = run_stage("stages.filter", tmp_path, closed_port_url())
    assert code == 2 and seconds < 15, output
    errors = [line for line in output.splitlines() if " stages: " in line]
    assert len(errors) == 1 and "Traceback" not in output and "Retrying" not in output, output
    assert_one_line(errors[0], raw["model"]["name"], raw["model"]["revision"], "unreachable",
                    "Connection refused", "set model.name in params.yaml")
    assert not (tmp_path / "data" / "filtered.parquet").exists()


@pytest.mark.parametrize(("answer", "says"), [
    ({"status": 401}, "(HTTP 401: stub): HF_TOKEN is missing, invalid or cannot read this repo"),
    ({"status": 401, "error_code": "RepoNotFound"}, "check model.name in params.yaml"),
    ({"status": 404, "error_code": "RepoNotFound"}, "has no model tiny-org/tiny-r1 that this machine may read"),
    ({"status": 404, "error_code": "RevisionNotFound"}, "set model.revision in params.yaml"),
    ({"status": 403, "error_code": "GatedRepo"}, "is gated"),
    ({"status": 503}, "unreachable (HTTP 503"),
], ids=["401", "401-repo", "404-repo", "404-revision", "gated", "503"])
def test_each_refusal_of_the_hub_is_one_line_at_the_first_request(hub, answer, says):
    with hub_stub(**answer) as stub:
        hub(stub.url)
        message, seconds = load_error(local_model_dir, model())
    assert_one_line(message, REPO, SHA, says)
    assert [r for r in stub.requests if "/api/models/" in r] == [f"GET /api/models/{REPO}/revision/{SHA}"]  # no retry
    assert seconds < 5


def test_a_hub_that_does_not_answer_times_out(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)  # as HF_HUB_ETAG_TIMEOUT=1 sets it
    with hub_stub(status=200, delay=3) as stub:
        hub(stub.url)
        load_error(load_tokenizer, model())  # the first call also imports the tokenizer's libraries (4 s once on a
        message, seconds = load_error(load_tokenizer, model())  # busy 2-core machine): the second is timed
    assert_one_line(message, REPO, SHA, "unreachable (ReadTimeout")
    assert seconds < 3


def test_a_name_that_does_not_resolve_is_unreachable(hub, monkeypatch):
    def no_such_name(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)  # DNS fails here, without asking any server
    hub("http://hub.invalid")
    message, seconds = load_error(local_model_dir, model())
    assert_one_line(message, REPO, SHA, "http://hub.invalid is unreachable (ConnectError", "Name or service not known")
    assert seconds < 5


@pytest.mark.parametrize("load", [
    train_model.check_model_limits,
    lambda m: train_model.load_peft(m, params.build(params.TrainParams, params.read(ROOT / "params.yaml")["train"],
                                                 "train")),
    lambda m: generation.load_model(m, None),
], ids=["check_model_limits", "load_peft", "generation.load_model"])
def test_every_loader_fails_in_one_line_when_the_hub_is_unreachable(hub, load):
    hub(closed_port_url())
    load_error(load, model())  # the first call imports the loader's libraries (seconds on a busy machine)
    message, seconds = load_error(load, model())
    assert_one_line(message, REPO, SHA, "unreachable")
    assert seconds < 5


def test_an_invalid_name_is_neither_a_path_nor_a_hub_id(hub):
    hub(closed_port_url())
    message, _ = load_error(local_model_dir, model(name="./no/such/dir"))
    assert_one_line(message, "model.name='./no/such/dir' is neither an existing local path nor a valid hub id")


def cache_snapshot(tiny_model_dir) -> None:
    """The tiny model as the hub id REPO at SHA in the Hugging Face cache, as an earlier download leaves it."""
    folder = f"models--{REPO.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, f"{constants.HF_HUB_CACHE}/{folder}/snapshots/{SHA}")


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_a_cached_snapshot_is_used_without_the_hub(hub, tiny_model_dir, monkeypatch, offline):
    cache_snapshot(tiny_model_dir)
    hub(closed_port_url())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    folder = local_model_dir(model())
    assert folder.name == SHA and (folder / "model.safetensors").is_file()
    assert load_tokenizer(model()).chat_template


def test_the_adapter_names_the_hub_id_not_the_cache_folder(hub, tiny_model_dir, tmp_path, monkeypatch):
    """check_adapter compares the adapter's base with model.name, so loading from the cache must not change it."""
    cache_snapshot(tiny_model_dir)
    hub(closed_port_url())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # PEFT's save looks the base model's config up on the hub otherwise
    config = params.build(params.TrainParams, params.read(ROOT / "params.yaml")["train"], "train")
    peft_model = train_model.load_peft(model(), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert yaml.safe_load((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == REPO
    base_model.check_adapter(tmp_path / "adapter", model(), "evaluate")


def test_weights_are_only_safetensors(tmp_path, tiny_model_dir):
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert any(fnmatch.fnmatch(name, p) for p in base_model.MODEL_FILES), name
    for name in ("pytorch_model.bin", "model.pt", "modeling_qwen.py", "tf_model.h5", "flax_model.msgpack",
                 "model.gguf", "onnx/model.onnx"):
        assert not any(fnmatch.fnmatch(name, p) for p in base_model.MODEL_FILES), name
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    message, _ = load_error(local_model_dir, model(name=str(no_weights)))
    assert_one_line(message, "no *.safetensors weights")
    assert load_tokenizer(model(name=str(no_weights))).chat_template  # the tokenizer needs no weights


def test_a_missing_local_model_folder_is_named_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = params.ModelParams(name=str(tmp_path / "no-model"), revision="main", max_seq_length=1024, directive="")
    with pytest.raises(ModelLoadError, match=r"no folder .*no-model; point it at a local model folder"):
        local_model_dir(missing)
    with pytest.raises(ModelLoadError, match="no folder"):
        base_model.model_identity(missing)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="no folder models/r1"):  # shaped like owner/name, but models/ is here
        local_model_dir(params.ModelParams(name="models/r1", revision="main", max_seq_length=1024, directive=""))
