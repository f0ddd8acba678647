"""report: the verdict from evaluate's graded generations (data/eval/samples.parquet) -> the headline metrics,
accuracy at every budget, reports/details.json, reports/verdict.md and its figures.

Statistics only, no model: a change here re-runs this stage, never generation.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import cli, params
from stages.core.artifacts import atomic_dir, atomic_file, write_json
from stages.core.params import BASE, FINETUNED, MODELS
from stages.scoring import verdict
from stages.scoring.verdict import CONFIDENCE, MEASURE_BY_NAME, RESAMPLES

log = logging.getLogger("stages.report")  # not __name__: `python -m` runs a stage as __main__
# The headline of `dvc metrics show`: file name -> (measure, decimals kept). One file per set and measure, so
# the table is one row per (set, measure) with five columns (base, delta, finetuned, high, low) and fits a screen.
HEADLINE = {"accuracy": ("accuracy", 4), "tokens": ("response_tokens_mean", 1),
            "markers_per_1k": ("second_guesses_per_1k_reasoning_tokens", 3), "finished": ("finished_share", 4),
            "latex": ("latex_answer_share", 4), "steps": ("stepwise_share", 4)}
PERCENTILES = (50, 90, 99)
COLUMNS = ("model", "set", "problem_id", "sample", "level", "subject", "correct", "response_tokens", "reasoning_tokens",
           "hit_max_tokens", "finished", "second_guesses", "looped", "outcome_efficiency", "answer_tokens", "boxed",
           "boxed_parses", "latex_answer", "stepwise")
COLORS = {BASE: "tab:gray", FINETUNED: "tab:blue"}
LABELS = {BASE: "base", FINETUNED: "fine-tuned"}
PNG = {"format": "png", "dpi": 100, "metadata": {"Software": None}}  # no version stamp: same input, same bytes


class ReportError(cli.StageError):
    """The samples table cannot be reported on."""


def read_samples(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ReportError(f"report: {path} not found; run the evaluate stage first (dvc repro evaluate) or dvc pull")
    samples = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in samples.columns]
    if missing:
        raise ReportError(f"report: {path} has no column(s) {missing}; re-run evaluate with the current code")
    if samples.empty:
        raise ReportError(f"report: {path} holds no generations; check eval.sets and eval.limit")
    return samples


def headline(deltas: pd.DataFrame) -> dict[str, dict[str, dict]]:
    """set -> file name -> {base, finetuned, delta, low, high}: the few numbers dvc metrics show."""
    by_measure = deltas.set_index(["set", "measure"])
    return {set_name: {name: {k: round(float(by_measure.loc[(set_name, measure), k]), decimals)
                              for k in ("base", "finetuned", "delta", "low", "high")}
                       for name, (measure, decimals) in HEADLINE.items()}
            for set_name in sorted(deltas["set"].unique())}


def budget_table(curve: pd.DataFrame, set_name: str) -> pd.DataFrame:
    """Accuracy at every budget on one set: budget, base, finetuned."""
    rows = curve[curve["set"] == set_name]
    return rows.pivot(index="budget", columns="model", values="accuracy")[list(MODELS)].reset_index()


def details(samples: pd.DataFrame, deltas: pd.DataFrame, budget: pd.DataFrame, max_new_tokens: int,
            seed: int) -> dict:
    """Everything behind the verdict, per set: every measure with its intervals, accuracy by level,
    response-token percentiles, the budget curve; and the verdict rows."""
    sets = {}
    for set_name, rows in samples.groupby("set", sort=True):
        measures = deltas[deltas["set"] == set_name].set_index("measure")
        by_model = dict(tuple(rows.groupby("model")))
        sets[set_name] = {
            "problems": int(rows["problem_id"].nunique()),
            "samples": int(rows["sample"].nunique()),
            "responses": {m: len(by_model[m]) for m in MODELS},
            "pass_at_k": verdict.passes_at_k(rows),
            "measures": {name: {k: v for k, v in row.items() if k != "set"}
                         for name, row in measures.to_dict("index").items()},
            "accuracy_by_level": {m: {str(level): float(value) for level, value
                                      in by_model[m].groupby("level", dropna=False)["correct"].mean().items()}
                                  for m in MODELS},
            "response_tokens": {m: {f"p{p}": float(np.percentile(by_model[m]["response_tokens"], p))
                                    for p in PERCENTILES} for m in MODELS},
            "budget": budget[budget["set"] == set_name].drop(columns="set").to_dict("records"),
        }
    return {"sets": sets, "verdict": verdict.verdict_rows(deltas),
            "bootstrap": {"resamples": RESAMPLES, "confidence": CONFIDENCE, "seed": seed,
                          "over": "problems, base and fine-tuned samples of a problem together"},
            "max_new_tokens": max_new_tokens}


def _figure(columns: int, width: float = 4.5, height: float = 3.5):
    from matplotlib.figure import Figure  # no pyplot: no global state or GUI backend; Agg renders the PNG

    figure = Figure(figsize=(width * columns, height), layout="constrained")
    return figure, np.atleast_1d(figure.subplots(1, columns, squeeze=False)[0])


def accuracy_by_budget_figure(curve: pd.DataFrame, set_names: list[str]):
    figure, axes = _figure(len(set_names))
    for ax, set_name in zip(axes, set_names, strict=True):
        table = budget_table(curve, set_name)
        for model in MODELS:
            ax.plot(table["budget"], table[model], marker="o", color=COLORS[model], label=LABELS[model])
        ax.set_xscale("log", base=2)
        ax.set_xticks(table["budget"], [f"{b // 1024}k" if b % 1024 == 0 else str(b) for b in table["budget"]])
        ax.minorticks_off()
        ax.set(title=set_name, xlabel="token budget", ylabel="accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    return figure


def response_tokens_figure(samples: pd.DataFrame, set_names: list[str], max_new_tokens: int):
    figure, axes = _figure(len(set_names))
    bins = np.linspace(0, max_new_tokens, 41)
    for ax, set_name in zip(axes, set_names, strict=True):
        rows = samples[samples["set"] == set_name]
        for model in MODELS:
            tokens = rows.loc[rows["model"] == model, "response_tokens"]
            ax.hist(tokens, bins=bins, histtype="step", linewidth=1.5, color=COLORS[model],
                    label=f"{LABELS[model]} (median {np.median(tokens):.0f})")
        ax.set(title=set_name, xlabel=f"response tokens (budget {max_new_tokens})", ylabel="responses")
        ax.legend(loc="upper right")
    return figure


def markers_figure(deltas: pd.DataFrame, set_names: list[str]):
    """Markers per 1k reasoning tokens per set and model, with each model's bootstrap interval."""
    figure, (ax,) = _figure(1, width=max(4.5, 1.6 * len(set_names)))
    rows = deltas[deltas["measure"] == "second_guesses_per_1k_reasoning_tokens"].set_index("set")
    x = np.arange(len(set_names))
    for offset, model in ((-0.12, BASE), (0.12, FINETUNED)):
        value = rows.loc[set_names, model].to_numpy()
        low, high = rows.loc[set_names, f"{model}_low"].to_numpy(), rows.loc[set_names, f"{model}_high"].to_numpy()
        ax.errorbar(x + offset, value, yerr=[value - low, high - value], fmt="o", capsize=4, color=COLORS[model],
                    label=LABELS[model])
    ax.set_xticks(x, set_names)
    ax.set(title=f"second-guess markers ({CONFIDENCE:.0%} intervals)", ylabel="markers per 1k reasoning tokens",
           xlim=(-0.5, len(set_names) - 0.5))
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return figure


def training_figure(curves: Path) -> dict:
    """training.png (bytes): train and validation loss and the learning rate per optimizer step, from dvclive's TSVs
    (train's metrics/train/plots/metrics); none when training left no loss curve there. A PNG, readable without
    a network."""
    panels = {"loss": {"train": curves / "loss.tsv", "validation": curves / "eval" / "loss.tsv"},
              "learning_rate": {"learning rate": curves / "learning_rate.tsv"}}
    if not panels["loss"]["train"].is_file():
        log.info("no training curves in %s: training.png not drawn", curves)
        return {}
    figure, axes = _figure(2)
    for ax, (measure, files) in zip(axes, panels.items(), strict=True):
        for label, file in files.items():
            if file.is_file():
                table = pd.read_csv(file, sep="\t")
                ax.plot(table["step"], table[measure], marker="o" if len(table) < 30 else None, label=label)
        ax.set(title=measure.replace("_", " "), xlabel="optimizer step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        ax.legend()
    return png_bytes({"training.png": figure})


def figures(samples: pd.DataFrame, deltas: pd.DataFrame, curve: pd.DataFrame, max_new_tokens: int) -> dict:
    """File name -> PNG bytes."""
    set_names = sorted(samples["set"].unique())
    made = {"accuracy_by_budget.png": accuracy_by_budget_figure(curve, set_names),
            "response_tokens.png": response_tokens_figure(samples, set_names, max_new_tokens),
            "second_guesses_per_1k.png": markers_figure(deltas, set_names)}
    return png_bytes(made)


def png_bytes(made: dict) -> dict:
    """File name -> PNG bytes of each figure."""
    images = {}
    for name, figure in made.items():
        buffer = io.BytesIO()
        figure.savefig(buffer, **PNG)
        images[name] = buffer.getvalue()
    return images


def domain_figures(domains: pd.DataFrame) -> dict:
    """accuracy_by_domain.png (bytes): each group's accuracy delta with its interval, a panel per set and
    grouping; none when no set has groups."""
    accuracy = domains[domains["measure"] == "accuracy"]
    panels = list(accuracy.groupby(["set", "by"], sort=True))
    if not panels:
        return {}
    figure, axes = _figure(len(panels), width=4.5, height=max(2.5, 0.35 * max(len(p) for _, p in panels) + 1))
    for ax, ((set_name, by), rows) in zip(axes, panels, strict=True):
        y = np.arange(len(rows))
        ax.errorbar(rows["delta"], y, xerr=[rows["delta"] - rows["low"], rows["high"] - rows["delta"]], fmt="o",
                    capsize=3, color=COLORS[FINETUNED])
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, rows["group"])
        ax.set(title=f"{set_name} by {by}", xlabel=f"accuracy delta ({CONFIDENCE:.0%} interval)")
    return png_bytes({"accuracy_by_domain.png": figure})


def verdict_page(report: dict, figure_names: list[str], figures_dir: str) -> str:
    """reports/verdict.md: per set the verdict table and accuracy at every budget; then the figures."""
    boot = report["bootstrap"]
    lines = ["# Verdict: fine-tuned vs base", "",
             f"Each delta is fine-tuned minus base with a paired {boot['confidence']:.0%} bootstrap interval over "
             f"problems ({boot['resamples']} resamples, seed {boot['seed']}); a claim is *better* or *worse* only "
             f"when the interval excludes 0; *detectable* is the smallest true delta it would tell from 0 about 80% "
             f"of the time. Budget: {report['max_new_tokens']} new tokens per response.", "",
             "## Summary", "", *verdict.summary_lines(report["verdict"]), "",
             *[verdict.detectable_line(name, result) + "\n" for name, result in report["sets"].items()]]
    for set_name, result in report["sets"].items():
        responses, passes = result["responses"], result["pass_at_k"]
        lines += [f"## {set_name}", "",
                  f"{result['problems']} problems x {result['samples']} sample(s); {responses[BASE]} base and "
                  f"{responses[FINETUNED]} fine-tuned responses."
                  + (f" pass@{passes['k']}: base {passes[BASE]:.3f}, fine-tuned {passes[FINETUNED]:.3f}." if passes
                     else ""), "",
                  *[f"{note}\n" for note in verdict.set_notes(result, report["max_new_tokens"])],
                  verdict.verdict_markdown([r for r in report["verdict"] if r["set"] == set_name]),
                  verdict.budget_markdown(result["budget"])]
    if report["domains"]:
        lines += ["## By domain", "", verdict.MANY_COMPARISONS, "", verdict.domain_markdown(report["domains"])]
    shown = list(dict.fromkeys(row["measure"] for row in report["verdict"]))  # the tables' measures, in order
    lines += ["## Measures", ""]
    lines += [f"- `{name}`: {MEASURE_BY_NAME[name].meaning}" for name in shown]
    lines += ["", f"Also in `reports/details.json`: {', '.join(f'`{n}`' for n in MEASURE_BY_NAME if n not in shown)}."]
    lines += ["", "## Figures", ""]
    lines += [f"![{name.removesuffix('.png')}]({figures_dir}/{name})" for name in figure_names]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--samples", type=Path, required=True,
                        help="in: evaluate's graded generations")
    parser.add_argument("--metrics", type=Path, required=True,
                        help="out: the headline metrics, <set>/<measure>.json (dvc metrics)")
    parser.add_argument("--budget", type=Path, required=True,
                        help="out: accuracy at every budget, <set>.tsv (dvc plots)")
    parser.add_argument("--training", type=Path, required=True,
                        help="in: train's per-step loss and learning rate (dvclive TSVs), for figures/training.png")
    parser.add_argument("--reports", type=Path, required=True,
                        help="out: details.json, verdict.md and figures/")
    args = parser.parse_args(argv)

    max_new_tokens = params.load("eval").max_new_tokens
    seed = params.load_seed()
    samples = read_samples(args.samples)
    deltas = verdict.paired_deltas(samples, seed=seed, resamples=RESAMPLES, confidence=CONFIDENCE)
    curve = verdict.budget_curve(samples, max_new_tokens)
    domains = verdict.domain_deltas(samples, seed=seed, resamples=RESAMPLES, confidence=CONFIDENCE)
    budget = verdict.budget_deltas(samples, max_new_tokens, seed=seed, resamples=RESAMPLES, confidence=CONFIDENCE)
    report = details(samples, deltas, budget, max_new_tokens, seed) | {"domains": domains.to_dict("records")}
    images = figures(samples, deltas, curve, max_new_tokens) | domain_figures(domains) | training_figure(args.training)

    with atomic_dir(args.metrics) as tmp:
        for set_name, files in headline(deltas).items():
            for name, values in files.items():
                write_json(tmp / set_name / f"{name}.json", values)
    with atomic_dir(args.budget) as tmp:
        for set_name in report["sets"]:
            budget_table(curve, set_name).to_csv(tmp / f"{set_name}.tsv", sep="\t", index=False, float_format="%.4f")
    write_json(args.reports / "details.json", report)
    with atomic_dir(args.reports / "figures") as tmp:
        for name, png in images.items():
            (tmp / name).write_bytes(png)
    with atomic_file(args.reports / "verdict.md") as tmp:
        tmp.write_text(verdict_page(report, list(images), "figures"))
    for row in report["verdict"]:
        log.info("%s: %s (%s): %s", row["set"], row["claim"], row["measure"], row["verdict"])


if __name__ == "__main__":
    cli.run(main)
