"""evaluate: the base and the fine-tuned model answer every evaluation set -> data/eval/samples.parquet
(every generation, graded and counted), metrics/eval.json (model -> set -> metric, plus the fine-tuned
minus base delta) and metrics/eval_plot/{base,finetuned}.json (the headline rates, side by side).

Generations of each (model, set) are kept in data/eval/generations/ under a fingerprint of what made
them, so a run that dies resumes with the sets it finished, and a change of grading alone regenerates
nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stages import cli, params
from stages.artifacts import atomic_dir, atomic_file, fingerprint, write_json
from stages.eval_sets import SCHEMA, heldout

log = logging.getLogger("stages.evaluate")
MODELS = ("base", "finetuned")
# Scalar metrics that get a fine-tuned minus base delta; the rates among them (0-1) are plotted.
HEADLINE = ("accuracy", "second_guesses_per_response", "response_tokens_mean", "hit_max_tokens_share",
            "unclosed_think_share", "loop_share", "boxed_share")
PLOTTED = ("accuracy", "hit_max_tokens_share", "unclosed_think_share", "loop_share", "boxed_share")
GENERATION_CODE = Path(__file__).with_name("generation.py")  # turns prompts into tokens: part of the cache key


def load_sets(config: params.EvalParams, sets_dir: Path, test_split: Path) -> tuple[dict[str, pa.Table], int]:
    """The evaluation sets named in eval.sets (limited to eval.limit problems each), and how many
    held-out rows had no extractable gold answer."""
    sets, without_gold = {}, 0
    for name in config.sets:
        if name == params.HELDOUT:
            table, without_gold = heldout(pq.read_table(test_split))
        else:
            path = sets_dir / f"{name}.parquet"
            if not path.is_file():
                raise cli.StageError(f"evaluate: eval.sets names '{name}', but {path} does not exist; add it to "
                                     "eval_data in params.yaml (or remove it from eval.sets) and run fetch_eval")
            table = pq.read_table(path)
            missing = [c for c in SCHEMA.names if c not in table.column_names]
            if missing:
                raise cli.StageError(f"evaluate: {path} has no column(s) {missing}; re-run fetch_eval")
        if table.num_rows == 0:
            raise cli.StageError(f"evaluate: evaluation set '{name}' has no problems with a gold answer")
        sets[name] = table if config.limit is None else table.slice(0, config.limit)
    return sets, without_gold


def sample_rows(model_name: str, set_name: str, problems: pa.Table, generations, samples: int,
                config: params.EvalParams) -> pd.DataFrame:
    """One row per generation: the problem, the response, its grade and its counts."""
    from stages.grading import grade, split_reasoning
    from stages.overthinking import loops, marker_pattern, second_guesses, uses_latex

    markers = marker_pattern(config.second_guess_markers)
    records = []
    for k, problem in enumerate(problems.to_pylist() * samples):
        generation = generations[k]
        reasoning, answer = split_reasoning(generation.text)
        correct, extracted = grade(problem["gold"], answer, problem["numeric"])
        records.append({
            "model": model_name, "set": set_name, "problem_id": problem["id"], "sample": k // problems.num_rows,
            "level": problem["level"], "problem": problem["problem"], "gold": problem["gold"],
            "response": generation.text, "extracted_answer": extracted, "correct": correct,
            "response_tokens": generation.n_tokens, "reasoning_tokens": generation.reasoning_tokens,
            "answer_tokens": generation.answer_tokens,
            "hit_max_tokens": generation.hit_max_tokens, "closed_think": answer is not None,
            "second_guesses": second_guesses(reasoning, markers),
            "looped": loops(generation.text, config.loop_ngram, config.loop_repeats),
            "boxed": bool(answer and "\\boxed" in answer), "latex": uses_latex(generation.text),
        })
    return pd.DataFrame.from_records(records)


def set_metrics(rows: pd.DataFrame) -> dict:
    tokens = rows["response_tokens"]
    by_level = rows.groupby("level")["correct"].mean()
    return {
        "accuracy": float(rows["correct"].mean()),  # pass@1, averaged over samples
        "problems": int(rows["problem_id"].nunique()), "samples": int(len(rows)),
        "response_tokens_mean": float(tokens.mean()), "response_tokens_median": float(tokens.median()),
        "response_tokens_p90": float(tokens.quantile(0.9)),
        "reasoning_tokens_mean": float(rows["reasoning_tokens"].mean()),
        "answer_tokens_mean": float(rows["answer_tokens"].mean()),
        "second_guesses_per_response": float(rows["second_guesses"].mean()),
        "hit_max_tokens_share": float(rows["hit_max_tokens"].mean()),
        "unclosed_think_share": float(1 - rows["closed_think"].mean()),
        "loop_share": float(rows["looped"].mean()),
        "boxed_share": float(rows["boxed"].mean()), "latex_share": float(rows["latex"].mean()),
        "accuracy_by_level": {str(level): float(value) for level, value in by_level.items()},
    }


def summarize(samples: pd.DataFrame, without_gold: int) -> tuple[dict, dict[str, list[dict]]]:
    """metrics/eval.json (model -> set -> metric, and the delta) and each model's rows of the plot."""
    metrics = {model: {name: set_metrics(rows) for name, rows in samples[samples["model"] == model].groupby("set")}
               for model in MODELS}
    metrics["delta"] = {name: {key: metrics["finetuned"][name][key] - metrics["base"][name][key]
                               for key in HEADLINE} for name in metrics["base"]}
    metrics["heldout_without_gold"] = without_gold
    plot = {model: [{"metric": f"{name} {key}", "value": round(metrics[model][name][key], 4)}
                    for name in metrics[model] for key in PLOTTED] for model in MODELS}
    return metrics, plot


def generate_all(sets: dict[str, pa.Table], config: params.EvalParams, model_params: params.ModelParams, seed: int,
                 adapter: Path, cache_dir: Path, tokenizer) -> list[pd.DataFrame]:
    """Sample rows of every (model, set): generated now, or reused from cache_dir when a file with the
    same fingerprint (base model, adapter, rendered prompts, sampling, seed, generation code) is there.
    Stale files are removed."""
    from stages import generation
    from stages.base_model import model_identity
    from stages.prompts import prompt_text

    # Only what decides the generated tokens: golds, markers and loop sizes grade them, so their changes
    # reuse the files. batch_size and static_cache are in: under sampling, the random numbers a sequence
    # draws depend on the batch it shares (the static cache pads batches with copies), so another batching
    # gives other outputs. For batch_size 'auto' the key holds 'auto', not the size free memory gave.
    sampling = {k: getattr(config, k)
                for k in ("samples", "temperature", "top_p", "max_new_tokens", "batch_size", "static_cache")}
    made_by = (model_identity(model_params), sampling, seed, GENERATION_CODE)
    cache_dir.mkdir(parents=True, exist_ok=True)
    frames, kept = [], set()
    for model_name in MODELS:
        model_adapter = adapter if model_name == "finetuned" else None
        model = None
        for set_name, problems in sets.items():
            prompts = [prompt_text(tokenizer, p) for p in problems["problem"].to_pylist()]
            key = fingerprint(*made_by, prompts, *([model_adapter] if model_adapter else []))
            cached = cache_dir / f"{model_name}-{set_name}-{key}.parquet"
            kept.add(cached.name)
            if cached.is_file():
                log.info("%s / %s: reusing %s", model_name, set_name, cached)
            else:
                model = model or generation.load_model(model_params, model_adapter)
                outputs = generation.generate(model, tokenizer, prompts * config.samples, config, seed,
                                              desc=f"{model_name}/{set_name}")
                with atomic_file(cached) as tmp:
                    pq.write_table(pa.Table.from_pylist([dataclasses.asdict(o) for o in outputs]), tmp)
            outputs = [generation.Generation(**row) for row in pq.read_table(cached).to_pylist()]
            frames.append(sample_rows(model_name, set_name, problems, outputs, config.samples, config))
        del model
        gc.collect()
    for stale in cache_dir.glob("*.parquet"):
        if stale.name not in kept:
            stale.unlink()
    return frames


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sets", type=Path, default=Path("data/eval/sets"))
    parser.add_argument("--test-split", type=Path, default=Path("data/splits/test.parquet"))
    parser.add_argument("--adapter", type=Path, default=Path("models/adapter"))
    parser.add_argument("--generations", type=Path, default=Path("data/eval/generations"))
    parser.add_argument("--samples", type=Path, default=Path("data/eval/samples.parquet"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/eval.json"))
    parser.add_argument("--plot", type=Path, default=Path("metrics/eval_plot"))
    args = parser.parse_args(argv)

    config = params.load("eval")
    model_params = params.load("model")
    seed = params.load_seed()
    from stages import generation
    from stages.base_model import load_tokenizer

    generation.check_adapter(args.adapter, model_params)
    sets, without_gold = load_sets(config, args.sets, args.test_split)
    tokenizer = load_tokenizer(model_params)
    frames = generate_all(sets, config, model_params, seed, args.adapter, args.generations, tokenizer)
    samples = pd.concat(frames, ignore_index=True)
    metrics, plot = summarize(samples, without_gold)
    with atomic_file(args.samples) as tmp:
        samples.to_parquet(tmp, index=False)
    write_json(args.metrics, metrics)
    with atomic_dir(args.plot) as tmp:
        for model_name, rows in plot.items():
            (tmp / f"{model_name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    for name in sets:
        log.info("%s: accuracy base %.3f -> fine-tuned %.3f, second-guesses %.2f -> %.2f", name,
                 metrics["base"][name]["accuracy"], metrics["finetuned"][name]["accuracy"],
                 metrics["base"][name]["second_guesses_per_response"],
                 metrics["finetuned"][name]["second_guesses_per_response"])


if __name__ == "__main__":
    cli.run(main)
