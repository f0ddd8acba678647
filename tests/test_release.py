"""The release stage: the adapter's files plus a model card with hub metadata, the data funnel, training, the
verdict, usage and limits; and report then release run end to end on crafted samples."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from huggingface_hub import ModelCard

from stages import release, report
from stages.core.base_model import AdapterError
from stages.scoring import verdict
from tests import test_report, tiny_model
from tests.dvc_stages import stage_args

BASE_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
PEFT_TEMPLATE = "# Model Card for Model ID\n\n<!-- Provide a quick summary of what the model is/does. -->\n"
FUNNEL = {"rows_in": 1000, "rows_out": 410, "dropped": {"null_field": 0, "task_category": 500, "too_long": 90},
          "difficulty": {"easy": 200, "hard": 210}}
SPLITS = {"train": {"rows": 368}, "val": {"rows": 21}, "test": {"rows": 21}}
TRAINING = {"train_loss": 0.61234, "validated": True, "val_loss": {"best": 0.58, "last": 0.59, "evaluations": 4},
            "best_step": 150, "steps": 200, "stopped_early": True, "backend": "unsloth", "base_weights": "4-bit",
            "optimizer": "adamw_8bit"}


RUN = {"tokens_per_second": 34886.2, "peak_gpu_memory_gib": 37.7, "wall_seconds": 3744.0}


def write_adapter(adapter: Path) -> None:
    """What the train stage leaves in models/adapter: PEFT's config, weights and blank README, the tokenizer."""
    tiny_model.build_tokenizer(adapter)  # with the real R1-Distill chat template
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": BASE_MODEL, "peft_type": "LORA", "r": 8, "revision": None}, indent=2))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "README.md").write_text(PEFT_TEMPLATE)


def make_project(project: Path) -> Path:
    """A project after evaluate: hub-like params, the upstream metrics, an adapter and the samples table."""
    test_report.make_project(project, test_report.crafted_samples(problems=20, samples=1))
    write_adapter(project / "models" / "adapter")
    for name, data in (("data", FUNNEL), ("splits", SPLITS), ("train", TRAINING)):
        (project / "metrics").mkdir(exist_ok=True)
        (project / "metrics" / f"{name}.json").write_text(json.dumps(data))
    (project / "reports").mkdir(exist_ok=True)
    (project / "reports" / "train_run.json").write_text(json.dumps(RUN))
    return project


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("release"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(project)
        report.main(stage_args("report"))
        release.main(stage_args("release"))
    return project


def card_of(project: Path) -> ModelCard:
    return ModelCard.load(project / "release" / "README.md")


def test_release_holds_the_adapter_files_and_the_card_instead_of_pefts_template(released):
    adapter, out = released / "models" / "adapter", released / "release"
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in adapter.iterdir())
    for file in adapter.iterdir():
        if file.name not in ("README.md", "adapter_config.json"):
            assert (out / file.name).read_bytes() == file.read_bytes()
    assert "Model Card for Model ID" not in (out / "README.md").read_text()
    config = json.loads((out / "adapter_config.json").read_text())
    revision = yaml.safe_load((released / "params.yaml").read_text())["model"]["revision"]
    assert config == json.loads((adapter / "adapter_config.json").read_text()) | {"revision": revision}


def test_card_metadata_names_base_model_library_datasets_license_and_tags(released):
    data = card_of(released).data.to_dict()
    raw = yaml.safe_load((released / "params.yaml").read_text())
    assert data["base_model"] == raw["model"]["name"] == BASE_MODEL
    assert data["library_name"] == "peft" and data["license"] == "apache-2.0"
    assert data["datasets"] == [raw["data"]["source"], raw["eval_data"]["gsm8k"]["source"],
                                raw["eval_data"]["math500"]["source"]]
    assert data["tags"] == ["lora", "math", "reasoning", "deepseek-r1", "qlora", "unsloth"]


def test_the_card_tags_how_training_ran_not_how_params_asked():
    cpu_run = {"backend": "peft", "base_weights": "float32", "optimizer": "adamw_torch"}  # backend auto on a CPU
    assert release.run_tags(cpu_run) == ["lora", "math", "reasoning", "deepseek-r1"]
    assert release.run_tags(TRAINING)[-2:] == ["qlora", "unsloth"]


def test_card_body_has_the_verdict_funnel_training_usage_and_limits(released):
    text = card_of(released).text
    details = json.loads((released / "reports" / "details.json").read_text())
    for line in verdict.verdict_markdown(details["verdict"]).splitlines():
        assert line in text
    page = (released / "reports" / "verdict.md").read_text()
    assert "| gsm8k | stays accurate | accuracy |" in page and "| gsm8k | stays accurate | accuracy |" in text
    assert "| gsm8k | proper mathematical notation | latex_answer_share |" in text
    for line in verdict.domain_markdown(details["domains"]).splitlines():  # the domain table, as on the page
        assert line in text and line in page
    assert verdict.MANY_COMPARISONS in text
    assert "From 1000 rows of" in text and "| `task_category` | 500 |" in text and "null_field" not in text
    assert "train 368, val 21, test 21" in text
    assert "| `lora.r` | 8 |" in text and "| `val_loss.best` | 0.58 |" in text
    assert "| `wall_seconds` | 3744 |" in text and "| `peak_gpu_memory_gib` | 37.7 |" in text  # how long it ran
    assert 'FastLanguageModel.from_pretrained("release"' in text and "load_in_4bit=True" in text
    assert f'AutoModelForCausalLM.from_pretrained("{BASE_MODEL}", revision="' in text
    assert 'PeftModel.from_pretrained(base, "release")' in text
    # The prompt as training and evaluation render it: the R1 template, the problem, then the directive.
    directive = yaml.safe_load((released / "params.yaml").read_text())["model"]["directive"]
    assert f"<｜User｜>{{problem}}\n{directive}<｜Assistant｜><think>\n" in text
    assert "## Limitations" in text and "random-weight" in text


def test_local_model_and_data_stay_out_of_the_hub_metadata(tmp_path, monkeypatch):
    project = make_project(tmp_path / "project")
    local_model, local_data = tmp_path / "r1", tmp_path / "magpie.parquet"
    local_model.mkdir()
    local_data.write_bytes(b"")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["model"]["name"], raw["data"]["source"] = str(local_model), str(local_data)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    config = json.loads((project / "models" / "adapter" / "adapter_config.json").read_text())
    (project / "models" / "adapter" / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": str(local_model)}))
    monkeypatch.chdir(project)
    report.main(stage_args("report"))
    release.main(stage_args("release"))
    data = card_of(project).data.to_dict()
    assert "base_model" not in data
    assert data["datasets"] == [raw["eval_data"]["gsm8k"]["source"], raw["eval_data"]["math500"]["source"]]
    assert json.loads((project / "release" / "adapter_config.json").read_text())["revision"] is None
    assert f'AutoModelForCausalLM.from_pretrained("{local_model}", dtype=' in card_of(project).text
    (tmp_path / "project" / "models" / "owner").mkdir()
    assert not release.is_hub_id("models/owner") and release.is_hub_id("openai/gsm8k")  # a folder here is no hub id


def test_a_missing_adapter_or_report_is_named(tmp_path, monkeypatch):
    project = make_project(tmp_path)
    monkeypatch.chdir(project)
    with pytest.raises(release.ReleaseError, match=re.escape("reports/details.json not found; run the report stage")):
        release.main(stage_args("release"))
    report.main(stage_args("report"))
    (project / "models" / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="no LoRA adapter at models/adapter"):
        release.main(stage_args("release"))
    assert not (project / "release").exists()


def test_a_measure_without_a_value_reads_null_in_details_and_n_a_on_the_card(tmp_path, monkeypatch):
    project = make_project(tmp_path)
    samples = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    samples.loc[samples["model"] == "finetuned", "correct"] = False  # no correct answer: no tokens per correct one
    samples.loc[samples["model"] == "finetuned", "outcome_efficiency"] = 0.0
    samples.to_parquet(project / "data" / "eval" / "samples.parquet", index=False)
    monkeypatch.chdir(project)
    report.main(stage_args("report"))
    release.main(stage_args("release"))
    details = json.loads((project / "reports" / "details.json").read_text())
    assert details["sets"]["gsm8k"]["measures"]["tokens_per_correct"]["finetuned"] is None
    row = next(line for line in card_of(project).text.splitlines()
               if line.startswith("| gsm8k | more concise | tokens_per_correct |"))
    assert "n/a" in row and row.endswith(f"| {verdict.NOT_MEASURABLE} |")
