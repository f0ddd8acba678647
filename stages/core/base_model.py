"""The base model's files and tokenizer: a local directory, or a hub id at a pinned revision, downloaded
once into the Hugging Face cache (config, tokenizer and chat template files, and weights only as
*.safetensors: never pickled weights, never code). Loaders read that folder, so they never touch the network.

Hub downloads go through stages.core.hub.hub_snapshot: every failure is one line naming the repo and revision.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from stages.core.artifacts import fingerprint
from stages.core.cli import StageError
from stages.core.hub import hub_snapshot, is_hub_id, one_line
from stages.core.params import ModelParams

TOKENIZER_FILES = ["*.json", "*.jinja", "merges.txt", "tokenizer.model"]  # config, tokenizer, chat template
MODEL_FILES = [*TOKENIZER_FILES, "*.safetensors"]


class ModelLoadError(StageError):
    """The base model or its tokenizer could not be loaded."""


def _is_local(name: str) -> bool:
    """model.name is a local folder. A name that can only be a path (not owner/name), or whose first part is a
    folder here (models/r1 with a models/ folder), must exist: a hub lookup would only confuse."""
    path = Path(name).expanduser()
    if path.exists():
        return True
    if not is_hub_id(name) or Path(path.parts[0]).is_dir():
        raise ModelLoadError(f"model.name={name!r} is neither an existing local path nor a valid hub id: no folder "
                             f"{path}; point it at a local model folder that exists, or at a hub id (owner/name) with "
                             "model.revision")
    return False


def model_identity(model: ModelParams) -> dict:
    """What names the base model's weights and tokenizer exactly: the hub id at its pinned commit, or the
    bytes of a local directory (a local model can change in place under the same name)."""
    if _is_local(model.name):
        return {"local_files": fingerprint(Path(model.name).expanduser())}
    return {"hub": model.name, "revision": model.revision}


@functools.cache
def _hub_model_dir(name: str, revision: str, weights: bool) -> Path:
    return hub_snapshot(name, revision, repo_type="model", key="model", error=ModelLoadError,
                        allow_patterns=MODEL_FILES if weights else TOKENIZER_FILES)


def local_model_dir(model: ModelParams, weights: bool = True) -> Path:
    """The folder to load the base model from: model.name when it is a local path, else the snapshot of the
    hub id model.name at model.revision in the Hugging Face cache (downloaded on first use; with weights
    False, only the config, tokenizer and chat template files). Weights are only ever *.safetensors."""
    folder = Path(model.name).expanduser() if _is_local(model.name) else _hub_model_dir(
        model.name, model.revision, weights)
    if weights and not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"model.name={model.name!r}: no *.safetensors weights in {folder}; the base model "
                             "is only loaded from safetensors (never pickled *.bin weights), so use one that has them")
    return folder


def load_tokenizer(model: ModelParams):
    """The base model's tokenizer; it must carry a chat template, since prompts come from it."""
    folder = local_model_dir(model, weights=False)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of model.name={model.name!r} (revision "
                             f"{model.revision}) from {folder}: {one_line(e)}") from e
    check_tokenizer(tokenizer, model.name)
    return tokenizer


def check_tokenizer(tokenizer, name: str) -> None:
    """Prompts come from the base model's own chat template, so the tokenizer must carry one."""
    if not tokenizer.chat_template:
        raise ModelLoadError(f"the tokenizer of {name!r} has no chat_template: prompts are built "
                             "from the base model's own template, so use a chat model's tokenizer")
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"the tokenizer of {name!r} has no eos_token")


class AdapterError(StageError):
    """The LoRA adapter is missing or belongs to another base model."""


def check_adapter(adapter: Path, model_params: ModelParams, stage: str) -> None:
    """The adapter must exist and have been trained on this base model (model.name, as a hub id or as the same
    local folder)."""
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{stage}: no LoRA adapter at {adapter} (missing adapter_config.json); run the train "
                           "stage first (dvc repro train) or dvc pull")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    same = base == model_params.name or (
        Path(str(base)).expanduser().exists() and Path(model_params.name).expanduser().exists()
        and Path(str(base)).expanduser().resolve() == Path(model_params.name).expanduser().resolve())
    if not same:
        raise AdapterError(f"{stage}: the adapter in {adapter} was trained on {base!r}, but model.name is "
                           f"{model_params.name!r}; retrain (dvc repro train) or set model.name back")
