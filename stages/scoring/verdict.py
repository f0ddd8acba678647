"""The verdict on the seed's claims, from the samples table of evaluate: headline measures per model and set,
fine-tuned minus base deltas with paired bootstrap intervals over problems, and accuracy at every budget.

Every measure is a ratio of sums over responses (sum of a column / sum of another, or / the responses), so
a long response weighs by its length: markers per 1k reasoning tokens are markers of all responses over
their reasoning tokens, and a short response with one "wait" does not dominate the rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from stages.core.cli import StageError
from stages.core.params import BASE, FINETUNED

RESAMPLES, CONFIDENCE = 2000, 0.95  # the bootstrap of every interval
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
# The interval is undefined when the measure is (e.g. tokens per correct answer in resamples without one).
NOT_MEASURABLE = "not measurable"
FIRST_BUDGET = 1024  # tokens; the budget curve doubles from here up to max_new_tokens
# The true difference, in standard errors, that an interval excludes 0 for about 80% of the time (2.80 at 95%:
# the interval's half-width in standard errors plus 0.84), from CONFIDENCE, not typed beside it.
DETECTED_80 = NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / 2) + NormalDist().inv_cdf(0.8)


class VerdictError(StageError):
    """The samples table cannot give the measures asked for."""


@dataclass(frozen=True)
class Measure:
    """scale * sum(numerator) / sum(denominator) over responses; without a denominator column, over the number
    of responses (a plain mean). Every column is defined for every response: a missing value is an error, so a
    measure never silently averages over a subset."""
    name: str
    numerator: str
    denominator: str | None = None
    scale: float = 1.0
    higher_is_better: bool = True
    meaning: str = ""  # one line for readers of the report and the model card


    def columns(self) -> list[str]:
        return [self.numerator] + ([self.denominator] if self.denominator else [])


MEASURES = (
    Measure("accuracy", "correct", meaning="share of responses graded correct (pass@1 averaged over samples)"),
    Measure("response_tokens_mean", "response_tokens", higher_is_better=False,
            meaning="generated tokens per response, reasoning and answer"),
    Measure("tokens_per_correct", "response_tokens", "correct", higher_is_better=False,
            meaning="all generated tokens over the number of correct responses"),
    Measure("second_guesses_per_response", "second_guesses", higher_is_better=False,
            meaning="second-guess markers (wait, hmm, actually, ...) per response"),
    Measure("second_guesses_per_1k_reasoning_tokens", "second_guesses", "reasoning_tokens", scale=1000.0,
            higher_is_better=False, meaning="second-guess markers per 1,000 reasoning tokens, pooled over responses"),
    Measure("finished_share", "finished", meaning="share that closed the reasoning and gave an answer in budget"),
    Measure("hit_max_tokens_share", "hit_max_tokens", higher_is_better=False,
            meaning="share cut at the token budget"),
    Measure("loop_share", "looped", higher_is_better=False, meaning="share repeating a passage back to back"),
    # 0 for a wrong answer: Chen et al. ("Do NOT Think That Much") average over all responses.
    Measure("outcome_efficiency", "outcome_efficiency",
            meaning="share of a response's tokens spent up to its first correct answer; 0 when wrong"),
    Measure("boxed_share", "boxed", meaning="share whose final answer (after </think>) puts its result in \\boxed{}"),
    Measure("boxed_parse_share", "boxed_parses",
            meaning="share whose last \\boxed{} holds notation math-verify can read, right or wrong"),
    Measure("latex_answer_share", "latex_answer",
            meaning="share whose final answer writes its mathematics in LaTeX (none in Unicode symbols: x², √2, ½)"),
    Measure("stepwise_share", "stepwise",
            meaning="share whose final answer is laid out as steps (2+ numbered, 'Step N' or bulleted lines, or 2+ "
                    "display equations): a proxy for layout; it cannot tell whether the steps are right or clear"),
    Measure("answer_tokens_mean", "answer_tokens", higher_is_better=False,
            meaning="tokens of the final answer (after </think>) per response"),
)
MEASURE_BY_NAME = {m.name: m for m in MEASURES}


@dataclass(frozen=True)
class Claim:
    claim: str  # as the seed words it
    measure: str  # a Measure name


CLAIMS = (
    Claim("more concise", "response_tokens_mean"),
    Claim("more concise", "tokens_per_correct"),
    Claim("confident, eliminates recursive doubt", "second_guesses_per_1k_reasoning_tokens"),
    Claim("eliminates recursive doubt", "loop_share"),
    Claim("stays accurate", "accuracy"),
    Claim("finishes", "finished_share"),
    Claim("proper mathematical notation", "boxed_share"),
    Claim("proper mathematical notation", "boxed_parse_share"),
    Claim("proper mathematical notation", "latex_answer_share"),
    Claim("clearer step-by-step reasoning", "stepwise_share"),
)


def _check_columns(samples: pd.DataFrame, needed: list[str]) -> None:
    missing = sorted(set(needed) - set(samples.columns))
    if missing:
        raise VerdictError(f"verdict: the samples table has no column(s) {missing}; re-run evaluate with the code "
                           "that adds them (or leave their measures out)")


def _numerators_denominators(rows: pd.DataFrame, measures: tuple[Measure, ...]) -> pd.DataFrame:
    """Per response, each measure's numerator ('<name>/num') and denominator ('<name>/den') terms."""
    columns = sorted({c for m in measures for c in m.columns()})
    missing = rows[columns].isna().sum()
    if missing.any():
        raise VerdictError(f"verdict: the samples table has missing values in {missing[missing > 0].to_dict()} "
                           "(column: rows); every response needs every measured value, re-run evaluate")
    numerators, denominators = {}, {}
    for m in measures:
        numerators[f"{m.name}/num"] = rows[m.numerator].astype(float)
        denominators[f"{m.name}/den"] = (pd.Series(1.0, index=rows.index) if m.denominator is None
                                         else rows[m.denominator].astype(float))
    return pd.DataFrame(numerators | denominators, index=rows.index)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, scale: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, scale * numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def measure_values(rows: pd.DataFrame, measures: tuple[Measure, ...] = MEASURES) -> dict[str, float]:
    """Each measure over the given responses (one model on one set, say); NaN where its denominator is 0."""
    _check_columns(rows, [c for m in measures for c in m.columns()])
    sums = _numerators_denominators(rows, measures).sum()
    return {m.name: float(_ratio(np.array(sums[f"{m.name}/num"]), np.array(sums[f"{m.name}/den"]),
                                 np.array(m.scale))) for m in measures}


def verdict_word(low: float, high: float, higher_is_better: bool) -> str:
    """Better or worse only when the interval of the delta excludes 0."""
    if math.isnan(low) or math.isnan(high):
        return NOT_MEASURABLE
    if low > 0 or high < 0:
        return BETTER if (low > 0) == higher_is_better else WORSE
    return NO_DIFFERENCE


def _resample_counts(rng: np.random.Generator, problems: int, resamples: int) -> np.ndarray:
    """How often each problem is drawn in each resample (resamples x problems), drawing problems with
    replacement; in blocks so memory stays small however many problems there are."""
    block = max(1, 2**22 // problems)
    counts = []
    for start in range(0, resamples, block):
        n = min(block, resamples - start)
        drawn = rng.integers(0, problems, size=(n, problems), dtype=np.int32)  # int32: half the memory traffic
        drawn += problems * np.arange(n, dtype=np.int32)[:, None]  # each resample its own run of bins
        counts.append(np.bincount(drawn.ravel(), minlength=n * problems).reshape(n, problems).astype(float))
    return np.concatenate(counts)


def paired_deltas(samples: pd.DataFrame, measures: tuple[Measure, ...] = MEASURES, seed: int = 0,
                  resamples: int = RESAMPLES, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """For every set and measure: base, fine-tuned, delta (fine-tuned minus base), its paired bootstrap
    interval [low, high], the verdict word and the smallest detectable difference (the true delta an interval
    would tell from 0 about 80% of the time: DETECTED_80 bootstrap standard errors); also each model's own
    interval (base_low, base_high, finetuned_low, finetuned_high) from the same resamples, for plots.

    Percentile bootstrap over problems: each resample draws the set's problems with replacement, the same
    draw for both models, so a problem's base and fine-tuned samples (all of them) stay together and the
    spread of difficulty between problems cancels out of the delta. Every measure is then recomputed as a
    ratio of sums on the resample. scipy.stats.bootstrap(paired=True, method='percentile') computes the same
    interval (the tests check it) but builds every resampled array (resamples x problems values per array),
    ~60x slower at 4,300 problems x 8 measures; here a resample is a vector of draw counts, so all resamples
    of all measures are one matrix product of counts and per-problem sums. BCa is not used: with thousands
    of problems a ratio of sums is close to normal (BCa moved the bounds by <1% of the width in a trial),
    and it has no interval when a delta never varies (no loops in either model), where the percentile
    interval is [0, 0].
    """
    _check_columns(samples, ["model", "set", "problem_id"] + [c for m in measures for c in m.columns()])
    models = set(samples["model"].unique())
    if models != {BASE, FINETUNED}:
        raise VerdictError(f"verdict: the samples table has models {sorted(models)}; a delta needs exactly "
                           f"'{BASE}' and '{FINETUNED}'")
    scale = np.array([m.scale for m in measures])
    tail = (1 - confidence) / 2 * 100
    records = []
    for set_name, rows in samples.groupby("set", sort=True):
        if set(rows["model"].unique()) != {BASE, FINETUNED}:
            raise VerdictError(f"verdict: set '{set_name}' has samples of {sorted(rows['model'].unique())} only; "
                               "a paired comparison needs both models on it (re-run evaluate)")
        per_problem = _numerators_denominators(rows, measures).groupby([rows["model"], rows["problem_id"]]).sum()
        base, finetuned = per_problem.loc[BASE], per_problem.loc[FINETUNED]
        one_sided = base.index.symmetric_difference(finetuned.index)
        if len(one_sided):
            raise VerdictError(f"verdict: set '{set_name}': {len(one_sided)} problem(s) (e.g. "
                               f"{list(one_sided[:3])}) have samples of one model only; a paired comparison needs "
                               "both models on the same problems (re-run evaluate)")
        # problems x (base numerators, base denominators, fine-tuned numerators, fine-tuned denominators)
        columns = np.hstack([base.to_numpy(), finetuned.loc[base.index].to_numpy()])
        counts = _resample_counts(np.random.default_rng(seed), len(base), resamples)
        # Row 0: every problem once, the point estimate; then the resamples.
        sums = np.vstack([columns.sum(axis=0), counts @ columns])
        base_num, base_den, finetuned_num, finetuned_den = np.split(sums, 4, axis=1)
        base_value, finetuned_value = _ratio(base_num, base_den, scale), _ratio(finetuned_num, finetuned_den, scale)
        deltas = finetuned_value - base_value
        low, high = np.percentile(deltas[1:], [tail, 100 - tail], axis=0)
        detectable = DETECTED_80 * np.std(deltas[1:], axis=0)
        base_low, base_high = np.percentile(base_value[1:], [tail, 100 - tail], axis=0)
        finetuned_low, finetuned_high = np.percentile(finetuned_value[1:], [tail, 100 - tail], axis=0)
        for k, m in enumerate(measures):
            records.append({"set": set_name, "measure": m.name, "base": float(base_value[0, k]),
                            "finetuned": float(finetuned_value[0, k]), "delta": float(deltas[0, k]),
                            "low": float(low[k]), "high": float(high[k]), "higher_is_better": m.higher_is_better,
                            "verdict": verdict_word(float(low[k]), float(high[k]), m.higher_is_better),
                            "detectable": float(detectable[k]),
                            "base_low": float(base_low[k]), "base_high": float(base_high[k]),
                            "finetuned_low": float(finetuned_low[k]), "finetuned_high": float(finetuned_high[k])})
    return pd.DataFrame.from_records(records)


def pass_at_k(correct: int, samples: int, k: int) -> float:
    """The unbiased pass@k of one problem (Chen et al. 2021): the chance that k of its `samples` responses, drawn
    without replacement, include one of the `correct` ones."""
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def passes_at_k(rows: pd.DataFrame) -> dict | None:
    """pass@k of one set's samples for k = its samples per problem, per model, averaged over problems; None with
    one sample per problem."""
    _check_columns(rows, ["model", "problem_id", "correct"])
    counts = rows.groupby(["model", "problem_id"])["correct"].agg(["sum", "size"])
    k = int(counts["size"].min())
    if k < 2:
        return None
    return {"k": k} | {model: float(np.mean([pass_at_k(int(c), int(n), k) for c, n in group.to_numpy()]))
                       for model, group in counts.groupby(level="model")}


def verdict_rows(deltas: pd.DataFrame, claims: tuple[Claim, ...] = CLAIMS) -> list[dict]:
    """One row per set and claim: the claim, its measure, base, fine-tuned, delta [low, high] and verdict."""
    by_measure = deltas.set_index(["set", "measure"])
    missing = sorted({c.measure for c in claims} - set(deltas["measure"]))
    if missing:
        raise VerdictError(f"verdict: claims need measure(s) {missing}, which the deltas lack; add them to "
                           "the measures given to paired_deltas")
    rows = []
    for set_name in sorted(deltas["set"].unique()):
        for c in claims:
            d = by_measure.loc[(set_name, c.measure)]
            rows.append({"set": set_name, "claim": c.claim, "measure": c.measure,
                         **{k: float(d[k]) for k in ("base", "finetuned", "delta", "low", "high", "detectable")},
                         "verdict": d["verdict"]})
    return rows


def _decimals(magnitude: float, digits: int) -> int:
    """Decimals that show `digits` significant digits of `magnitude` (and no more than its whole part)."""
    if math.isnan(magnitude) or magnitude == 0:
        return 3
    return max(0, digits - 1 - math.floor(math.log10(abs(magnitude))))


def _number(value: float, decimals: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{decimals}f}"


def _places(rows: list[dict]) -> int:
    """Decimals for rows of one measure: what the narrowest interval's width needs, so a narrow interval is not
    rounded to [0, 0]; a width within rounding error of 0 (a delta that never varies) gets the values'."""
    places = 0
    for r in rows:
        width, magnitude = r["high"] - r["low"], max(abs(r["base"]), abs(r["finetuned"]))
        places = max(places, _decimals(width, 2) if width > 1e-9 * magnitude else _decimals(magnitude, 3))
    return places


def _shown(base: float, finetuned: float, decimals: int) -> tuple[str, str, str]:
    """base, fine-tuned and their delta as shown: the delta is the difference of the shown values, so it never
    disagrees with them (23.45 and 7.51 at 0 decimals: 23, 8, -15)."""
    base, finetuned = (value if math.isnan(value) else round(value, decimals) for value in (base, finetuned))
    delta = finetuned - base if math.isnan(finetuned - base) else round(finetuned - base, decimals) + 0.0
    return _number(base, decimals), _number(finetuned, decimals), _number(delta, decimals)


def verdict_markdown(rows: list[dict], labels: tuple[str, str] = ("base", "fine-tuned")) -> str:
    """The verdict rows as a Markdown table, one precision per measure; a delta is shown as the difference of
    the shown values, so it never disagrees with them. labels: the two columns' names."""
    places = {m: _places([r for r in rows if r["measure"] == m]) for m in {r["measure"] for r in rows}}
    lines = [f"| set | claim | measure | {labels[0]} | {labels[1]} | delta [{CONFIDENCE:.0%} interval] | detectable | "
             "verdict |", "|---|---|---|---:|---:|---|---:|---|"]
    for r in rows:
        n = places[r["measure"]]
        base, finetuned, delta = _shown(r["base"], r["finetuned"], n)
        lines.append(f"| {r['set']} | {r['claim']} | {r['measure']} | {base} | {finetuned} | {delta} "
                     f"[{_number(r['low'], n)}, {_number(r['high'], n)}] | {_number(r.get('detectable', math.nan), n)} "
                     f"| {r['verdict']} |")
    return "\n".join(lines) + "\n"


def budgets(max_new_tokens: int) -> list[int]:
    """1k, 2k, 4k, ... below max_new_tokens, then max_new_tokens itself."""
    found, budget = [], FIRST_BUDGET
    while budget < max_new_tokens:
        found.append(budget)
        budget *= 2
    return found + [max_new_tokens]


def correct_within(samples: pd.DataFrame, budget: int) -> np.ndarray:
    """Whether each response counts as correct at `budget` tokens: correct, and at most that long (budget_curve
    says why). The one rule behind the budget curve and its deltas."""
    return samples["correct"].to_numpy(dtype=bool) & (samples["response_tokens"].to_numpy() <= budget)


def budget_curve(samples: pd.DataFrame, max_new_tokens: int) -> pd.DataFrame:
    """Accuracy (and the share of responses that ended) at every budget up to max_new_tokens, per model and set.

    A response of n tokens that ended by itself (end-of-sequence included in n) is what a run with any budget
    B >= n produces, so it counts as correct at B when n <= B and it is correct: ending exactly at B counts,
    since a B-budget run has room for that end-of-sequence token. A response cut at max_new_tokens has
    n = max_new_tokens, so it only counts at that budget, where it is the run we have: the curve ends at the
    headline accuracy. A response longer than B counts as wrong at B (a B-budget run would cut it, and a cut
    response rarely has its answer), so the curve below max_new_tokens is a slight lower bound.
    """
    _check_columns(samples, ["model", "set", "correct", "response_tokens", "hit_max_tokens"])
    longest = int(samples["response_tokens"].max()) if len(samples) else 0
    if longest > max_new_tokens:
        raise VerdictError(f"verdict: a response has {longest} tokens, more than max_new_tokens {max_new_tokens}; "
                           "pass the eval.max_new_tokens the samples were generated with")
    tokens = samples["response_tokens"].to_numpy()
    ended = ~samples["hit_max_tokens"].to_numpy(dtype=bool)
    records = []
    for budget in budgets(max_new_tokens):
        at_budget = pd.DataFrame({"model": samples["model"], "set": samples["set"],
                                  "accuracy": correct_within(samples, budget),
                                  "ended_share": ended & (tokens <= budget)})
        curve = at_budget.groupby(["model", "set"], sort=True).agg(
            accuracy=("accuracy", "mean"), ended_share=("ended_share", "mean"), responses=("accuracy", "size"))
        records.append(curve.reset_index().assign(budget=budget))
    columns = ["model", "set", "budget", "accuracy", "ended_share", "responses"]
    return pd.concat(records, ignore_index=True)[columns].sort_values(["model", "set", "budget"],
                                                                         ignore_index=True)


def budget_deltas(samples: pd.DataFrame, max_new_tokens: int, seed: int = 0, resamples: int = RESAMPLES,
                  confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Accuracy at every budget (as budget_curve counts it) per set, with the paired delta's interval: set,
    budget, base, finetuned, delta, low, high."""
    _check_columns(samples, ["correct", "response_tokens"])
    frames = []
    for budget in budgets(max_new_tokens):
        within = samples.assign(correct=correct_within(samples, budget))
        deltas = paired_deltas(within, (MEASURE_BY_NAME["accuracy"],), seed, resamples, confidence)
        frames.append(deltas.assign(budget=budget)[["set", "budget", "base", "finetuned", "delta", "low", "high"]])
    return pd.concat(frames, ignore_index=True).sort_values(["set", "budget"], ignore_index=True)


def budget_markdown(budget: list[dict]) -> str:
    """Accuracy at every budget as a Markdown table, the delta (the difference of the shown values) with its
    interval."""
    lines = [f"| budget (tokens) | base accuracy | fine-tuned accuracy | delta [{CONFIDENCE:.0%} interval] |",
             "|---:|---:|---:|---|"]
    for row in budget:
        base, finetuned, delta = _shown(row[BASE], row[FINETUNED], 3)
        lines.append(f"| {row['budget']} | {base} | {finetuned} | {delta} [{_number(row['low'], 3)}, "
                     f"{_number(row['high'], 3)}] |")
    return "\n".join(lines) + "\n"


FEW_PROBLEMS = 100  # below this a set's intervals are too wide to show a few points of accuracy
BUDGET_WARNING = 0.10  # above this share of responses cut at the budget, the budget decides the outcome
FINISHED_GAP = 0.10  # finished shares this far apart: the models are compared on different kinds of response


def detectable_line(set_name: str, result: dict) -> str:
    """One line: the smallest accuracy difference this set's evaluation can see (details_json's sets[name])."""
    accuracy = result["measures"]["accuracy"]
    if accuracy["high"] == accuracy["low"]:  # every resample alike: no problem's result differs between them
        return (f"On {set_name} no problem was answered differently by the two models: the accuracy interval is a "
                "point and cannot say which differences this set could show.")
    if math.isnan(accuracy["detectable"]):
        return f"On {set_name} the accuracy delta has no interval."
    return (f"On {set_name} this evaluation separates accuracy differences of {100 * accuracy['detectable']:.1f} "
            f"points or more (80% of the time at {CONFIDENCE:.0%} confidence); smaller ones read as *{NO_DIFFERENCE}*. "
            "More problems or samples narrow it.")


def set_notes(result: dict, max_new_tokens: int) -> list[str]:
    """Warnings on what a set's verdict cannot decide (details_json's sets[name]): few problems, responses
    cut at the budget, finished shares far apart."""
    notes = []
    if result["problems"] < FEW_PROBLEMS:
        notes.append(f"Warning: only {result['problems']} problems; every interval here is wide.")
    cut, finished = result["measures"]["hit_max_tokens_share"], result["measures"]["finished_share"]
    for model, label in ((BASE, "base"), (FINETUNED, "fine-tuned")):
        if cut[model] > BUDGET_WARNING:
            notes.append(f"Warning: {cut[model]:.0%} of {label} responses hit the {max_new_tokens}-token budget; "
                         "for them the budget, not the model, decides the outcome (raise eval.max_new_tokens).")
    if abs(finished[FINETUNED] - finished[BASE]) > FINISHED_GAP:
        notes.append(f"Warning: the models finished {finished[BASE]:.0%} (base) and {finished[FINETUNED]:.0%} "
                     "(fine-tuned) of their responses; measures over responses compare different kinds of them.")
    return notes


def summary_lines(rows: list[dict]) -> list[str]:
    """Per claim and measure, in the rows' order, what the sets say together: each verdict word with the sets
    that gave it."""
    said: dict[tuple[str, str], dict[str, list[str]]] = {}
    for r in rows:
        said.setdefault((r["claim"], r["measure"]), {}).setdefault(r["verdict"], []).append(r["set"])
    return [f"- {claim} (`{measure}`): " + "; ".join(f"{word} on {', '.join(sets)}" for word, sets in
                                                    sorted(by_word.items()))
            for (claim, measure), by_word in said.items()]


DOMAIN_MEASURES = ("accuracy", "response_tokens_mean")
DOMAIN_COLUMNS = ["set", "by", "group", "problems", "measure", "base", "finetuned", "delta", "low", "high"]
MANY_COMPARISONS = (f"These are many comparisons: with {CONFIDENCE:.0%} intervals, about one group in "
                    f"{1 / (1 - CONFIDENCE):.0f} shows an interval that excludes 0 by chance alone, so they carry no "
                    "verdict words; read them as where to look, not as findings.")


def domain_deltas(samples: pd.DataFrame, seed: int = 0, resamples: int = RESAMPLES,
                  confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Accuracy and tokens per response of both models by domain: per set, per grouping column (subject, level)
    that has two or more groups, each group's paired delta with its interval, problems resampled within the
    group. No verdict words (see MANY_COMPARISONS)."""
    measures = tuple(MEASURE_BY_NAME[name] for name in DOMAIN_MEASURES)
    frames = []
    for _, rows in samples.groupby("set", sort=True):
        for by in ("subject", "level"):
            if by not in rows.columns or rows[by].nunique() < 2:
                continue
            for group, subset in rows.groupby(by, sort=True):
                deltas = paired_deltas(subset, measures, seed=seed, resamples=resamples, confidence=confidence)
                frames.append(deltas.assign(by=by, group=str(group), problems=subset["problem_id"].nunique()))
    if not frames:
        return pd.DataFrame(columns=DOMAIN_COLUMNS)
    return pd.concat(frames, ignore_index=True)[DOMAIN_COLUMNS]


def domain_markdown(rows: list[dict]) -> str:
    """Domain rows (domain_deltas records) as one compact table: a line per set, grouping and group."""
    lines = [f"| set | by | group | problems | accuracy: base, fine-tuned, delta [{CONFIDENCE:.0%} interval] | "
             "tokens per response: delta [interval] |", "|---|---|---|---:|---|---|"]
    table = pd.DataFrame.from_records(rows, columns=DOMAIN_COLUMNS)
    for (set_name, by, group), measures in table.groupby(["set", "by", "group"], sort=False):
        accuracy = measures[measures["measure"] == "accuracy"].iloc[0]
        tokens = measures[measures["measure"] == "response_tokens_mean"].iloc[0]
        lines.append(f"| {set_name} | {by} | {group} | {accuracy['problems']} | {_number(accuracy['base'], 3)}, "
                     f"{_number(accuracy['finetuned'], 3)}, {_number(accuracy['delta'], 3)} "
                     f"[{_number(accuracy['low'], 3)}, {_number(accuracy['high'], 3)}] | "
                     f"{_number(tokens['delta'], 0)} [{_number(tokens['low'], 0)}, {_number(tokens['high'], 0)}] |")
    return "\n".join(lines) + "\n"
