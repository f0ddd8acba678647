"""Benchmark: training throughput of the HF + PEFT + bitsandbytes 4-bit baseline against the train
stage's default path, side by side in one run, on the real 1.5B shape (random weights) with ragged
sequence lengths up to 4096 and 16 sequences per optimizer step.

    python -m tests.random_model /tmp/r1
    python -m bench.train_speed /tmp/r1 [--steps 12] [--warmup-steps 6] [--routes]
    python -m bench.train_speed /tmp/r1 --repeats 3 --out bench/results --commit SHA   # the recorded protocol

The first six steps are not timed: the default's early steps run slower (compilation for new micro-batch
lengths, probably), which a long run does not feel; the baseline's steps are flat from the start.

Each variant runs in its own process (Unsloth patches transformers on import). Reports tokens/s,
median step time, peak GPU memory and MFU (6 x non-embedding parameters x tokens/s over the GPU's
dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stages.core import params

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense, SXM
# name -> overrides of params.yaml's train section
VARIANTS = {
    "baseline: HF + PEFT + bnb 4-bit, 2 x 8, padded": dict(backend="peft", micro_batch_size=2, packing=False,
                                                           gradient_checkpointing=True),
    "unsloth 4-bit, 2 x 8, padded": dict(backend="unsloth", micro_batch_size=2, packing=False,
                                         gradient_checkpointing=True),
    "train stage default (params.yaml)": dict(),
}
BASELINE, DEFAULT = list(VARIANTS)[0], list(VARIANTS)[-1]
# Routes toward a faster default (--routes): the whole step as one packed micro-batch, activations kept
# instead of recomputed, 16-bit LoRA beside the seed's 4-bit. Same 16 sequences per step and learning rate.
ROUTES = {
    "old default: unsloth 4-bit, 8 x 2 packed, checkpointing on": dict(gradient_checkpointing=True),
    "unsloth 4-bit, 16 x 1 packed, checkpointing on": dict(micro_batch_size=16),
    "unsloth 4-bit, 8 x 2 packed, checkpointing off": dict(gradient_checkpointing=False),
    "unsloth 4-bit, 16 x 1 packed, checkpointing off": dict(micro_batch_size=16, gradient_checkpointing=False),
    "unsloth 16-bit, 16 x 1 packed, checkpointing off": dict(micro_batch_size=16, gradient_checkpointing=False,
                                                             load_in_4bit=False),
}


def synthetic_examples(count: int, vocab: int, max_len: int, seed: int, min_len: int = 256):
    """The train stage's own dataset type: random token ids, each sequence's first 100 tokens masked as prompt."""
    import numpy as np

    from stages.training import data as train_data

    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(count)]
    ids = np.random.default_rng(seed).integers(10, vocab, sum(lengths), dtype=np.int32)
    starts = np.cumsum([0, *lengths])
    return train_data.Examples([ids[a:b] for a, b in zip(starts, starts[1:], strict=False)], [100] * count)


def run_variant(model_dir: str, overrides: dict, steps: int, warmup_steps: int, min_length: int = 256) -> dict:
    config = params.build(params.TrainParams, params.read(ROOT / "params.yaml")["train"] | overrides, "train")
    model_params = params.ModelParams(name=model_dir, revision="main", max_seq_length=4096, directive="")
    from stages.training import choices as train_choices
    from stages.training import data as train_data
    from stages.training import model as train_model
    from stages.training import output as train_output

    backend = train_choices.resolve_backend(config.backend)
    if backend == "unsloth":
        import unsloth  # noqa: F401
    import torch
    from transformers import AutoTokenizer, set_seed

    from stages.training.order import BalancedTrainer, attention_weight

    set_seed(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    micro = train_choices.micro_batch_size(config, memory)
    checkpointing, _ = train_choices.gradient_checkpointing(config, backend, micro, model_params.max_seq_length,
                                                            train_model.check_model_limits(model_params), memory)
    if backend == "unsloth":
        model, tokenizer = train_model.load_unsloth(model_params, config, seed=0, checkpointing=checkpointing)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = train_model.load_peft(model_params, config, checkpointing)
    examples = synthetic_examples(config.sequences_per_step * steps, model.config.vocab_size, 4096, seed=0,
                                  min_len=min_length)

    clock = train_output.step_clock(synchronize=True)
    with tempfile.TemporaryDirectory() as out:
        args = train_choices.training_arguments(config, Path(out), micro, seed=0)
        args.max_steps, args.eval_strategy, args.save_strategy = steps, "no", "no"
        args.load_best_model_at_end, args.logging_steps, args.disable_tqdm = False, 1, True
        trainer = BalancedTrainer(model=model, args=args, train_dataset=examples,
                                  data_collator=train_data.collator(tokenizer, config.packing), callbacks=[clock],
                                  attention_weight=attention_weight(model.config))
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
    step_seconds = [b[0] - a[0] for a, b in zip(clock.marks[warmup_steps - 1:], clock.marks[warmup_steps:],
                                                  strict=False)]
    embedding = model.get_input_embeddings().weight
    base_params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    tokens_per_second = clock.tokens_per_second_since(warmup_steps - 1)
    gpu = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)
    non_embedding = base_params - embedding.numel()
    losses = [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry]
    return {"backend": backend, "micro_batch": micro, "accumulation": args.gradient_accumulation_steps,
            "losses": losses,
            "gradient_checkpointing": checkpointing,
            "packing": config.packing, "tokens_per_second": round(tokens_per_second),
            "median_step_seconds": round(statistics.median(step_seconds), 2),
            "step_seconds": [round(t, 2) for t in step_seconds],
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "mfu": round(6 * non_embedding * tokens_per_second / peak, 3) if peak else None, "gpu": gpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=6)
    parser.add_argument("--routes", action="store_true", help="also measure the candidate routes (ROUTES)")
    parser.add_argument("--only", help="comma-separated substrings: measure only the variants whose name has one")
    parser.add_argument("--min-length", type=int, default=256, help="shortest sequence (4096: the worst case)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="N > 1: only the baseline and the default, alternating, N times each; medians reported")
    parser.add_argument("--out", type=Path, help="folder to write the result JSON to (bench/results)")
    parser.add_argument("--commit", default="", help="the commit measured, for the JSON (no git on the GPU machine)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants = VARIANTS | ROUTES
    if args.variant:
        print("RESULT", json.dumps(run_variant(args.model_dir, variants[args.variant], args.steps, args.warmup_steps,
                                               args.min_length)))
        return
    names = list(VARIANTS) + (list(ROUTES) if args.routes else [])
    if args.only:
        names = [name for name in names if any(part in name for part in args.only.split(","))]
    if args.repeats > 1:
        names = [BASELINE, DEFAULT] * args.repeats
    runs: dict[str, list[dict]] = {}
    for name in names:
        run = subprocess.run([sys.executable, "-m", "bench.train_speed", args.model_dir, "--steps", str(args.steps),
                              "--warmup-steps", str(args.warmup_steps), "--min-length", str(args.min_length),
                              "--variant", name],
                             capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)  # noqa: E741
        runs.setdefault(name, []).append(json.loads(line[7:]) if line else {"error": run.stderr[-2000:]})
        print(name, json.dumps(runs[name][-1]), flush=True)

    def median_tokens(name: str) -> float | None:
        speeds = [r["tokens_per_second"] for r in runs.get(name, []) if "tokens_per_second" in r]
        return statistics.median(speeds) if speeds else None

    base, default = median_tokens(BASELINE), median_tokens(DEFAULT)
    gpu = next((r["gpu"] for rs in runs.values() for r in rs if "gpu" in r), None)
    result = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "commit": args.commit,
              "workload": {"steps": args.steps, "warmup_steps": args.warmup_steps, "min_length": args.min_length,
                           "max_length": 4096, "sequences_per_step": 16},
              "tokens_per_second": default, "speedup": round(default / base, 2) if base and default else None,
              "runs": runs}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        model = re.search(r"[A-Z]\d{2,4}", gpu or "")  # "NVIDIA H100 80GB HBM3" -> h100
        name = f"train-{result['date']}-{model[0].lower() if model else 'cpu'}-{args.commit or 'local'}.json"
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
