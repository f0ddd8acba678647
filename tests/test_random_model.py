"""The GPU tests' and benchmarks' stand-in for DeepSeek-R1-Distill-Qwen-1.5B, checked on the CPU at a tiny shape."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from tests import random_model

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 512}


def test_builder_writes_a_loadable_bf16_safetensors_model_of_the_requested_shape_with_the_r1_template(tmp_path):
    out = random_model.build(tmp_path / "r1", device="cpu", **TINY)

    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert not (tmp_path / "r1.partial").exists()
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert isinstance(model, Qwen2ForCausalLM) and model.dtype == torch.bfloat16
    expected = random_model.SHAPE | TINY
    assert model.config.rope_parameters["rope_theta"] == expected.pop("rope_theta")  # transformers 5 moved it there
    for key, value in expected.items():
        assert getattr(model.config, key) == value, key
    assert model.get_input_embeddings().weight.shape == (512, 64)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (model.config.bos_token_id, model.config.eos_token_id)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 512)


def test_builder_replaces_an_earlier_model_but_not_another_folder(tmp_path):
    out = random_model.build(tmp_path / "r1", device="cpu", **TINY)
    random_model.build(out, device="cpu", **TINY | {"num_hidden_layers": 1})
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileExistsError, match="holds no model"):
        random_model.build(tmp_path / "notes", device="cpu", **TINY)


def test_default_shape_has_the_parameter_count_of_deepseek_r1_distill_qwen_1_5b():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(random_model.config())
    assert sum(p.numel() for p in model.parameters()) == 1_777_088_000


def test_unknown_shape_keys_are_rejected():
    with pytest.raises(ValueError, match="hidden_layers"):
        random_model.config(hidden_layers=2)
