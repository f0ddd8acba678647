"""Typed, validated views of params.yaml: one frozen dataclass per section.

Each stage loads only its own section (plus the shared ones), so DVC re-runs exactly what a change touches.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.cli import StageError

PARAMS_FILE = "params.yaml"
DIFFICULTIES = ("very easy", "easy", "medium", "hard", "very hard")
INPUT_QUALITIES = ("very poor", "poor", "average", "good", "excellent")


class ParamsError(StageError):
    """A params.yaml value is missing, unknown or out of range."""


@dataclass(frozen=True)
class DataParams:
    source: str  # hub dataset id, or a local Parquet file / directory
    revision: str  # hub commit; ignored for local sources
    files: str  # glob of the Parquet shards inside the hub dataset


@dataclass(frozen=True)
class ModelParams:
    name: str  # hub model id or local directory
    revision: str  # hub commit; ignored for local directories
    max_seq_length: int  # tokens of one training example, prompt included

    def __post_init__(self):
        _require(self.max_seq_length > 0, "model.max_seq_length", "must be a positive number of tokens")


@dataclass(frozen=True)
class FilterParams:
    id_column: str
    task_categories: list[str]
    input_qualities: list[str]
    difficulties: list[str]
    require_think_open: bool
    deduplicate: bool
    check_length: bool
    decontaminate: bool
    contamination_ngram: int

    def __post_init__(self):
        _require(bool(self.task_categories), "filter.task_categories", "must list at least one category")
        _require(self.contamination_ngram >= 5, "filter.contamination_ngram", "must be at least 5 words")
        for key, allowed in (("input_qualities", INPUT_QUALITIES), ("difficulties", DIFFICULTIES)):
            values = getattr(self, key)
            unknown = sorted(set(values) - set(allowed))
            _require(bool(values) and not unknown, f"filter.{key}",
                     f"must be a non-empty subset of {list(allowed)}, got unknown {unknown}")


@dataclass(frozen=True)
class StratifyParams:
    train_fraction: float
    val_fraction: float
    test_fraction: float
    max_per_difficulty: int | None = None

    def __post_init__(self):
        fractions = (self.train_fraction, self.val_fraction, self.test_fraction)
        _require(all(0 <= f <= 1 for f in fractions), "stratify.*_fraction", "each must lie in [0, 1]")
        _require(abs(sum(fractions) - 1) < 1e-9, "stratify.*_fraction",
                 f"must sum to 1, got {' + '.join(map(str, fractions))} = {sum(fractions):g}")
        _require(self.train_fraction > 0, "stratify.train_fraction", "must be above 0")
        _require(self.max_per_difficulty is None or self.max_per_difficulty > 0,
                 "stratify.max_per_difficulty", "must be null (no cap) or a positive row count")


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]

    def __post_init__(self):
        _require(self.r > 0 and self.alpha > 0, "train.lora.r/alpha", "must be positive")
        _require(0 <= self.dropout < 1, "train.lora.dropout", "must lie in [0, 1)")
        _require(bool(self.target_modules), "train.lora.target_modules", "must name at least one module")


@dataclass(frozen=True)
class TrainParams:
    backend: typing.Literal["auto", "unsloth", "peft"]
    load_in_4bit: bool
    lora: LoraParams
    sequences_per_step: int
    micro_batch_size: int | typing.Literal["auto"]
    learning_rate: float
    epochs: float
    warmup: float
    lr_scheduler: str
    weight_decay: float
    optimizer: str
    eval_every_steps: int
    max_val_rows: int | None
    early_stopping_patience: int
    max_steps: int
    packing: bool
    gradient_checkpointing: bool
    num_gpus: int
    merge_16bit: bool

    def __post_init__(self):
        _require(self.sequences_per_step > 0, "train.sequences_per_step", "must be positive")
        _require(self.micro_batch_size == "auto" or self.micro_batch_size > 0, "train.micro_batch_size",
                 "must be 'auto' or a positive number of sequences")
        _require(self.learning_rate > 0, "train.learning_rate", "must be positive")
        _require(self.epochs > 0, "train.epochs", "must be positive")
        _require(0 <= self.warmup < 1, "train.warmup", "is a fraction of the optimizer steps, in [0, 1)")
        _require(self.eval_every_steps > 0, "train.eval_every_steps", "must be positive")
        _require(self.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0 (0: off)")
        _require(self.max_steps == -1 or self.max_steps > 0, "train.max_steps", "must be -1 (no cap) or positive")
        _require(self.num_gpus >= 1, "train.num_gpus", "must be at least 1")
        _require(self.max_val_rows is None or self.max_val_rows > 0, "train.max_val_rows",
                 "must be null (all) or positive")


EVAL_FORMATS = ("gsm8k", "math500")


@dataclass(frozen=True)
class EvalSetParams:
    source: str  # hub dataset id, or a local Parquet / JSON-lines file or folder
    revision: str
    files: str  # glob of the file(s) inside the hub dataset
    format: str  # how to read problem and gold answer: gsm8k | math500

    def __post_init__(self):
        _require(self.format in EVAL_FORMATS, "eval_data.<set>.format",
                 f"must be one of {list(EVAL_FORMATS)}, got {self.format!r}")


@dataclass(frozen=True)
class EvalParams:
    sets: list[str]
    limit: int | None
    samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int | typing.Literal["auto"]
    static_cache: bool
    second_guess_markers: list[str]
    loop_ngram: int
    loop_repeats: int

    def __post_init__(self):
        _require(bool(self.sets), "eval.sets", "must name at least one set")
        _require(self.limit is None or self.limit > 0, "eval.limit", "must be null (all) or positive")
        _require(self.samples > 0, "eval.samples", "must be positive")
        _require(self.temperature >= 0, "eval.temperature", "must be >= 0 (0: greedy)")
        _require(0 < self.top_p <= 1, "eval.top_p", "must lie in (0, 1]")
        _require(self.max_new_tokens > 0, "eval.max_new_tokens", "must be positive")
        _require(self.batch_size == "auto" or self.batch_size > 0, "eval.batch_size", "must be 'auto' or positive")
        _require(self.loop_ngram > 0 and self.loop_repeats > 1, "eval.loop_ngram/loop_repeats",
                 "must be positive, and repeats at least 2")


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ParamsError(f"params: {key} {what}")


def _check_type(value, annotation, key: str):
    """Return value if it matches annotation (int accepted for float), else raise naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, key)
            except ParamsError:
                continue
        raise ParamsError(f"params: {key} must be {annotation}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
        raise ParamsError(f"params: {key} must be one of {list(typing.get_args(annotation))}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, key)
    if annotation is type(None):
        if value is None:
            return None
        raise ParamsError(f"params: {key} must be null, got {value!r}")
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ParamsError(f"params: {key} must be a mapping, got {value!r}")
        return {_check_type(k, key_type, key): _check_type(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ParamsError(f"params: {key} must be a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ParamsError(f"params: {key} must be an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ParamsError(f"params: {key} must be {annotation.__name__}, got {value!r}")
    return value


def build(cls, raw, section: str):
    """Build dataclass cls from the mapping raw, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params: section '{section}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"params: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)} "
                          f"(allowed: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING:
                raise ParamsError(f"params: {key} is missing")
            continue
        values[name] = _check_type(raw[name], hints[name], key)
    return cls(**values)


def read(path: str | Path = PARAMS_FILE) -> dict:
    """The raw params mapping; a missing or malformed file is an error naming it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ParamsError(f"params: {path} not found (run from the project root)") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"params: {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"params: {path} must hold a mapping of sections")
    return raw


SECTIONS = {"data": DataParams, "model": ModelParams, "filter": FilterParams, "stratify": StratifyParams,
            "train": TrainParams, "eval": EvalParams}
HELDOUT = "heldout"  # the evaluation set made from our own test split


def load(section: str, path: str | Path = PARAMS_FILE):
    """One section of params.yaml as its dataclass."""
    raw = read(path)
    if section not in raw:
        raise ParamsError(f"params: section '{section}' missing in {path}")
    if section == "eval_data":  # a mapping of set name -> set
        sets = _check_type(raw[section], dict[str, dict], section)
        return {name: build(EvalSetParams, value, f"{section}.{name}") for name, value in sets.items()}
    return build(SECTIONS[section], raw[section], section)


def load_seed(path: str | Path = PARAMS_FILE) -> int:
    """The shared seed (top-level key `seed`)."""
    raw = read(path)
    if "seed" not in raw:
        raise ParamsError(f"params: seed missing in {path}")
    return _check_type(raw["seed"], int, "seed")
