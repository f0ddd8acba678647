"""The train stage through Unsloth on a CUDA GPU, with a random-weight model of the real 1.5B shape.

    pytest -m gpu    # R1_RANDOM_MODEL=DIR: use that model (e.g. the real one) instead of building one
"""

import json

import pytest
import torch

from stages import train as train_stage
from tests import magpie_data, random_model
from tests.conftest import train_project, write_splits
from tests.dvc_stages import stage_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture
def model_dir(tmp_path_factory) -> str:
    return str(random_model.for_tests(tmp_path_factory))


def test_unsloth_trains_in_4bit_and_its_adapter_loads_back(model_dir, tmp_path, monkeypatch):
    project = train_project(tmp_path, model_dir, monkeypatch, max_seq_length=4096, backend="auto",
                            sequences_per_step=16, max_steps=4, eval_every_steps=2)
    write_splits(project, magpie_data.clean_rows(64), magpie_data.clean_rows(8, start=900))
    train_stage.main(stage_args("train"))

    metrics = json.loads((project / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 4
    assert 0 < json.loads((project / "reports" / "train_run.json").read_text())["peak_gpu_memory_gib"] < 8
    assert (metrics["backend"], metrics["base_weights"], metrics["optimizer"]) == ("unsloth", "4-bit", "adamw_8bit")
    assert metrics["device"] == torch.cuda.get_device_name()
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


def test_unsloth_merged_16bit_export_loads_without_peft_and_equals_base_plus_adapter(model_dir, tmp_path,
                                                                                       monkeypatch):
    project = train_project(tmp_path, model_dir, monkeypatch, max_seq_length=4096, backend="auto",
                            sequences_per_step=16, max_steps=3, eval_every_steps=3, merge_16bit=True,
                            learning_rate=2.0e-2)  # a large step, so the adapter visibly changes the model
    write_splits(project, magpie_data.clean_rows(32), magpie_data.clean_rows(8, start=900))
    train_stage.main(stage_args("train"))

    merged_dir = project / "models" / "merged"
    assert list(merged_dir.glob("*.safetensors")) and not list(merged_dir.glob("*.bin"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # compared in float32: the merged 16-bit weights then differ from base + adapter only by their rounding
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, use_safetensors=True).cuda()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template
    # Unsloth merges into the original 16-bit weights, not the 4-bit ones it trained on
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).cuda()
    with_adapter = PeftModel.from_pretrained(base, project / "models" / "adapter")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                         tokenize=False) + "I add 2 and 2. Wait, let me check: 4."
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
    with torch.no_grad():
        a = merged(ids).logits.float().flatten()
        b = with_adapter(ids).logits.float().flatten()
        with with_adapter.disable_adapter():
            c = with_adapter(ids).logits.float().flatten()
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b, dim=0) > 0.99
    assert cos(a, b, dim=0) > cos(a, c, dim=0)  # closer to base + adapter than to the base alone


def test_unsloth_retrain_writes_identical_adapter_files(model_dir, tmp_path, monkeypatch, capsys):
    """Identical inputs, each run a new process as under dvc repro; the weights may differ only as far as
    Unsloth's kernels are not deterministic (reported, not asserted), every other file must not."""
    from safetensors.torch import load_file

    from tests.test_train import train_in_new_process

    project = train_project(tmp_path, model_dir, monkeypatch, max_seq_length=4096, backend="unsloth",
                            sequences_per_step=16, max_steps=2, eval_every_steps=2)
    write_splits(project, magpie_data.clean_rows(32), magpie_data.clean_rows(8, start=900))
    weights_file = project / "models" / "adapter" / "adapter_model.safetensors"
    first = train_in_new_process(project, "1")
    weights = load_file(weights_file)
    second = train_in_new_process(project, "2")
    again = load_file(weights_file)
    differing = sorted(name for name in first if first[name] != second.get(name))
    largest = max((weights[k].float() - again[k].float()).abs().max().item() for k in weights)
    with capsys.disabled():
        print(f"\nUNSLOTH RETRAIN: files differing: {differing or 'none'}; largest weight difference {largest:.3g}")
    assert first.keys() == second.keys()
    assert [name for name in differing if name != "adapter_model.safetensors"] == []
