"""Benchmark: evaluation generation throughput, HF `generate` (dynamic cache, LoRA as PEFT layers,
batch 256) against the evaluate stage's route (LoRA merged into bf16 weights, prompts sorted by length,
static KV cache so transformers compiles the forward), side by side in one run, on the real 1.5B shape
(random weights: no response ends early), ~100-token prompts, sampling as the model card says.

    python -m tests.random_model /tmp/r1 && python -m bench.generate_speed /tmp/r1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stages import generation, params
from stages.prompts import prompt_text
from tests import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def random_adapter(model_dir: str, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = params.load("train", ROOT / "params.yaml").lora
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=config.target_modules,
                      init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


def prompts(tokenizer, count: int) -> list[str]:
    words = "find the value of x if two x plus three equals seven and explain each step".split()
    # No model.directive: the prompts keep the length the recorded results were measured with.
    return [prompt_text(tokenizer, " ".join(words[(i + j) % len(words)] for j in range(40)), directive="")
            for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--baseline-prompts", type=int, default=256, help="one batch of 256 for the baseline")
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", default="auto", help="the stage's batch size: auto (default) or a number")
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_model.add_chat_template(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    adapter = random_adapter(args.model_dir, Path("/tmp/bench-adapter"))
    config = params.load("eval", ROOT / "params.yaml")
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    config = params.EvalParams(**{**config.__dict__, "max_new_tokens": args.new_tokens, "batch_size": batch,
                                  "static_cache": True})
    texts = prompts(tokenizer, args.prompts)
    prompt_tokens = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    results = {"gpu": torch.cuda.get_device_name(0), "prompt_tokens": prompt_tokens, "new_tokens": args.new_tokens}

    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, device_map={"": 0})
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(texts[:args.baseline_prompts], add_special_tokens=False, return_tensors="pt",
                      padding=True).to("cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=True, temperature=0.6,
                                top_p=0.95, pad_token_id=tokenizer.eos_token_id)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = (output.shape[1] - batch["input_ids"].shape[1]) * output.shape[0]
    results["baseline"] = {"route": "HF generate, dynamic cache, PEFT LoRA layers", "prompts": args.baseline_prompts,
                           "batch": args.baseline_prompts, "seconds": round(seconds, 1),
                           "tokens_per_second": round(generated / seconds)}
    print(json.dumps(results["baseline"]), flush=True)
    del model, base, output
    torch.cuda.empty_cache()

    model_params = params.ModelParams(name=args.model_dir, revision="main", max_seq_length=4096, directive="")
    model = generation.load_model(model_params, adapter)
    stage_batch = generation.batch_size(config, model, prompt_tokens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = generation.generate(model, tokenizer, texts, config, seed=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = sum(o.n_tokens for o in outputs)
    results["stage"] = {"route": "merged bf16, sorted batches, static cache + compile (compile time included)",
                        "prompts": args.prompts, "batch": stage_batch, "seconds": round(seconds, 1),
                        "tokens_per_second": round(generated / seconds),
                        "peak_gpu_memory_gib": round(torch.cuda.max_memory_reserved() / 2**30, 1)}
    results["speedup"] = round(results["stage"]["tokens_per_second"] / results["baseline"]["tokens_per_second"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
