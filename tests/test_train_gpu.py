"""The train stage through Unsloth on a CUDA GPU, with a random-weight model of the real 1.5B shape.

    python .gpu/make_random_model.py /tmp/r1 && R1_RANDOM_MODEL=/tmp/r1 pytest -m gpu
"""

import json
import os

import pytest
import torch

from stages import train as train_stage
from tests import magpie_data, tiny_model
from tests.conftest import train_project, write_splits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif("R1_RANDOM_MODEL" not in os.environ, reason="set R1_RANDOM_MODEL to a model directory"),
]


def test_unsloth_trains_in_4bit_and_its_adapter_loads_back(tmp_path, monkeypatch):
    model_dir = os.environ["R1_RANDOM_MODEL"]
    tiny_model.add_chat_template(model_dir)
    project = train_project(tmp_path, model_dir, monkeypatch, max_seq_length=4096, backend="auto",
                            sequences_per_step=16, max_steps=4, eval_every_steps=2)
    write_splits(project, magpie_data.clean_rows(64), magpie_data.clean_rows(8, start=900))
    train_stage.main([])

    metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 4
    assert 0 < metrics["peak_gpu_memory_gib"] < 8
    adapter = project / "models" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(adapter), max_seq_length=4096, load_in_4bit=True)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    FastLanguageModel.for_inference(model)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs.to("cuda"), max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
