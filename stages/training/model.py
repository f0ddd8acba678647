"""The base model with its LoRA adapter, for training: Unsloth's FastLanguageModel on CUDA or transformers + PEFT
anywhere, and the checks of the model's limits and target modules that run before any weights are read.

Imports torch only; transformers is imported inside functions, so stages/train.py can import Unsloth first.
"""

from __future__ import annotations

import torch

from stages.core import params
from stages.core.base_model import check_tokenizer
from stages.training.choices import TrainError, local_rank


def check_model_limits(model_params: params.ModelParams, target_modules: list[str] | None = None):
    """Fail before loading weights (and before any checkpoint is touched) if the base model cannot take
    max_seq_length tokens or lacks a LoRA target module; the modules are read from a weightless copy.
    Returns the model's config."""
    from stages.core.base_model import local_model_dir

    folder = local_model_dir(model_params, weights=False)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and model_params.max_seq_length > limit:
        raise TrainError(f"model.max_seq_length={model_params.max_seq_length} is above the base model's limit of "
                         f"{limit} positions ({model_params.name}); lower it")
    if target_modules:
        with torch.device("meta"):  # shapes only: no memory, no weights read
            check_target_modules(AutoModelForCausalLM.from_config(config), target_modules)
    return config


def check_target_modules(model, target_modules: list[str]) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(target_modules) - present)
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TrainError(f"train.lora.target_modules: {missing} not found in the base model; "
                         f"its linear layers are {linear}")


def name_base(model, model_params: params.ModelParams) -> None:
    """The adapter names its base as params.yaml does (hub id), not the local snapshot folder it was loaded from."""
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = model_params.name


def load_unsloth(model_params: params.ModelParams, config: params.TrainParams, seed: int, checkpointing: bool):
    from unsloth import FastLanguageModel

    from stages.core.base_model import local_model_dir

    # From the local folder, so model.config._name_or_path is where merged_16bit finds the pinned 16-bit weights.
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(local_model_dir(model_params)), max_seq_length=model_params.max_seq_length, dtype=None,
        load_in_4bit=config.load_in_4bit, use_exact_model_name=True)
    check_tokenizer(tokenizer, model_params.name)
    model.config.use_cache = False  # see load_peft
    model = FastLanguageModel.get_peft_model(
        model, r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules, bias="none", random_state=seed,
        use_gradient_checkpointing="unsloth" if checkpointing else False,
        max_seq_length=model_params.max_seq_length)
    name_base(model, model_params)
    return model, tokenizer


def load_peft(model_params: params.ModelParams, config: params.TrainParams, checkpointing: bool = True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from stages.core.base_model import local_model_dir

    cuda = torch.cuda.is_available()
    extra = {}
    if cuda and config.load_in_4bit:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(
        local_model_dir(model_params), dtype=torch.bfloat16 if cuda else torch.float32,
        use_safetensors=True, trust_remote_code=False, device_map={"": local_rank()} if cuda else None, **extra)
    # With a KV cache in play, transformers skips the packed-sequence mask and attention leaks
    # across the examples of a padding-free batch; training never needs the cache.
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    name_base(model, model_params)
    return model
