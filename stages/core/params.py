"""The schema of params.yaml: one frozen pydantic dataclass per section, and the loaders the stages call.

Each stage loads only its own section (plus the shared ones), so DVC re-runs exactly what a change touches.
Validation reports every problem of a section at once, with its key path, as one ParamsError on one line.
Types are strict (no "yes" for a bool, no bool for an int, no "2e-4" string for a float) except that an int
is accepted, and stored, as a float.
"""

import difflib
import functools
import logging
import re
from pathlib import Path
from typing import Annotated, Literal

import pydantic
import yaml
from pydantic import ConfigDict, Field, PlainValidator, StrictBool, StrictFloat, StrictInt, TypeAdapter
from pydantic_core import ArgsKwargs

from stages.core.cli import StageError

log = logging.getLogger(__name__)
PARAMS_FILE = "params.yaml"
DIFFICULTIES = ("very easy", "easy", "medium", "hard", "very hard")
INPUT_QUALITIES = ("very poor", "poor", "average", "good", "excellent")
EVAL_FORMATS = ("gsm8k", "math500")
HELDOUT = "heldout"  # the evaluation set made from our own test split
MODELS = BASE, FINETUNED = ("base", "finetuned")  # the two models every evaluation compares
# transformers' SchedulerType and OptimizerNames (5.17; tests/core/test_params.py holds them to the installed
# transformers): a typo fails with the rest of params.yaml, not when training starts, and without importing it here
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
              "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
              "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
              "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
              "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
              "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise",
              "lomo", "adalomo", "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd",
              "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw")


class ParamsError(StageError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


def _only(ok, what: str) -> PlainValidator:
    """Accept value if ok(value), else fail with `what`: one problem, where a union reports one per member."""
    def check(value):
        if not ok(value):
            raise ValueError(what)
        return value
    return PlainValidator(check)


def _closest(value, names) -> str | None:
    """The name most like value (a typo's likely fix), if it is text and one is close."""
    close = difflib.get_close_matches(value, names, n=1) if type(value) is str else []
    return close[0] if close else None


def _one_of(names: tuple[str, ...], what: str) -> PlainValidator:
    """Accept one of names, else fail naming `what` and the closest name (a typo's likely fix)."""
    def check(value):
        if type(value) is str and value in names:
            return value
        close = _closest(value, names)
        raise ValueError(f"must be {what}" + (f" (the closest: {close!r})" if close else ""))
    return PlainValidator(check)


Positive = Annotated[StrictInt, Field(gt=0)]
AutoOrPositive = Annotated[int | Literal["auto"], _only(lambda v: v == "auto" or (type(v) is int and v > 0),
                                                        "must be 'auto' or a positive integer")]
NonEmpty = Field(min_length=1)
SCIENTIFIC = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\s*")  # 2e-4: YAML 1.1 reads it as text


def _problems(error: pydantic.ValidationError, section: str) -> str:
    """One line listing every problem in error, each under its key path (section.key.sub[index])."""
    problems = []
    for e in error.errors():
        key = section + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"] if p != "[key]")
        if e["type"] in ("missing", "missing_argument"):
            problems.append(f"{key} is missing")
        elif e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            problems.append(f"unknown key {key}")
        else:
            what = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"][0].lower() + e["msg"][1:]
            got = "" if isinstance(e["input"], dict | ArgsKwargs) else f", got {e['input']!r}"
            if e["type"] == "float_type" and isinstance(e["input"], str) and SCIENTIFIC.fullmatch(e["input"]):
                text, dotted = e["input"].strip(), _dotted(e["input"])
                got = f", got {text!r} " + (f"(YAML reads {text} as text: write it with a dot, {dotted})"
                                             if dotted != text else "(text: write it without quotes)")
            problems.append(f"{key}: {what}{got}")
    return "params: " + "; ".join(problems)


def _dotted(text: str) -> str:
    """2e-4 -> 2.0e-4, 1e5 -> 1.0e+5: the spelling YAML 1.1 (PyYAML) reads as a float (a dot, a signed exponent)."""
    mantissa, _, exponent = text.strip().lower().partition("e")
    if exponent and exponent[0] not in "+-":
        exponent = "+" + exponent
    return (mantissa if "." in mantissa else mantissa + ".0") + (f"e{exponent}" if exponent else "")


def _section(section: str):
    """Make cls a frozen pydantic dataclass that forbids unknown keys and raises ParamsError when built directly."""
    def wrap(cls):
        cls = pydantic.dataclasses.dataclass(cls, frozen=True, config=ConfigDict(extra="forbid"))
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except pydantic.ValidationError as e:
                raise ParamsError(_problems(e, section)) from None

        cls.__init__ = __init__
        return cls
    return wrap


@_section("data")
class DataParams:
    source: str  # hub dataset id, or a local Parquet file / directory
    revision: str  # hub commit; ignored for local sources
    files: str  # glob of the Parquet shards inside the hub dataset


@_section("model")
class ModelParams:
    name: str  # hub model id or local directory
    revision: str  # hub commit; ignored for local directories
    max_seq_length: Positive  # tokens of one training example, prompt included
    directive: str  # line after the problem in every prompt, training and evaluation alike; "": none


@_section("filter")
class FilterParams:
    id_column: str
    task_categories: Annotated[list[str], NonEmpty]
    input_qualities: Annotated[list[Literal[INPUT_QUALITIES]], NonEmpty]
    difficulties: Annotated[list[Literal[DIFFICULTIES]], NonEmpty]
    require_think_open: StrictBool
    deduplicate: StrictBool
    check_length: StrictBool
    decontaminate: StrictBool
    contamination_ngram: Annotated[StrictInt, Field(ge=5)]  # words
    max_second_guesses_per_1k: Annotated[StrictFloat, Field(gt=0)] | None  # None: keep every rate
    workers: AutoOrPositive  # processes screening rows at once; auto: every core this process may use

    @pydantic.model_validator(mode="after")
    def _second_guess_rule_counts_tokens(self):
        if self.max_second_guesses_per_1k is not None and not self.check_length:
            raise ValueError("max_second_guesses_per_1k needs check_length: true (reasoning tokens are counted "
                             "with the base model's tokenizer)")
        return self


@_section("stratify")
class StratifyParams:
    train_fraction: Annotated[StrictFloat, Field(gt=0, le=1)]
    val_fraction: Annotated[StrictFloat, Field(ge=0, le=1)]
    test_fraction: Annotated[StrictFloat, Field(ge=0, le=1)]
    max_per_difficulty: Positive | None = None  # None: no cap

    @pydantic.model_validator(mode="after")
    def _fractions_sum_to_one(self):
        fractions = (self.train_fraction, self.val_fraction, self.test_fraction)
        if abs(sum(fractions) - 1) > 1e-9:
            raise ValueError(f"train_fraction + val_fraction + test_fraction must sum to 1, "
                             f"got {' + '.join(map(str, fractions))} = {sum(fractions):g}")
        return self


@_section("train.lora")
class LoraParams:
    r: Positive
    alpha: Positive
    dropout: Annotated[StrictFloat, Field(ge=0, lt=1)]
    target_modules: Annotated[list[str], NonEmpty]


@_section("train")
class TrainParams:
    backend: Literal["auto", "unsloth", "peft"]
    load_in_4bit: StrictBool
    lora: LoraParams
    sequences_per_step: Positive
    micro_batch_size: AutoOrPositive
    learning_rate: Annotated[StrictFloat, Field(gt=0)]
    epochs: Annotated[StrictFloat, Field(gt=0)]
    warmup: Annotated[StrictFloat, Field(ge=0, lt=1)]  # fraction of the optimizer steps
    lr_scheduler: Annotated[str, _one_of(LR_SCHEDULERS, "a schedule transformers knows (SchedulerType)")]
    weight_decay: Annotated[StrictFloat, Field(ge=0)]
    optimizer: Annotated[str, _one_of(OPTIMIZERS, "an optimizer transformers knows (OptimizerNames)")]
    eval_every_steps: Positive
    max_val_rows: Positive | None  # None: all
    early_stopping_patience: Annotated[StrictInt, Field(ge=0)]  # 0: off
    max_steps: Annotated[int, _only(lambda v: type(v) is int and (v == -1 or v > 0), "must be -1 (no cap) or positive")]
    packing: StrictBool
    gradient_checkpointing: StrictBool | Literal["auto"]  # auto: off when it fits in GPU memory
    num_gpus: Positive
    merge_16bit: StrictBool

    @pydantic.model_validator(mode="after")
    def _micro_batches_fill_a_step(self):
        if self.micro_batch_size != "auto" and self.sequences_per_step % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide sequences_per_step="
                             f"{self.sequences_per_step} (and, with several GPUs, sequences_per_step / GPUs)")
        return self


@_section("eval_data.<set>")
class EvalSetParams:
    source: str  # hub dataset id, or a local Parquet / JSON-lines file or folder
    revision: str
    files: str  # glob of the file(s) inside the hub dataset
    format: Literal[EVAL_FORMATS]  # how to read problem and gold answer


@_section("eval")
class EvalParams:
    sets: Annotated[list[str], NonEmpty]
    limit: Positive | None  # None: all
    samples: Positive | dict[str, Positive]  # a number for every set, or per set ('default': the rest, else 1)
    temperature: Annotated[StrictFloat, Field(ge=0)]  # 0: greedy
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)]
    max_new_tokens: Positive
    batching: Literal["continuous", "padded"]
    batch_size: AutoOrPositive
    static_cache: StrictBool
    kv_cache: Literal["model", "fp8"]  # continuous: the KV cache's keys and values in the model's dtype, or 8-bit
    num_gpus: AutoOrPositive  # processes generating at once, one per GPU; auto: every visible GPU (1 on CPU)
    loop_ngram: Positive  # words, at least, in each copy of a loop
    loop_repeats: Annotated[StrictInt, Field(ge=2)]  # copies in a row

    def samples_of(self, set_name: str) -> int:
        """Responses per problem of one set."""
        if isinstance(self.samples, int):
            return self.samples
        return self.samples.get(set_name, self.samples.get("default", 1))


SECTIONS = {"data": DataParams, "model": ModelParams, "filter": FilterParams, "stratify": StratifyParams,
            "train": TrainParams, "eval": EvalParams}


def build(cls, raw, section: str):
    """raw validated as cls (a dataclass above, or any type pydantic knows); every problem in one ParamsError."""
    try:
        return TypeAdapter(cls).validate_python(raw)
    except pydantic.ValidationError as e:
        raise ParamsError(_problems(e, section)) from None


def read(path: str | Path = PARAMS_FILE) -> dict:
    """The raw params mapping; a missing or malformed file is an error naming it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ParamsError(f"params: {path} not found (run from the project root)") from e
    except UnicodeDecodeError as e:
        raise ParamsError(f"params: {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"params: {_yaml_problem(path, e)}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"params: {path} must hold a mapping of sections")
    return raw


def _yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    """A YAML syntax error as one line, at the place it began (an unclosed quote's line, not the file's end)."""
    context, problem = getattr(error, "context", None), getattr(error, "problem", None)
    context_mark, problem_mark = getattr(error, "context_mark", None), getattr(error, "problem_mark", None)
    mark = context_mark or problem_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    said = ", ".join(filter(None, [context, problem])) or str(error)
    if context_mark and problem_mark and problem_mark.line != context_mark.line:
        said += f" (line {problem_mark.line + 1})"
    return f"{where} is not valid YAML: {' '.join(said.split())}"


def load(section: str, path: str | Path = PARAMS_FILE):
    """One section of params.yaml as its dataclass; eval_data as a mapping of set name -> EvalSetParams."""
    raw = read(path)
    if section not in raw:
        raise ParamsError(f"params: section '{section}' missing in {path}")
    config = build(dict[str, EvalSetParams] if section == "eval_data" else SECTIONS[section], raw[section], section)
    log.info("params %s: %s", section, config)
    return config


def load_seed(path: str | Path = PARAMS_FILE) -> int:
    """The shared seed (top-level key `seed`)."""
    raw = read(path)
    if "seed" not in raw:
        raise ParamsError(f"params: seed missing in {path}")
    return build(StrictInt, raw["seed"], "seed")


def check_all(path: str | Path = PARAMS_FILE) -> None:
    """Every section of params.yaml and the rules across sections, without loading any data: a stage calls it
    before it touches anything (core/cli.py), so the first stage that runs catches a params error anywhere
    (a typo in eval.sets fails in seconds, not after training)."""
    raw = read(path)
    known = (*SECTIONS, "eval_data", "seed")
    for section in raw:  # first: a misspelt section is also a missing one, and its name says more
        if section not in known:
            close = _closest(section, known)
            read_as = "" if type(section) is str else f" (a key YAML reads as {type(section).__name__}: quote it)"
            raise ParamsError(f"params: unknown section '{section}'{read_as} in {path}" + (
                f" (did you mean '{close}'?)" if close else f"; the sections: {', '.join(known)}"))
    for section in known:
        if section not in raw:
            raise ParamsError(f"params: section '{section}' missing in {path}")
    sections = {name: build(cls, raw[name], name) for name, cls in SECTIONS.items()}
    eval_data = build(dict[str, EvalSetParams], raw["eval_data"], "eval_data")
    build(StrictInt, raw["seed"], "seed")
    unknown = [name for name in sections["eval"].sets if name != HELDOUT and name not in eval_data]
    if unknown:
        raise ParamsError(f"params: eval.sets names {', '.join(map(repr, unknown))}, which eval_data does not define; "
                          f"known sets: {', '.join([HELDOUT, *eval_data])}. Fix eval.sets or add the set to eval_data")
    samples = sections["eval"].samples
    unknown = [name for name in samples if name not in (HELDOUT, *eval_data, "default")] if isinstance(
        samples, dict) else []
    if unknown:
        raise ParamsError(f"params: eval.samples names {', '.join(map(repr, unknown))}, which is no evaluation set; "
                          f"use {', '.join([HELDOUT, *eval_data])} or 'default'")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stages.core.params",
                                     description="Check a params file as every stage checks it before it runs.")
    parser.add_argument("path", nargs="?", type=Path, default=Path(PARAMS_FILE), help="default: %(default)s")
    path = parser.parse_args(argv).path
    check_all(path)
    logging.getLogger("stages.params").info("%s: every section, and the rules across them, hold", path)


if __name__ == "__main__":
    from stages.core import cli

    cli.run(main, check_params=False)
