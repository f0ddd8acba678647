"""evaluate: the base and the fine-tuned model answer every evaluation set -> data/eval/samples.parquet
(every generation, graded and measured) and metrics/eval_sets.json (problems per set). The statistics,
intervals and verdict are the report stage's, so a change there never re-runs this one.

Generations of each (model, set) are kept in data/eval/generations/ under a fingerprint of what made
them, so a run that dies resumes with the sets it finished, and a change of grading alone regenerates
nothing. One session serves both models: the base model is loaded once, answers its missing sets, and then
answers the fine-tuned model's with the adapter merged into it in place. With eval.num_gpus above one, the
missing sets are split over that many worker processes (stages/generation/workers.py), one per GPU, each running
such a session.
"""

from __future__ import annotations

import argparse
import gc
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stages.core import cli, params
from stages.core.artifacts import atomic_file, fingerprint, write_json
from stages.data.eval_sets import SCHEMA, heldout
from stages.generation import workers as eval_workers

log = logging.getLogger("stages.evaluate")  # not __name__: `python -m` runs a stage as __main__
# The code that turns prompts into tokens, part of the cache key: every module of the generation package, found
# from the package itself, so a module added to it or moved into it is covered without a list to keep.
GENERATION_CODE = tuple(sorted(Path(eval_workers.__file__).parent.glob("*.py")))


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
                config: params.EvalParams, tokenizer) -> pd.DataFrame:
    """One row per generation: the problem, the response, its grade and how it reasons (stages.scoring.overthinking)."""
    from stages.scoring import overthinking
    from stages.scoring.grading import boxed_parses, grade, split_reasoning

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    records = []
    for k, problem in enumerate(problems.to_pylist() * samples):
        generation = generations[k]
        reasoning, answer = split_reasoning(generation.text)
        correct, extracted = grade(problem["gold"], answer, problem["numeric"])

        def is_gold(candidate: str, gold=problem["gold"], numeric=problem["numeric"]) -> bool:
            return grade(gold, f"\\boxed{{{candidate}}}", numeric)[0]

        records.append({
            "model": model_name, "set": set_name, "problem_id": problem["id"], "sample": k // problems.num_rows,
            "level": problem["level"], "subject": problem["subject"], "problem": problem["problem"],
            "gold": problem["gold"],
            "response": generation.text, "extracted_answer": extracted, "correct": correct,
            "response_tokens": generation.n_tokens, "reasoning_tokens": generation.reasoning_tokens,
            "answer_tokens": generation.answer_tokens,
            "hit_max_tokens": generation.hit_max_tokens, "closed_think": answer is not None,
            "finished": overthinking.finished(generation.text, generation.hit_max_tokens),
            "second_guesses": overthinking.second_guesses(reasoning),
            "looped": overthinking.loops(generation.text, config.loop_ngram, config.loop_repeats),
            "outcome_efficiency": overthinking.outcome_efficiency(generation.text, correct, is_gold, count_tokens),
            "boxed": bool(answer and overthinking.has_boxed(answer)), "latex": overthinking.uses_latex(generation.text),
            "boxed_parses": boxed_parses(answer), "latex_answer": overthinking.latex_answer(answer),
            "answer_steps": overthinking.answer_steps(answer), "stepwise": overthinking.stepwise(answer),
        })
    return pd.DataFrame.from_records(records)


def generate_all(sets: dict[str, pa.Table], config: params.EvalParams, model_params: params.ModelParams, seed: int,
                 adapter: Path, cache_dir: Path, tokenizer, processes: int = 1) -> list[pd.DataFrame]:
    """Sample rows of every (model, set): generated now (by `processes` workers when more than one,
    stages.generation.workers), or reused from cache_dir when a file with the same fingerprint (base model, adapter,
    rendered prompts, sampling, seed, generation code; the process count when more than one) is there.
    Stale files are removed."""
    from stages.core.base_model import model_identity
    from stages.core.prompts import prompt_text

    # Only what decides the generated tokens: golds, markers and loop sizes grade them, so their changes
    # reuse the files. batching, batch_size, static_cache and kv_cache are in: the padded route's random numbers depend
    # on the batch a sequence shares (continuous batching keys them per prompt), and on a GPU bf16 rounding
    # does on either route. For batch_size 'auto' the key holds 'auto', not the size free memory gave.
    # Several processes split the batches (the padded route seeds each its own way): their count is in too,
    # only when above one, so the files of one process stay valid.
    sampling = {k: getattr(config, k) for k in ("temperature", "top_p", "max_new_tokens", "batching", "batch_size",
                                                "static_cache", "kv_cache")}
    made_by = (model_identity(model_params), sampling, seed, *GENERATION_CODE)
    if processes > 1:
        made_by = (*made_by, {"processes": processes})
    cache_dir.mkdir(parents=True, exist_ok=True)
    files, phases = {}, []  # a phase per model with missing sets, base first: one loaded model serves both
    for model_name in params.MODELS:
        model_adapter = adapter if model_name == "finetuned" else None
        missing = []
        for set_name, problems in sets.items():
            prompts = [prompt_text(tokenizer, problem, directive=model_params.directive)
                       for problem in problems["problem"].to_pylist()]
            samples = config.samples_of(set_name)
            key = fingerprint(*made_by, {"samples": samples}, prompts, *([model_adapter] if model_adapter else []))
            files[model_name, set_name] = cached = cache_dir / f"{model_name}-{set_name}-{key}.parquet"
            if cached.is_file():
                log.info("%s / %s: reusing %s", model_name, set_name, cached)
            else:
                missing.append(eval_workers.Job(f"{model_name}/{set_name}", prompts * samples, cached))
        if missing:
            phases.append(eval_workers.Phase(model_name, model_adapter, missing))
    if phases and processes > 1:
        eval_workers.generate_sharded(phases, model_params, config, seed, processes)
    elif phases:
        generate_here(phases, model_params, config, seed, tokenizer)
    frames = [sample_rows(model_name, set_name, problems, eval_workers.read_generations(files[model_name, set_name]),
                          config.samples_of(set_name), config, tokenizer)
              for model_name in params.MODELS for set_name, problems in sets.items()]
    kept = {path.name for path in files.values()}
    for stale in cache_dir.glob("*.parquet"):
        if stale.name not in kept:
            stale.unlink()
    return frames


def generate_here(phases: list[eval_workers.Phase], model_params: params.ModelParams, config: params.EvalParams,
                  seed: int, tokenizer) -> None:
    """Every phase's generations, by this process, with the model loaded once (eval_workers.generate_phases):
    each phase's jobs in one generate call (one tail), each written to job.out as soon as its last response
    ends."""
    from stages.generation import batched as generation

    keys = [[generation.sampling_keys(job.prompts, seed) for job in phase.jobs] for phase in phases]
    eval_workers.generate_phases(model_params, tokenizer, phases, keys, config, seed)
    gc.collect()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sets", type=Path, required=True,
                        help="in: fetch_eval's evaluation sets, <set>.parquet")
    parser.add_argument("--test-split", type=Path, required=True,
                        help="in: stratify's held-out split (the heldout set)")
    parser.add_argument("--adapter", type=Path, required=True, help="in: train's LoRA adapter")
    parser.add_argument("--generations", type=Path, required=True,
                        help="in/out: the generation cache, one file per (model, set) and fingerprint")
    parser.add_argument("--samples", type=Path, required=True,
                        help="out: every graded generation of both models")
    parser.add_argument("--metrics", type=Path, required=True,
                        help="out: per-set counts (problems, samples_per_problem, heldout_without_gold)")
    args = parser.parse_args(argv)

    config = params.load("eval")
    model_params = params.load("model")
    seed = params.load_seed()
    from stages.core.base_model import check_adapter, load_tokenizer

    check_adapter(args.adapter, model_params, "evaluate")
    processes = eval_workers.process_count(config.num_gpus)
    sets, without_gold = load_sets(config, args.sets, args.test_split)
    tokenizer = load_tokenizer(model_params)
    frames = generate_all(sets, config, model_params, seed, args.adapter, args.generations, tokenizer, processes)
    samples = pd.concat(frames, ignore_index=True)
    with atomic_file(args.samples) as tmp:
        samples.to_parquet(tmp, index=False)
    write_json(args.metrics, {"problems": {name: table.num_rows for name, table in sets.items()},
                              "samples_per_problem": {name: config.samples_of(name) for name in sets},
                              "heldout_without_gold": without_gold})
    accuracy = samples.groupby(["set", "model"])["correct"].mean()
    for name in sets:
        log.info("%s: accuracy base %.3f, fine-tuned %.3f (intervals and verdict: the report stage)", name,
                 accuracy[name, "base"], accuracy[name, "finetuned"])


if __name__ == "__main__":
    cli.run(main, kept="the generations of every (model, set) that finished, in its --generations folder "
            "(data/eval/generations/ in dvc.yaml); a run with the same folder generates only the rest")
