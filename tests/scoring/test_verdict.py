"""The verdict statistics on crafted samples tables: ratio-of-sums measures, paired bootstrap intervals,
verdict words and accuracy at every budget."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from stages.scoring import verdict
from stages.scoring.verdict import MEASURE_BY_NAME, Measure

ACCURACY = (MEASURE_BY_NAME["accuracy"],)
TOKENS = (MEASURE_BY_NAME["response_tokens_mean"],)


def response(model: str, problem: int, **columns) -> dict:
    row = {"model": model, "set": "gsm8k", "problem_id": f"p{problem}", "sample": 0, "correct": True,
           "response_tokens": 100, "reasoning_tokens": 90, "second_guesses": 0, "hit_max_tokens": False,
           "looped": False, "finished": True, "outcome_efficiency": 1.0, "answer_tokens": 10, "boxed": True,
           "boxed_parses": True, "latex_answer": True, "stepwise": False}
    return row | columns


def synthetic(rng: np.random.Generator, problems: int, samples: int, accuracy_gain: float) -> pd.DataFrame:
    """Problems of widely varying difficulty; the fine-tuned model's chance of a correct answer is the base
    model's plus accuracy_gain on every problem, so the true accuracy delta is accuracy_gain."""
    chance = rng.uniform(0.2, 0.7, problems)
    frames = []
    for model, gain in (("base", 0.0), ("finetuned", accuracy_gain)):
        problem = np.repeat(np.arange(problems), samples)
        frames.append(pd.DataFrame({"model": model, "set": "math500", "problem_id": problem,
                                    "correct": rng.random(problems * samples) < chance[problem] + gain}))
    return pd.concat(frames, ignore_index=True)


def interval(deltas: pd.DataFrame, measure: str) -> tuple[float, float]:
    row = deltas.set_index("measure").loc[measure]
    return row["low"], row["high"]


def test_intervals_cover_the_true_delta_and_exclude_zero_for_a_clear_effect():
    rng = np.random.default_rng(0)
    covered, excluded_zero = 0, 0
    for trial in range(20):
        deltas = verdict.paired_deltas(synthetic(rng, 200, 4, accuracy_gain=0.1), ACCURACY, seed=trial)
        low, high = interval(deltas, "accuracy")
        covered += low <= 0.1 <= high
        excluded_zero += low > 0
        assert deltas["verdict"].iloc[0] == verdict.BETTER
    assert covered >= 17  # 95% intervals: 19 of 20 expected
    assert excluded_zero == 20


def test_intervals_include_zero_without_an_effect():
    rng = np.random.default_rng(1)
    included = 0
    for trial in range(20):
        deltas = verdict.paired_deltas(synthetic(rng, 200, 4, accuracy_gain=0.0), ACCURACY, seed=trial)
        low, high = interval(deltas, "accuracy")
        included += low <= 0 <= high
    assert included >= 17


def test_the_same_seed_gives_the_same_intervals():
    samples = synthetic(np.random.default_rng(2), 200, 4, accuracy_gain=0.05)
    first = verdict.paired_deltas(samples, ACCURACY, seed=7)
    pd.testing.assert_frame_equal(first, verdict.paired_deltas(samples, ACCURACY, seed=7))
    assert not first.equals(verdict.paired_deltas(samples, ACCURACY, seed=8))


def test_the_interval_is_scipys_paired_percentile_bootstrap():
    samples = synthetic(np.random.default_rng(3), 400, 4, accuracy_gain=0.05)
    ours = interval(verdict.paired_deltas(samples, ACCURACY, seed=0, resamples=4000), "accuracy")
    per_problem = samples.groupby(["problem_id", "model"])["correct"].mean().unstack("model")
    theirs = scipy.stats.bootstrap((per_problem["base"].to_numpy(), per_problem["finetuned"].to_numpy()),
                                   lambda base, finetuned, axis: finetuned.mean(axis) - base.mean(axis),
                                   paired=True, method="percentile", n_resamples=4000, rng=1).confidence_interval
    width = theirs.high - theirs.low
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.1 * width)


def test_pairing_cancels_the_spread_of_difficulty_between_problems():
    """Base response lengths vary 100-fold between problems; the fine-tuned model writes 50 tokens (give or
    take a few) fewer on each. Resampling problems together gives an interval around -50 that is far
    narrower than resampling each model's problems apart."""
    rng = np.random.default_rng(4)
    problems = 300
    base_tokens = rng.integers(100, 10_000, problems)
    finetuned_tokens = base_tokens - 50 + rng.integers(-5, 6, problems)
    samples = pd.DataFrame([response(model, p, response_tokens=int(tokens[p]))
                            for model, tokens in (("base", base_tokens), ("finetuned", finetuned_tokens))
                            for p in range(problems)])
    low, high = interval(verdict.paired_deltas(samples, TOKENS, seed=0), "response_tokens_mean")
    unpaired = scipy.stats.bootstrap((base_tokens, finetuned_tokens), lambda b, f, axis: f.mean(axis) - b.mean(axis),
                                     method="percentile", n_resamples=2000, rng=0).confidence_interval
    assert low <= -50 <= high and high < 0
    assert (high - low) < 0.02 * (unpaired.high - unpaired.low)
    assert unpaired.low < 0 < unpaired.high  # unpaired, the same data shows no detectable difference


@pytest.mark.parametrize(("low", "high", "higher_is_better", "word"), [
    (0.1, 0.2, True, verdict.BETTER), (0.1, 0.2, False, verdict.WORSE),
    (-0.2, -0.1, True, verdict.WORSE), (-0.2, -0.1, False, verdict.BETTER),
    (-0.1, 0.1, True, verdict.NO_DIFFERENCE), (0.0, 0.0, False, verdict.NO_DIFFERENCE),
    (float("nan"), float("nan"), True, verdict.NOT_MEASURABLE),
])
def test_verdict_word_follows_the_direction_of_good(low, high, higher_is_better, word):
    assert verdict.verdict_word(low, high, higher_is_better) == word


def test_shorter_and_less_accurate_is_better_on_tokens_and_worse_on_accuracy():
    samples = pd.DataFrame([response("base", p, response_tokens=1000 + p, correct=True) for p in range(40)]
                           + [response("finetuned", p, response_tokens=500 + p, correct=p % 2 == 0)
                              for p in range(40)])
    words = verdict.paired_deltas(samples, ACCURACY + TOKENS).set_index("measure")["verdict"]
    assert words["response_tokens_mean"] == verdict.BETTER
    assert words["accuracy"] == verdict.WORSE


def test_markers_per_1k_reasoning_tokens_are_a_ratio_of_sums():
    """One marker in a 10-token response is 100 per 1k on its own; pooled with a long response it does not
    outweigh that response's 10 markers in 1,000 tokens."""
    rows = pd.DataFrame([response("base", 0, reasoning_tokens=10, second_guesses=1),
                         response("base", 1, reasoning_tokens=1000, second_guesses=10)])
    values = verdict.measure_values(rows, (MEASURE_BY_NAME["second_guesses_per_1k_reasoning_tokens"],))
    assert values["second_guesses_per_1k_reasoning_tokens"] == pytest.approx(1000 * 11 / 1010)  # not 55


def test_tokens_per_correct_is_over_correct_answers_and_outcome_efficiency_over_all_responses():
    rows = pd.DataFrame([response("base", 0, response_tokens=300, correct=True, outcome_efficiency=0.5),
                         response("base", 1, response_tokens=700, correct=False, outcome_efficiency=0.0),
                         response("base", 2, response_tokens=200, correct=True, outcome_efficiency=0.9)])
    values = verdict.measure_values(rows)
    assert values["tokens_per_correct"] == pytest.approx(1200 / 2)
    assert values["outcome_efficiency"] == pytest.approx(1.4 / 3)  # a wrong answer counts 0, as Chen et al. define it
    assert values["accuracy"] == pytest.approx(2 / 3)


def test_a_missing_measured_value_is_rejected_not_averaged_away():
    rows = pd.DataFrame([response("base", 0, outcome_efficiency=0.5),
                         response("base", 1, correct=False, outcome_efficiency=float("nan"))])
    with pytest.raises(verdict.VerdictError, match=r"missing values in \{'outcome_efficiency': 1\}"):
        verdict.measure_values(rows)


def test_each_models_own_interval_is_the_percentile_bootstrap_of_its_value():
    samples = synthetic(np.random.default_rng(5), 400, 4, accuracy_gain=0.05)
    row = verdict.paired_deltas(samples, ACCURACY, seed=0, resamples=4000).iloc[0]
    per_problem = samples.groupby(["problem_id", "model"])["correct"].mean().unstack("model")
    for model in ("base", "finetuned"):
        theirs = scipy.stats.bootstrap((per_problem[model].to_numpy(),), np.mean, method="percentile",
                                       n_resamples=4000, rng=1).confidence_interval
        assert row[f"{model}_low"] < row[model] < row[f"{model}_high"]
        assert (row[f"{model}_low"], row[f"{model}_high"]) == pytest.approx(
            (theirs.low, theirs.high), abs=0.1 * (theirs.high - theirs.low))


def test_a_new_measure_plugs_in_by_column_name():
    rows = pd.DataFrame([response("base", 0, answer_tokens=30), response("base", 1, answer_tokens=10)])
    share = Measure("answer_share", "answer_tokens", "response_tokens", higher_is_better=False)
    assert verdict.measure_values(rows, (share,)) == {"answer_share": pytest.approx(40 / 200)}


def test_verdict_rows_and_markdown_name_claim_measure_values_and_word():
    samples = pd.DataFrame([response("base", p, response_tokens=1000 + 10 * p, second_guesses=8) for p in range(30)]
                           + [response("finetuned", p, response_tokens=600 + 10 * p, second_guesses=2)
                              for p in range(30)])
    rows = verdict.verdict_rows(verdict.paired_deltas(samples))
    assert [(r["claim"], r["measure"]) for r in rows] == [(c.claim, c.measure) for c in verdict.CLAIMS]
    concise = rows[0]
    assert concise["base"] == pytest.approx(1145) and concise["finetuned"] == pytest.approx(745)
    assert concise["delta"] == pytest.approx(-400) and concise["verdict"] == verdict.BETTER
    assert rows[4]["verdict"] == verdict.NO_DIFFERENCE  # every answer correct in both: delta [0, 0]
    table = verdict.verdict_markdown(rows).splitlines()
    assert len(table) == 2 + len(verdict.CLAIMS)
    assert table[2] == ("| gsm8k | more concise | response_tokens_mean | 1145 | 745 | -400 [-400, -400] | 0 | "
                        "better |")


def test_a_shown_delta_is_the_difference_of_the_shown_values_at_one_precision_per_measure():
    """23.45 and 7.51 at 0 decimals show as 23 and 8: the delta shows -15, their difference, not -16 (the
    rounded -15.94), which the old table showed beside them."""
    rows = [{"set": "a", "claim": "c", "measure": "m", "base": 23.45, "finetuned": 7.51, "delta": -15.94,
             "low": -30.0, "high": -2.0, "detectable": 12.0, "verdict": "better"},
            {"set": "b", "claim": "c", "measure": "m", "base": 1.234, "finetuned": 1.334, "delta": 0.1,
             "low": -9.0, "high": 9.0, "detectable": 12.0, "verdict": "no detectable difference"}]
    table = verdict.verdict_markdown(rows).splitlines()
    assert table[2] == "| a | c | m | 23 | 8 | -15 [-30, -2] | 12 | better |"
    assert table[3] == "| b | c | m | 1 | 1 | 0 [-9, 9] | 12 | no detectable difference |"  # one precision for m


def test_the_detectable_difference_is_2_8_bootstrap_standard_errors():
    rows = [response(model, p, correct=(p % 3 == 0) if model == "base" else (p % 2 == 0)) for p in range(300)
            for model in ("base", "finetuned")]
    deltas = verdict.paired_deltas(pd.DataFrame(rows), ACCURACY, seed=0, resamples=4000).iloc[0]
    # the paired difference's standard error, analytically: sd of per-problem differences / sqrt(problems)
    differences = np.array([(p % 2 == 0) - (p % 3 == 0) for p in range(300)], dtype=float)
    standard_error = differences.std() / np.sqrt(300)
    assert deltas["detectable"] == pytest.approx(2.8016 * standard_error, rel=0.05)


@pytest.mark.parametrize(("correct", "samples", "k", "expected"), [
    (0, 4, 4, 0.0), (1, 4, 4, 1.0), (1, 4, 1, 0.25), (2, 4, 2, 1 - 1 / 6), (4, 4, 2, 1.0)])
def test_pass_at_k_is_the_unbiased_estimator(correct, samples, k, expected):
    assert verdict.pass_at_k(correct, samples, k) == pytest.approx(expected)


def test_passes_at_k_use_every_sample_of_a_problem_and_none_with_one_sample():
    rows = [response(model, p, sample=s, correct=(model == "finetuned" and s == p % 4) or (p == 0 and s == 0))
            for p in range(8) for s in range(4) for model in ("base", "finetuned")]
    assert verdict.passes_at_k(pd.DataFrame(rows)) == {"k": 4, "base": 1 / 8, "finetuned": 1.0}
    one = [response(model, p) for p in range(3) for model in ("base", "finetuned")]
    assert verdict.passes_at_k(pd.DataFrame(one)) is None


def test_the_summary_gathers_each_claims_verdicts_over_the_sets():
    rows = [{"set": name, "claim": "stays accurate", "measure": "accuracy", "verdict": word}
            for name, word in (("gsm8k", "better"), ("heldout", "no detectable difference"),
                               ("math500", "no detectable difference"))]
    assert verdict.summary_lines(rows) == [
        "- stays accurate (`accuracy`): better on gsm8k; no detectable difference on heldout, math500"]
    rows.insert(0, {"set": "gsm8k", "claim": "more concise", "measure": "response_tokens_mean", "verdict": "worse"})
    assert verdict.summary_lines(rows)[0] == "- more concise (`response_tokens_mean`): worse on gsm8k"  # rows' order


def test_a_problem_answered_by_one_model_only_is_rejected():
    samples = pd.DataFrame([response("base", 0), response("base", 1), response("finetuned", 0)])
    with pytest.raises(verdict.VerdictError, match="set 'gsm8k': 1 problem"):
        verdict.paired_deltas(samples, ACCURACY)


def test_a_missing_column_is_named():
    samples = pd.DataFrame([response("base", 0), response("finetuned", 0)]).drop(columns="finished")
    with pytest.raises(verdict.VerdictError, match=r"\['finished'\]"):
        verdict.paired_deltas(samples)


@pytest.mark.parametrize(("max_new_tokens", "expected"), [
    (8192, [1024, 2048, 4096, 8192]), (10_000, [1024, 2048, 4096, 8192, 10_000]), (1024, [1024]), (8, [8]),
])
def test_budgets_double_from_1k_and_end_at_max_new_tokens(max_new_tokens, expected):
    assert verdict.budgets(max_new_tokens) == expected


def test_a_correct_response_counts_from_the_budget_it_ended_within():
    samples = pd.DataFrame([
        response("base", 0, response_tokens=1024, correct=True),  # ended exactly at 1k: counts at 1k
        response("base", 1, response_tokens=1025, correct=True),  # from 2k on
        response("base", 2, response_tokens=500, correct=False),  # never
        response("base", 3, response_tokens=3000, correct=True, hit_max_tokens=True),  # cut: only at the budget
    ])
    curve = verdict.budget_curve(samples, max_new_tokens=3000)
    assert curve["budget"].tolist() == [1024, 2048, 3000]
    assert curve["accuracy"].tolist() == [0.25, 0.5, 0.75]
    assert curve["ended_share"].tolist() == [0.5, 0.75, 0.75]
    assert curve["accuracy"].iloc[-1] == verdict.measure_values(samples, ACCURACY)["accuracy"]


def test_budget_curve_is_per_model_and_set():
    samples = pd.DataFrame([response("base", 0, response_tokens=2000), response("finetuned", 0, response_tokens=900),
                            response("finetuned", 0, set="math500", response_tokens=900, correct=False)])
    curve = verdict.budget_curve(samples, max_new_tokens=2048).set_index(["model", "set", "budget"])["accuracy"]
    assert curve.to_dict() == {("base", "gsm8k", 1024): 0.0, ("base", "gsm8k", 2048): 1.0,
                               ("finetuned", "gsm8k", 1024): 1.0, ("finetuned", "gsm8k", 2048): 1.0,
                               ("finetuned", "math500", 1024): 0.0, ("finetuned", "math500", 2048): 0.0}


def test_budget_deltas_give_each_budgets_accuracy_delta_its_paired_interval():
    """60 problems: the fine-tuned model answers every one right within 1k tokens, the base model right but in
    1,500 tokens: at 1k the delta is 1 with a point interval, at 2k nothing differs."""
    rows = [response("base", p, response_tokens=1500) for p in range(60)] + [
        response("finetuned", p, response_tokens=600) for p in range(60)]
    budget = verdict.budget_deltas(pd.DataFrame(rows), max_new_tokens=2048, resamples=200)
    assert budget[["budget", "base", "finetuned", "delta", "low", "high"]].to_dict("records") == [
        {"budget": 1024, "base": 0.0, "finetuned": 1.0, "delta": 1.0, "low": 1.0, "high": 1.0},
        {"budget": 2048, "base": 1.0, "finetuned": 1.0, "delta": 0.0, "low": 0.0, "high": 0.0}]
    table = verdict.budget_markdown(budget.to_dict("records")).splitlines()
    assert table[0] == "| budget (tokens) | base accuracy | fine-tuned accuracy | delta [95% interval] |"
    assert table[2] == "| 1024 | 0.000 | 1.000 | 1.000 [1.000, 1.000] |"


def test_budget_curve_rejects_responses_longer_than_the_budget():
    with pytest.raises(verdict.VerdictError, match="max_new_tokens 1000"):
        verdict.budget_curve(pd.DataFrame([response("base", 0, response_tokens=1200)]), max_new_tokens=1000)


def set_result(problems: int, low: float, high: float, base_cut: float = 0.05, finetuned_cut: float = 0.0,
               finished: tuple[float, float] = (0.9, 0.95)) -> dict:
    return {"problems": problems, "measures": {
        "accuracy": {"base": 0.5, "finetuned": 0.52, "delta": 0.02, "low": low, "high": high,
                     "detectable": 2.8 * (high - low) / 3.92},
        "hit_max_tokens_share": {"base": base_cut, "finetuned": finetuned_cut},
        "finished_share": {"base": finished[0], "finetuned": finished[1]}}}


def test_the_detectable_line_states_the_smallest_accuracy_difference_the_set_can_see():
    assert verdict.detectable_line("math500", set_result(500, -0.01, 0.05)) == (
        "On math500 this evaluation separates accuracy differences of 4.3 points or more (80% of the time at 95% "
        "confidence); smaller ones read as *no detectable difference*. More problems or samples narrow it.")
    assert verdict.set_notes(set_result(500, -0.01, 0.05), 8192) == []


def test_set_notes_warn_of_few_problems_of_responses_cut_at_the_budget_and_of_finished_shares_apart():
    notes = verdict.set_notes(set_result(29, float("nan"), float("nan"), base_cut=0.11, finished=(0.6, 0.9)), 32)
    assert notes == ["Warning: only 29 problems; every interval here is wide.",
                     "Warning: 11% of base responses hit the 32-token budget; for them the budget, not the model, "
                     "decides the outcome (raise eval.max_new_tokens).",
                     "Warning: the models finished 60% (base) and 90% (fine-tuned) of their responses; measures over "
                     "responses compare different kinds of them."]
    assert verdict.set_notes(set_result(500, 0.0, 0.1, base_cut=0.10, finished=(0.6, 0.7)), 32) == []


def test_domain_deltas_resample_problems_within_each_group_and_carry_no_verdict_word():
    rows = []
    for problem in range(40):
        subject = "Algebra" if problem < 20 else "Geometry"
        for model in ("base", "finetuned"):
            improves = subject == "Algebra" and model == "finetuned"  # fine-tuned gains on algebra only
            rows.append(response(model, problem, subject=subject, level=f"level {problem % 2 + 1}",
                                 correct=improves or problem % 4 == 0))
    domains = verdict.domain_deltas(pd.DataFrame(rows), seed=0, resamples=500)
    accuracy = domains[domains["measure"] == "accuracy"].set_index(["by", "group"])
    assert set(accuracy.index) == {("subject", "Algebra"), ("subject", "Geometry"), ("level", "level 1"),
                                   ("level", "level 2")}
    algebra, geometry = accuracy.loc[("subject", "Algebra")], accuracy.loc[("subject", "Geometry")]
    assert algebra["problems"] == 20 and algebra["delta"] == pytest.approx(0.75) and algebra["low"] > 0
    assert geometry["delta"] == 0 and geometry["low"] == geometry["high"] == 0  # no problem differs there
    assert "verdict" not in domains.columns
    table = verdict.domain_markdown(domains.to_dict("records"))
    assert "| gsm8k | subject | Algebra | 20 | 0.250, 1.000, 0.750 [" in table


def test_a_set_without_groups_has_no_domain_rows():
    rows = [response(model, problem, subject="all", level="all") for problem in range(5)
            for model in ("base", "finetuned")]
    assert verdict.domain_deltas(pd.DataFrame(rows), resamples=50).empty


def test_the_detectable_line_does_not_claim_a_resolution_from_a_point_interval():
    assert verdict.detectable_line("gsm8k", set_result(500, 0.0, 0.0)) == (
        "On gsm8k no problem was answered differently by the two models: the accuracy interval is a point and cannot "
        "say which differences this set could show.")
