"""Loading the base model's tokenizer (and, later, weights) from a hub id at a pinned revision or a
local directory; safetensors only, never remote code.
"""

from __future__ import annotations

from pathlib import Path

from stages.artifacts import fingerprint
from stages.cli import StageError
from stages.params import ModelParams


class ModelLoadError(StageError):
    """The base model or its tokenizer could not be loaded."""


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def model_identity(model: ModelParams) -> dict:
    """What names the base model's weights and tokenizer exactly: the hub id at its pinned commit, or the
    bytes of a local directory (a local model can change in place under the same name)."""
    if _is_local(model.name):
        return {"local_files": fingerprint(Path(model.name).expanduser())}
    return {"hub": model.name, "revision": model.revision}


def load_tokenizer(model: ModelParams):
    """The base model's tokenizer; it must carry a chat template, since prompts come from it."""
    from transformers import AutoTokenizer

    revision = None if _is_local(model.name) else model.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(Path(model.name).expanduser()) if revision is None else model.name,
            revision=revision, trust_remote_code=False,
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load the tokenizer of model.name={model.name!r} (revision {model.revision}): {e}. "
            "If the Hugging Face Hub is unreachable, download the model elsewhere and set model.name "
            "to its local directory."
        ) from e
    check_tokenizer(tokenizer, model.name)
    return tokenizer


def check_tokenizer(tokenizer, name: str) -> None:
    """Prompts come from the base model's own chat template, so the tokenizer must carry one."""
    if not tokenizer.chat_template:
        raise ModelLoadError(f"the tokenizer of {name!r} has no chat_template: prompts are built "
                             "from the base model's own template, so use a chat model's tokenizer")
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"the tokenizer of {name!r} has no eos_token")
