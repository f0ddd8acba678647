"""compare: one run of the pipeline against another, paired, from their data/eval/samples.parquet; no re-run.

    python -m stages.scoring.compare A B [--out compare.json]

A and B are git revisions (a commit, a branch, a tag; `workspace` for the files as they are) or experiment
names (`dvc exp show` lists them); their samples are read through DVC at that revision (from the local
cache, or the remote when missing). Both ran the same problems with the same seeds, so B's fine-tuned model
minus A's is a paired comparison like base against fine-tuned: the same measures, bootstrap intervals over
problems, verdict words and smallest detectable difference as the report, on the (set, problem, sample)
responses both have. B's base minus A's base is a control: with the same base model and seed it should show
nothing.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pandas as pd

from stages.core import cli, params
from stages.core.artifacts import write_json
from stages.scoring import verdict
from stages.scoring.verdict import BASE, CONFIDENCE, FINETUNED, RESAMPLES

SAMPLES = "data/eval/samples.parquet"
WORKSPACE = "workspace"
KEY = ["set", "problem_id", "sample"]


class CompareError(cli.StageError):
    """The two runs cannot be compared."""


def resolve(repo: Path, name: str) -> str | None:
    """The git revision of `name`: an experiment's ref when an experiment has that name, else `name` itself;
    None for the workspace."""
    if name == WORKSPACE:
        return None
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import resolve_name

    with Repo(str(repo)) as dvc_repo:
        ref = resolve_name(dvc_repo.scm, name).get(name)
    return str(ref) if ref else name


def read_samples(repo: Path, name: str) -> pd.DataFrame:
    """The samples table of run `name` (see resolve), read through DVC."""
    import dvc.api

    rev = resolve(repo, name)
    if rev is None:
        path = repo / SAMPLES
        if not path.is_file():
            raise CompareError(f"compare: {path} does not exist; run `dvc repro` (or `dvc checkout`) first")
        return pd.read_parquet(path)
    try:
        with dvc.api.open(SAMPLES, repo=str(repo), rev=rev, mode="rb") as f:
            return pd.read_parquet(io.BytesIO(f.read()))
    except Exception as e:  # DVC raises many kinds: unknown revision, output not in the cache or the remote
        raise CompareError(f"compare: cannot read {SAMPLES} at '{name}' ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); check the name "
                           "with `git log` or `dvc exp show`, and `dvc pull` its outputs") from None


def paired(a: pd.DataFrame, b: pd.DataFrame, model: str) -> pd.DataFrame:
    """`model`'s responses of A as 'base' and of B as 'finetuned', on the (set, problem, sample) both answered,
    in the shape verdict.paired_deltas reads."""
    a, b = a[a["model"] == model], b[b["model"] == model]
    common = a[KEY].merge(b[KEY])
    return pd.concat([a.merge(common).assign(model=BASE), b.merge(common).assign(model=FINETUNED)],
                     ignore_index=True)


def check_comparable(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str]) -> list[str]:
    """Notes on what the two runs do not share (sets, problems, samples); an error when they share nothing or
    the same problem id names different problems."""
    notes = []
    sets_a, sets_b = set(a["set"]), set(b["set"])
    if sets_a != sets_b:
        notes.append(f"Compared on the sets both evaluated ({', '.join(sorted(sets_a & sets_b)) or 'none'}); "
                     f"{names[0]} only: {', '.join(sorted(sets_a - sets_b)) or 'none'}; {names[1]} only: "
                     f"{', '.join(sorted(sets_b - sets_a)) or 'none'}.")
    problems = a[["set", "problem_id", "problem"]].drop_duplicates().merge(
        b[["set", "problem_id", "problem"]].drop_duplicates(), on=["set", "problem_id"], suffixes=("_a", "_b"))
    if problems.empty:
        raise CompareError(f"compare: {names[0]} and {names[1]} answered no problem in common; they cannot be paired")
    differ = problems[problems["problem_a"] != problems["problem_b"]]
    if len(differ):
        raise CompareError(f"compare: {names[0]} and {names[1]} give {len(differ)} problem id(s) different problems "
                           f"(e.g. {differ.iloc[0]['set']} / {differ.iloc[0]['problem_id']}): the evaluation sets "
                           "changed between them, so they cannot be paired")
    for side, frame, other in ((names[0], a, b), (names[1], b, a)):
        extra = len(frame[KEY].drop_duplicates().merge(other[KEY].drop_duplicates(), how="left", indicator=True)
                    .query("_merge == 'left_only'"))
        if extra:
            notes.append(f"{extra} (set, problem, sample) response(s) of {side} have no counterpart in the other "
                         "run and are left out.")
    return notes


def comparison(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str], seed: int) -> dict:
    """The paired comparison of B against A: fine-tuned (the verdict rows, per set) and base (the control)."""
    notes = check_comparable(a, b, names)
    result = {"a": names[0], "b": names[1], "notes": notes,
              "bootstrap": {"resamples": RESAMPLES, "confidence": CONFIDENCE, "seed": seed}}
    for model in (FINETUNED, BASE):
        rows = paired(a, b, model)
        deltas = verdict.paired_deltas(rows, seed=seed, resamples=RESAMPLES, confidence=CONFIDENCE)
        result[model] = {"verdict": verdict.verdict_rows(deltas),
                         "problems": rows.groupby("set")["problem_id"].nunique().to_dict(),
                         "measures": deltas.to_dict("records")}
    return result


def markdown(result: dict) -> str:
    a, b = result["a"], result["b"]
    finetuned, control = result[FINETUNED], result[BASE]
    accuracy = {r["set"]: r for r in finetuned["measures"] if r["measure"] == "accuracy"}
    lines = [f"# {b} against {a}", "",
             f"Each delta is {b}'s fine-tuned model minus {a}'s, paired over the problems and samples both answered, "
             f"with a {CONFIDENCE:.0%} bootstrap interval over problems; *detectable* is the smallest true delta it "
             "would tell from 0 about 80% of the time.", "", *result["notes"], "", "## Summary", "",
             *verdict.summary_lines(finetuned["verdict"]), ""]
    for set_name, row in accuracy.items():
        problems = finetuned["problems"][set_name]
        lines.append(verdict.detectable_line(set_name, {"problems": problems, "measures": {"accuracy": row}}) + "\n")
    lines += ["## Fine-tuned models", "", verdict.verdict_markdown(finetuned["verdict"], labels=(a, b)),
              "## Control: base models", "",
              f"{b}'s base model minus {a}'s: with the same base model and seed it should show no difference.", "",
              *verdict.summary_lines(control["verdict"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.scoring.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the run compared against: a git revision, an experiment name or 'workspace'")
    parser.add_argument("b", help="the run compared")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the project (default: here)")
    parser.add_argument("--out", type=Path, help="also write the comparison as JSON here")
    args = parser.parse_args(argv)
    seed = params.load_seed(args.repo / "params.yaml")
    a, b = read_samples(args.repo, args.a), read_samples(args.repo, args.b)
    result = comparison(a, b, (args.a, args.b), seed)
    if args.out:
        write_json(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    cli.run(main, check_params=False)
