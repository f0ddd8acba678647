"""release: the adapter and its model card -> release/, ready for `hf upload USER/NAME release/ .`: the files of
models/adapter and a README.md with hub metadata, the data funnel, training, the verdict, usage and limits.

Nothing is pushed from here: uploading is the user's step, with their token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

from stages.core import cli, params
from stages.core.artifacts import atomic_dir
from stages.core.base_model import check_adapter
from stages.core.hub import is_hub_id
from stages.core.prompts import prompt_text
from stages.scoring import verdict

log = logging.getLogger("stages.release")  # not __name__: `python -m` runs a stage as __main__
TAGS = ["lora", "math", "reasoning", "deepseek-r1"]  # plus qlora and unsloth when the run used them (run_tags)
PROBLEM = "{problem}"  # the placeholder shown in the prompt format


class ReleaseError(cli.StageError):
    """An input of the release is missing or unreadable."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the card is written from: params sections and the upstream stages' outputs."""
    model: params.ModelParams
    data: params.DataParams
    eval_data: dict[str, params.EvalSetParams]
    train: params.TrainParams
    eval: params.EvalParams
    funnel: dict  # metrics/data.json
    splits: dict  # metrics/splits.json
    training: dict  # metrics/train.json
    run: dict  # reports/train_run.json: wall time, speed, memory
    report: dict  # reports/details.json
    prompt: str  # the exact prompt text with PROBLEM in place of the problem


def read_json(path: Path, stage: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ReleaseError(f"release: {path} not found; run the {stage} stage first (dvc repro {stage})") from e
    except json.JSONDecodeError as e:
        raise ReleaseError(f"release: {path} is not valid JSON ({e}); re-run the {stage} stage") from e


def run_tags(training: dict) -> list[str]:
    """The card's tags for how training actually ran (metrics/train.json), not how params asked for it: a CPU
    run with backend auto trains with PEFT in fp32, which is neither QLoRA nor Unsloth."""
    return TAGS + ["qlora"] * (training.get("base_weights") == "4-bit") + ["unsloth"] * (
        training.get("backend") == "unsloth")


def card_data(inputs: Inputs):
    from huggingface_hub import ModelCardData

    sources = [inputs.data.source] + [inputs.eval_data[name].source for name in inputs.eval.sets
                                      if name in inputs.eval_data]
    return ModelCardData(
        base_model=inputs.model.name if is_hub_id(inputs.model.name) else None, library_name="peft",
        datasets=list(dict.fromkeys(s for s in sources if is_hub_id(s))) or None, license="apache-2.0",
        tags=run_tags(inputs.training),
        pipeline_tag="text-generation")


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return "—" if value is None else str(value)


def _flat(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _table(header: tuple[str, str], rows: dict) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    return "\n".join(lines + [f"| `{k}` | {_value(v)} |" for k, v in rows.items()]) + "\n"


def funnel_section(inputs: Inputs) -> str:
    funnel = inputs.funnel
    dropped = {rule: n for rule, n in funnel.get("dropped", {}).items() if n}
    other = {k: v for k, v in funnel.items() if k not in ("rows_in", "rows_out", "dropped", "difficulty")}
    splits = ", ".join(f"{name} {split['rows']}" for name, split in inputs.splits.items())
    revision = f" (revision `{inputs.data.revision}`)" if is_hub_id(inputs.data.source) else ""
    source = f"`{inputs.data.source}`{revision}"
    lines = [f"From {funnel.get('rows_in')} rows of {source}, the filter kept {funnel.get('rows_out')} math "
             f"problems with their reasoning and answer (rules in order; a row counts under the first it breaks):", "",
             _table(("dropped by", "rows"), dropped)]
    if funnel.get("difficulty"):
        lines.append("Kept by difficulty: " + ", ".join(f"{d} {n}" for d, n in funnel["difficulty"].items()) + ".")
    if other:
        lines.append("Also: " + ", ".join(f"`{k}` {_value(v)}" for k, v in _flat(other).items()) + ".")
    heldout = " The test split is the `heldout` evaluation set." if params.HELDOUT in inputs.eval.sets else ""
    lines.append(f"Splits (stratified by difficulty, seeded): {splits} rows.{heldout}")
    return "\n".join(lines) + "\n"


def training_section(inputs: Inputs) -> str:
    config = _flat(dataclasses.asdict(inputs.train))
    return ("Parameters (`train` in params.yaml):\n\n" + _table(("param", "value"), config)
            + "\nResults (`metrics/train.json`):\n\n" + _table(("result", "value"), _flat(inputs.training))
            + "\nHow long it ran (`reports/train_run.json`; the last run, resumed ones counting from the resume):\n\n"
            + _table(("run", "value"), _flat(inputs.run)))


def results_section(inputs: Inputs) -> str:
    report, config = inputs.report, inputs.eval
    boot = report["bootstrap"]
    per_set = ", ".join(f"{name} {result['samples']}" for name, result in report["sets"].items())
    lines = [f"Base and fine-tuned wrote the same number of responses per problem ({per_set}; temperature "
             f"{config.temperature}, top-p {config.top_p}, at most {config.max_new_tokens} new tokens). Each delta "
             f"is fine-tuned minus base with a paired {boot['confidence']:.0%} bootstrap interval over problems; "
             "a claim is *better* or *worse* only when the interval excludes 0.", "",
             # JSON keeps an undefined value (tokens per correct answer without one) as null; the table shows n/a.
             verdict.verdict_markdown([{k: math.nan if v is None else v for k, v in row.items()}
                                       for row in report["verdict"]]),
             "Accuracy when generation stops at a smaller budget (a response counts if it was correct and ended "
             "within the budget):", ""]
    for set_name, result in report["sets"].items():
        lines += [f"**{set_name}** ({result['problems']} problems):", ""]
        lines += [verdict.budget_markdown(result["budget"])]
    if report.get("domains"):
        lines += ["By domain (MATH-500 subject and level, held-out difficulty):", "", verdict.MANY_COMPARISONS, "",
                  verdict.domain_markdown(report["domains"])]
    lines += ["Measures:", ""] + [f"- `{m.name}`: {m.meaning}" for m in verdict.MEASURES]
    return "\n".join(lines) + "\n"


def usage_section(inputs: Inputs) -> str:
    model, config = inputs.model, inputs.eval
    revision = f', revision="{model.revision}"' if is_hub_id(model.name) else ""
    context = config.max_new_tokens + 1024  # room for a prompt and the evaluation's budget
    content = 'problem + "\\n" + ' + json.dumps(model.directive) if model.directive else "problem"
    sampling = (f"max_new_tokens={config.max_new_tokens}, "
                + (f"do_sample=True, temperature={config.temperature}, top_p={config.top_p}" if config.temperature
                   else "do_sample=False"))
    return f"""With Unsloth (a CUDA GPU):

```python
from unsloth import FastLanguageModel

model, tokenizer = FastLanguageModel.from_pretrained("release", max_seq_length={context}, load_in_4bit=True)
FastLanguageModel.for_inference(model)
```

With transformers and PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{model.name}"{revision}, dtype="auto", device_map="auto")
model = PeftModel.from_pretrained(base, "release")
tokenizer = AutoTokenizer.from_pretrained("release")
```

Replace `"release"` with `USER/NAME` once uploaded. Prompt as in training and evaluation (the base model's chat
template, the problem then the directive, no system prompt), and generate as the evaluation did:

```python
messages = [{{"role": "user", "content": {content}}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                       return_dict=True).to(model.device)
output = model.generate(**inputs, {sampling})
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The exact prompt text, with `{PROBLEM}` in place of the problem:

```text
{inputs.prompt}
```
"""


def limitations_section() -> str:
    return """- The numbers above come from one run of this pipeline; the pipeline's own tests run on tiny and
  random-weight models, which check the mechanics (grading, statistics, loading), not the quality.
- Training data is synthetic: problems and reasoning generated by language models (Magpie), filtered but not checked
  for correctness. The `heldout` set's gold answers are the last `\\boxed{}` of those same synthetic answers.
- Decontamination (`filter.decontaminate`) drops training problems that repeat an evaluation problem (the same
  normalized text, or a shared run of `filter.contamination_ngram` words); paraphrases can slip through.
- English math only; the adapter is not meant for other tasks, and a long reasoning trace is not a proof.
- The card's metadata was not validated against the Hugging Face Hub (that needs the network). Check the licenses
  of the base model and of the training data before redistributing.
"""


def model_card(inputs: Inputs):
    """The README.md of the release: hub metadata, then the body."""
    from huggingface_hub import ModelCard

    short_name = inputs.model.name.rstrip("/").rsplit("/", 1)[-1]
    lora = inputs.train.lora
    body = f"""# {short_name} math LoRA (r1-math-lora)

A LoRA adapter (rank {lora.r}, alpha {lora.alpha}, on {", ".join(lora.target_modules)}) for
`{inputs.model.name}`, fine-tuned on math problems with long reasoning, aiming to reason more concisely and
with less second-guessing while staying accurate; the results say how far it got. Made by the r1-math-lora
DVC pipeline; every number below is recomputed by `dvc repro` from the params listed.

## Results

{results_section(inputs)}
## Training data

{funnel_section(inputs)}
## Training

{training_section(inputs)}
## Usage

{usage_section(inputs)}
## Limitations

{limitations_section()}"""
    return ModelCard(f"---\n{card_data(inputs).to_yaml()}\n---\n\n{body}")


def load_prompt(adapter: Path, directive: str) -> str:
    """The prompt exactly as training and evaluation render it, from the tokenizer saved with the adapter (its
    chat template and special tokens: the fast tokenizer's class suffices, and imports in half AutoTokenizer's
    seconds)."""
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(adapter)
    except (OSError, ValueError) as e:
        raise ReleaseError(f"release: cannot load the tokenizer saved in {adapter} ({e}); re-run the train stage "
                           "(dvc repro train) or dvc pull") from e
    return prompt_text(tokenizer, PROBLEM, directive=directive)


def assemble(adapter: Path, out: Path, card, model: params.ModelParams) -> None:
    """out = the adapter's files, its config pinned to the base model's revision, and the card as README.md."""
    config_file = adapter / "adapter_config.json"
    with atomic_dir(out) as tmp:
        for file in sorted(adapter.iterdir()):
            if file.is_file() and file.name != "README.md":  # PEFT's blank template; the card replaces it
                shutil.copyfile(file, tmp / file.name)
        config = json.loads(config_file.read_text())
        if is_hub_id(model.name) and config.get("base_model_name_or_path") == model.name:
            # AutoPeftModelForCausalLM loads the base at this revision: the one the adapter was trained on.
            config["revision"] = model.revision
            (tmp / config_file.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        card.save(tmp / "README.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True, help="in: train's LoRA adapter")
    parser.add_argument("--details", type=Path, required=True,
                        help="in: report's details.json (verdict and budget tables)")
    parser.add_argument("--data-metrics", type=Path, required=True,
                        help="in: filter's funnel, for the card")
    parser.add_argument("--splits-metrics", type=Path, required=True,
                        help="in: stratify's split sizes, for the card")
    parser.add_argument("--train-metrics", type=Path, required=True,
                        help="in: train's metrics, for the card")
    parser.add_argument("--train-run", type=Path, required=True,
                        help="in: train's wall time, speed and memory, for the card")
    parser.add_argument("--out", type=Path, required=True,
                        help="out: the adapter files and the model card (README.md), ready to upload")
    args = parser.parse_args(argv)

    model = params.load("model")
    check_adapter(args.adapter, model, "release")
    inputs = Inputs(model=model, data=params.load("data"), eval_data=params.load("eval_data"),
                    train=params.load("train"), eval=params.load("eval"),
                    funnel=read_json(args.data_metrics, "filter"), splits=read_json(args.splits_metrics, "stratify"),
                    training=read_json(args.train_metrics, "train"), run=read_json(args.train_run, "train"),
                    report=read_json(args.details, "report"),
                    prompt=load_prompt(args.adapter, model.directive))
    assemble(args.adapter, args.out, model_card(inputs), model)
    log.info("release: %s ready; upload with: hf upload USER/NAME %s .", args.out, args.out)


if __name__ == "__main__":
    cli.run(main)
