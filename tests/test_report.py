"""The report stage on crafted samples tables: the headline metrics layout, accuracy at every budget,
details, the verdict page and byte-identical figures on a re-run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages import report
from stages.scoring import verdict
from tests.conftest import ROOT
from tests.dvc_stages import stage_args, stage_command

SETS = ("gsm8k", "math500")
MAX_NEW_TOKENS = 4096
# The columns of data/eval/samples.parquet, in evaluate's order.
SAMPLE_COLUMNS = ("model", "set", "problem_id", "sample", "level", "subject", "problem", "gold", "response",
                  "extracted_answer", "correct", "response_tokens", "reasoning_tokens", "answer_tokens",
                  "hit_max_tokens", "closed_think", "finished", "second_guesses", "looped", "outcome_efficiency",
                  "boxed", "latex", "boxed_parses", "latex_answer", "answer_steps", "stepwise")


def sample_row(model: str, set_name: str, problem: int, sample: int = 0, **columns) -> dict:
    """One graded generation: a correct, finished 100-token response with one marker, unless columns say else."""
    row = {"model": model, "set": set_name, "problem_id": f"{set_name}-{problem:03d}", "sample": sample,
           "level": f"level {problem % 3 + 1}", "subject": ("Algebra", "Geometry")[problem % 2],
           "problem": f"What is {problem} + 1?", "gold": str(problem + 1),
           "response": f"<think>\nWait, {problem} + 1 = {problem + 1}.\n</think>\n\n\\boxed{{{problem + 1}}}",
           "extracted_answer": str(problem + 1), "correct": True, "response_tokens": 100, "reasoning_tokens": 90,
           "answer_tokens": 10, "hit_max_tokens": False, "closed_think": True, "finished": True,
           "second_guesses": 1, "looped": False, "outcome_efficiency": 1.0, "boxed": True, "latex": True,
           "boxed_parses": True, "latex_answer": True, "answer_steps": 1, "stepwise": False}
    unknown = set(columns) - set(row)
    assert not unknown, unknown
    return row | columns


def samples_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=list(SAMPLE_COLUMNS))


def crafted_samples(problems: int = 30, samples: int = 2, seed: int = 0) -> pd.DataFrame:
    """Base: long responses with many markers, some cut at the budget; fine-tuned: about half as long, fewer
    markers, every response finished; both right on about 70% of problems."""
    rng = np.random.default_rng(seed)
    rows = []
    for set_name in SETS:
        for problem in range(problems):
            for sample in range(samples):
                for model, scale, markers in (("base", 1.0, 12), ("finetuned", 0.5, 3)):
                    tokens = int(min(MAX_NEW_TOKENS, scale * rng.integers(500, 5000)))
                    cut = tokens == MAX_NEW_TOKENS
                    correct = bool(rng.random() < 0.7) and not cut
                    rows.append(sample_row(
                        model, set_name, problem, sample, correct=correct, response_tokens=tokens,
                        reasoning_tokens=tokens - 50, answer_tokens=50, hit_max_tokens=cut, finished=not cut,
                        closed_think=not cut, second_guesses=int(rng.poisson(markers)),
                        looped=bool(cut and rng.random() < 0.5), outcome_efficiency=0.6 if correct else 0.0,
                        # fine-tuned: boxed and laid out in steps far more often
                        boxed=not cut and rng.random() < (0.95 if scale < 1 else 0.6),
                        stepwise=not cut and rng.random() < (0.8 if scale < 1 else 0.2)))
    return samples_frame(rows)


def make_project(project: Path, samples: pd.DataFrame) -> Path:
    """A working folder with params.yaml (eval.max_new_tokens = MAX_NEW_TOKENS) and the samples table."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["eval"]["max_new_tokens"] = MAX_NEW_TOKENS
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (project / "data" / "eval").mkdir(parents=True)
    samples.to_parquet(project / "data" / "eval" / "samples.parquet", index=False)
    curves = project / "metrics" / "train" / "plots" / "metrics"  # dvclive's per-step TSVs
    (curves / "eval").mkdir(parents=True)
    (curves / "loss.tsv").write_text("step\tloss\n1\t2.5\n2\t2.1\n3\t1.9\n4\t1.8\n")
    (curves / "eval" / "loss.tsv").write_text("step\tloss\n2\t2.2\n4\t2.0\n")
    (curves / "learning_rate.tsv").write_text("step\tlearning_rate\n1\t0.0\n2\t0.0002\n3\t0.0001\n4\t0.0\n")
    return project


def run_report(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    report.main(stage_args("report"))


def outputs(project: Path) -> dict[str, bytes]:
    folders = ("metrics/eval", "metrics/eval_budget", "reports")
    return {str(f.relative_to(project)): f.read_bytes() for folder in folders
            for f in sorted((project / folder).rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("report"), crafted_samples())
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_report(project, monkeypatch)
    return project


def test_headline_is_one_small_file_per_set_and_measure(reported):
    headline = reported / "metrics" / "eval"
    files = sorted(str(f.relative_to(headline)) for f in headline.rglob("*.json"))
    assert files == sorted(f"{s}/{name}.json" for s in SETS for name in report.HEADLINE)
    samples = pd.read_parquet(reported / "data" / "eval" / "samples.parquet")
    for set_name in SETS:
        rows = samples[samples["set"] == set_name]
        for name, (measure, decimals) in report.HEADLINE.items():
            values = json.loads((reported / "metrics" / "eval" / set_name / f"{name}.json").read_text())
            assert list(values) == ["base", "delta", "finetuned", "high", "low"]
            for model in ("base", "finetuned"):
                expected = verdict.measure_values(rows[rows["model"] == model])[measure]
                assert values[model] == round(expected, decimals)
            assert values["low"] <= values["delta"] <= values["high"]
    tokens = json.loads((reported / "metrics" / "eval" / "gsm8k" / "tokens.json").read_text())
    assert tokens["high"] < 0  # fine-tuned writes about half as much


def test_budget_plot_data_is_one_tsv_per_set_ending_at_the_headline_accuracy(reported):
    for set_name in SETS:
        table = pd.read_csv(reported / "metrics" / "eval_budget" / f"{set_name}.tsv", sep="\t")
        assert list(table.columns) == ["budget", "base", "finetuned"]
        assert table["budget"].tolist() == [1024, 2048, 4096]
        assert (table[["base", "finetuned"]].diff().dropna() >= 0).all().all()  # more budget never loses answers
        accuracy = json.loads((reported / "metrics" / "eval" / set_name / "accuracy.json").read_text())
        assert table.iloc[-1]["base"] == pytest.approx(accuracy["base"], abs=1e-4)
        assert table.iloc[-1]["finetuned"] == pytest.approx(accuracy["finetuned"], abs=1e-4)


def test_details_hold_every_measure_levels_percentiles_budget_and_verdict(reported):
    details = json.loads((reported / "reports" / "details.json").read_text())
    assert set(details["sets"]) == set(SETS)
    math500 = details["sets"]["math500"]
    assert math500["problems"] == 30 and math500["responses"] == {"base": 60, "finetuned": 60}
    assert set(math500["measures"]) == {m.name for m in verdict.MEASURES}
    accuracy = math500["measures"]["accuracy"]
    assert {"base", "finetuned", "delta", "low", "high", "verdict", "base_low", "finetuned_high"} <= set(accuracy)
    assert set(math500["accuracy_by_level"]["base"]) == {"level 1", "level 2", "level 3"}
    percentiles = math500["response_tokens"]["finetuned"]
    assert list(percentiles) == ["p50", "p90", "p99"] and percentiles["p50"] <= percentiles["p90"] <= percentiles["p99"]
    assert [row["budget"] for row in math500["budget"]] == [1024, 2048, 4096]
    assert all(row["low"] <= row["finetuned"] - row["base"] <= row["high"] for row in math500["budget"])
    assert len(details["verdict"]) == len(SETS) * len(verdict.CLAIMS)
    assert details["bootstrap"]["seed"] == yaml.safe_load((reported / "params.yaml").read_text())["seed"]


def test_the_page_describes_the_measures_its_tables_show_and_names_the_rest(reported):
    page = (reported / "reports" / "verdict.md").read_text()
    described = page.split("## Measures")[1].split("## Figures")[0]
    assert "- `accuracy`: " in described and "- `stepwise_share`: " in described
    assert "- `outcome_efficiency`" not in described  # no claim's measure: not in the tables
    also = next(line for line in described.splitlines() if line.startswith("Also in `reports/details.json`: "))
    assert "`outcome_efficiency`" in also and "`hit_max_tokens_share`" in also and "`accuracy`" not in also


def test_verdict_page_has_each_sets_table_and_shows_every_figure(reported):
    page = (reported / "reports" / "verdict.md").read_text()
    details = json.loads((reported / "reports" / "details.json").read_text())
    for set_name in SETS:
        table = verdict.verdict_markdown([r for r in details["verdict"] if r["set"] == set_name])
        assert f"## {set_name}" in page and table.splitlines()[2].split("|")[1:4] == [
            f" {set_name} ", " more concise ", " response_tokens_mean "]
    figures = sorted((reported / "reports" / "figures").iterdir())
    assert [f.name for f in figures] == ["accuracy_by_budget.png", "accuracy_by_domain.png", "response_tokens.png",
                                         "second_guesses_per_1k.png", "training.png"]
    for figure in figures:
        assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert f"](figures/{figure.name})" in page
        assert b"Software" not in figure.read_bytes()  # no matplotlib version stamp


def test_an_identical_rerun_in_a_new_process_writes_identical_bytes(reported, tmp_path):
    project = make_project(tmp_path / "again", pd.read_parquet(reported / "data" / "eval" / "samples.parquet"))
    subprocess.run(stage_command("report"), cwd=project, check=True, capture_output=True)
    assert outputs(project) == outputs(reported)


def test_an_unfinished_evaluation_is_named(tmp_path, monkeypatch):
    project = make_project(tmp_path, crafted_samples(problems=3, samples=1))
    (project / "data" / "eval" / "samples.parquet").unlink()
    with pytest.raises(report.ReportError, match=r"data/eval/samples.parquet not found; run the evaluate stage"):
        run_report(project, monkeypatch)
    samples_frame([sample_row("base", "gsm8k", 0)]).drop(columns="finished").to_parquet(
        project / "data" / "eval" / "samples.parquet")
    with pytest.raises(report.ReportError, match=r"no column\(s\) \['finished'\]"):
        run_report(project, monkeypatch)


def test_a_budget_below_the_generated_lengths_is_rejected(tmp_path, monkeypatch):
    project = make_project(tmp_path, samples_frame([sample_row(m, "gsm8k", 0, response_tokens=MAX_NEW_TOKENS + 1)
                                                    for m in ("base", "finetuned")]))
    with pytest.raises(verdict.VerdictError, match=f"max_new_tokens {MAX_NEW_TOKENS}"):
        run_report(project, monkeypatch)


def test_dvc_shows_the_headline_one_row_per_set_and_measure_and_renders_the_plots(reported, tmp_path):
    project = tmp_path / "dvc"
    for folder in ("metrics/eval", "metrics/eval_budget", "reports"):
        shutil.copytree(reported / folder, project / folder)
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=project, check=True, env=env)

    def dvc(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                              text=True, check=True).stdout

    table = dvc("metrics", "show", "--md", "metrics/eval").splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == ["Path", "base", "delta", "finetuned", "high", "low"]
    assert sorted(line.split("|")[1].strip() for line in table[2:] if line) == sorted(
        f"metrics/eval/{s}/{name}.json" for s in SETS for name in report.HEADLINE)
    assert max(map(len, table)) <= 100  # fits a screen
    plots = json.loads(dvc("plots", "show", "--json"))
    assert not plots.get("errors"), plots.get("errors")
    assert {f"reports/figures/{name}" for name in ("accuracy_by_budget.png", "response_tokens.png",
                                                   "second_guesses_per_1k.png", "training.png")} <= set(plots["data"])
    dvc("plots", "show", "-o", "page")  # the HTML a user opens: it must work offline
    page = (project / "page" / "index.html").read_text()
    assert "<img" in page and not re.search(r"(https?:)?//[a-z]", page), re.findall(r"(?:https?:)?//\S+", page)


def test_dvc_yaml_wires_report_and_release_after_evaluate():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = pipeline["stages"]
    evaluate = stages["evaluate"]
    assert [list(m) for m in evaluate["metrics"]] == [["metrics/eval_sets.json"]]
    assert "metrics/eval_plot" not in str(evaluate["outs"]) and "metrics/eval.json" not in evaluate["cmd"]
    assert "data/eval/samples.parquet" in stages["report"]["deps"]
    assert "reports/details.json" in stages["release"]["deps"]
    for name in ("report", "release"):
        deps = set(stages[name]["deps"])
        assert {f"stages/{name}.py", "stages/scoring/verdict.py", "stages/core/params.py", "stages/core/artifacts.py",
                "stages/core/cli.py"} <= deps
        assert all((ROOT / d).is_file() for d in deps if d.endswith(".py"))
    plot_ids = {next(iter(p)) if isinstance(p, dict) else p for p in pipeline["plots"]}
    assert plot_ids == {"reports/figures"}  # PNGs only: a Vega plot's page would load its libraries from a CDN
    assert "metrics/train/plots/metrics" in stages["report"]["deps"]
