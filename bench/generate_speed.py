"""Benchmark: the evaluate stage's generation routes side by side in one run, on the real 1.5B shape
with random weights and a random merged LoRA, ~100-token prompts, sampling as the model card says.

Workloads: `real-length` ends each response (EOS forced: random weights never stop) at a length drawn
from a seeded lognormal (--mean, --sd, cut at --budget), as reasoning traces do; `r1-math500` is that
with DeepSeek's published length spread of R1-Distill-Qwen-1.5B on MATH-500 (mean 5,450, sd 7,328) at
the budget of params.yaml (eval.max_new_tokens); `uniform` runs every response to --budget. Reports
useful tokens/s (tokens up to and including EOS), the share of decode slots that kept a token, the
responses in flight, the tail and peak GPU memory, per route; speedup = the last route over the first. A
continuous route also reports its decode steps' bandwidth bound, all and the tail's (`decode_bound_seconds`,
`tail_bound_seconds`: each step reads the weights, the embedding table but its rows left out, and every
response's keys and values so far, at --bandwidth): how far the steps are from what the GPU allows; and
its wall seconds decoding (each step's launch to its tokens read back) and prefilling (`decode_seconds`,
`prefill_seconds`), compiling (`compile_seconds`: torch.compile; `kernels_seconds`: the attention kernel's
variants, --compile-threads at a time) and capturing graphs (`capture_seconds`): the rest is the engine's
bookkeeping.
Routes: `padded`, `reserved` (continuous batching with every slot's cache at full length, as before
paging, and without the Triton kernels: FlashAttention, top-p by sorting), `continuous` (the stage's
route: the paged cache, the kernels) and `fp8` (that with `eval.kv_cache: fp8`: 8-bit keys and values).
--step-sizes also times one decode step per batch size at --step-context tokens of context, without the
kernels, with them, and with them over an 8-bit cache (--step-caches picks among them), against its bandwidth
bound (bytes read / --bandwidth); --step-profile adds each step's kernels by GPU time.

    python -m tests.random_model /tmp/r1
    python -m bench.generate_speed /tmp/r1 --workload r1-math500 --prompts 2048 --step-sizes 8,64,256,512
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stages.core import params
from stages.core.prompts import prompt_text
from stages.generation import batched as generation
from stages.generation import continuous, paged_attention
from stages.generation.continuous import ContinuousBatcher, kv_bytes_per_token
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


def end_lengths(count: int, mean: float, sd: float, budget: int, seed: int = 0) -> list[int]:
    """Response lengths in tokens: lognormal with this mean and sd, at least 1, cut at the budget."""
    sigma2 = np.log1p((sd / mean) ** 2)
    draws = np.random.default_rng(seed).lognormal(np.log(mean) - sigma2 / 2, np.sqrt(sigma2), count)
    return np.clip(np.rint(draws), 1, budget).astype(int).tolist()


WORKLOADS = {"r1-math500": (5450, 7328)}  # name: (mean, sd) of response tokens, published


class Stopped(Exception):
    """A route stopped at its time limit, with the tokens it had generated and the engine's counts."""

    def __init__(self, tokens: int, stats):
        self.tokens, self.stats = tokens, stats


def weight_bytes(model) -> int:
    """What a decode step reads of the weights: all of them but an input embedding table apart from the output
    layer (a step reads a row of it a slot)."""
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    untied = embedding.data_ptr() != output.data_ptr()
    return sum(p.numel() * p.element_size() for p in model.parameters()) - untied * embedding.nbytes


def bound_seconds(model, steps: int, context_tokens: int, kv_cache: str, bandwidth: float) -> float:
    """Decode steps' bandwidth bound: each reads the weights once, and all of them `context_tokens` tokens' keys
    and values, at `bandwidth` bytes/s."""
    kv_bytes = kv_bytes_per_token(model.config, getattr(torch, kv_cache))
    return (steps * weight_bytes(model) + context_tokens * kv_bytes) / bandwidth


def run_route(route: str, model, tokenizer, texts: list[str], config: params.EvalParams,
              end_at: list[int] | None, limit: float | None = None, bandwidth: float = 3.35e12) -> dict:
    """The route's figures (`route@N`: with eval.batch_size N); limit (seconds, continuous routes): stop there
    and give the tokens generated by then per second, which leaves out the route's slow tail (its rate over a
    whole run would be lower). The decode steps' bandwidth bound (`decode_bound_seconds`, the tail's too) at
    `bandwidth` bytes/s."""
    route, _, slots = route.partition("@")
    config = dataclasses.replace(config, batching="padded" if route == "padded" else "continuous",
                                 kv_cache="fp8" if route == "fp8" else "model",
                                 batch_size=int(slots) if slots else config.batch_size)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    stats: dict = {}

    def on_tokens(count: int, engine_stats) -> None:
        if limit and time.perf_counter() - start > limit:
            raise Stopped(count, dataclasses.asdict(engine_stats))

    try:
        outputs = generation.generate(model, tokenizer, texts, config, seed=0, end_at=end_at, stats=stats,
                                      reserved=route == "reserved", on_tokens=on_tokens)
    except Stopped as stop:
        seconds = time.perf_counter() - start
        counts = {key: stop.stats[key] for key in ("decode_steps", "in_flight_max", "preempted", "cache_tokens",
                                                   "kv_cache", "attention")}
        return {"stopped_at_seconds": round(seconds, 1), "generated_tokens": stop.tokens,
                "useful_tokens_per_second": round(stop.tokens / seconds), **counts,
                "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    useful = sum(o.n_tokens for o in outputs)
    if end_at:  # sampled noise may draw end-of-sequence sooner (about 1 token in 150k)
        assert all(o.n_tokens <= end for o, end in zip(outputs, end_at, strict=True)), "a forced end was missed"
    return {"slots": stats["batch_size"], "seconds": round(seconds, 1), "useful_tokens": useful,
            "useful_tokens_per_second": round(useful / seconds),
            "decode_slot_share": round(stats["decode_slot_share"], 3),
            **({"tail_steps": stats["tail_steps"], "tail_seconds": round(stats["tail_seconds"], 1),
                "decode_bound_seconds": round(bound_seconds(model, stats["decode_steps"], stats["context_tokens"],
                                                            stats["kv_cache"], bandwidth), 1),
                "tail_bound_seconds": round(bound_seconds(model, stats["tail_steps"], stats["tail_context_tokens"],
                                                          stats["kv_cache"], bandwidth), 1),
                "decode_steps": stats["decode_steps"], "decode_seconds": round(stats["decode_seconds"], 1),
                "prefill_seconds": round(stats["prefill_seconds"], 1),
                "in_flight_mean": round(stats["in_flight_mean"], 1),
                "in_flight_max": stats["in_flight_max"], "preempted": stats["preempted"],
                "cache_tokens": stats["cache_tokens"], "block_tokens": stats["block_tokens"],
                "kv_cache": stats["kv_cache"], "cache_gib": round(stats["cache_tokens"] * kv_bytes_per_token(
                    model.config, getattr(torch, stats["kv_cache"])) / 2**30, 1),
                "compiled": stats["compiled"], "compile_seconds": round(stats["compile_seconds"], 1),
                "kernels_seconds": round(stats["kernels_seconds"], 1),
                "capture_seconds": round(stats["capture_seconds"], 1),
                "attention": stats["attention"], "top_p_kernels": stats["top_p_kernels"],
                "fused_projections": stats["fused_projections"]}
               if "tail_steps" in stats else {}),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}


def run_processes(processes: int, model_dir: str, adapter: Path, texts: list[str], config: params.EvalParams,
                  end_at: list[int] | None, startup: bool = True) -> dict:
    """The stage's multi-GPU path (stages.generation.workers): `processes` workers, one per GPU, each answering
    prompt i when i mod processes is its number; the time includes each worker's start (model load, graph
    capture), as in the stage. startup: also time that start alone, in a run before (one token a worker)."""
    import tempfile

    from stages.generation import workers as eval_workers

    model_params = params.ModelParams(name=model_dir, revision="main", max_seq_length=4096, directive="")
    def timed(prompts: list[str], ends: list[int] | None) -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as folder:
            job = eval_workers.Job("bench", prompts, Path(folder) / "out.parquet", ends)
            start = time.perf_counter()
            eval_workers.generate_sharded([eval_workers.Phase("finetuned", adapter, [job])], model_params, config, 0,
                                          processes)
            return time.perf_counter() - start, sum(o.n_tokens for o in eval_workers.read_generations(job.out))

    # The workers' start (imports, model load, adapter merge, graph capture), alone: one token per worker.
    start = timed(texts[:processes], [1] * processes)[0] if startup else None
    seconds, useful = timed(texts, end_at)
    result = {"processes": processes, "seconds": round(seconds, 1), "useful_tokens": useful,
              "useful_tokens_per_second": round(useful / seconds)}
    if start is not None:
        result |= {"startup_seconds": round(start, 1),
                   "useful_tokens_per_second_after_startup": round(useful / (seconds - start))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--workload", choices=["real-length", "uniform", *WORKLOADS], default="real-length")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--mean", type=float, default=2000, help="real-length: mean response tokens")
    parser.add_argument("--sd", type=float, default=1500, help="real-length: standard deviation")
    parser.add_argument("--budget", type=int, help="eval.max_new_tokens (default: params.yaml's)")
    parser.add_argument("--batch-size", default="auto", help="eval.batch_size: auto (default) or a number")
    parser.add_argument("--routes", default="reserved,continuous",
                        help="comma-separated, run in this order; ROUTE@N: with --batch-size N (e.g. fp8@1024)")
    parser.add_argument("--step-sizes", default="", help="e.g. 8,64,256,512: time a decode step at these sizes")
    parser.add_argument("--step-profile", action="store_true", help="--step-sizes: also each step's kernels")
    parser.add_argument("--step-context", type=int, default=2048, help="--step-sizes: tokens of each context")
    parser.add_argument("--step-caches", default="flash,bf16,fp8", help="--step-sizes: the steps timed: flash (no "
                        "Triton kernels), bf16 (kernels), fp8 (kernels over an 8-bit cache)")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="GPU memory bytes/s (H100 SXM)")
    parser.add_argument("--processes", default="", help="e.g. 1,2: instead of --routes, the continuous route "
                        "through the stage's worker processes (one per GPU), each count in turn; speedup: last/first")
    parser.add_argument("--startup", action=argparse.BooleanOptionalAction, default=True,
                        help="--processes: time each count's start alone first (one token a worker); --no-startup "
                        "leaves that out, so a call's 10 minutes hold more prompts")
    parser.add_argument("--limit", default="", help="e.g. reserved=200: stop a route after that many seconds, "
                        "its rate the tokens generated by then per second (without its tail: higher than a "
                        "whole run's), so a slow baseline fits a call with many prompts")
    parser.add_argument("--compile-threads", type=int, default=continuous.COMPILE_THREADS,
                        help="threads compiling the attention kernel's variants before the first step (0: each at "
                        "its first launch, as before 2026-12-07); set TRITON_CACHE_DIR to an empty folder to time "
                        "a machine's first run")
    parser.add_argument("--commit", default="", help="the commit measured, recorded in the JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    continuous.COMPILE_THREADS = args.compile_threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from transformers import AutoTokenizer

    tiny_model.add_chat_template(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    adapter = random_adapter(args.model_dir, Path("/tmp/bench-adapter"))
    config = params.load("eval", ROOT / "params.yaml")
    args.budget = args.budget or config.max_new_tokens
    if args.workload in WORKLOADS:
        args.mean, args.sd = WORKLOADS[args.workload]
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    config = dataclasses.replace(config, max_new_tokens=args.budget, batch_size=batch, static_cache=True)
    texts = prompts(tokenizer, args.prompts)
    end_at = end_lengths(args.prompts, args.mean, args.sd, args.budget) if args.workload != "uniform" else None
    workload = {"prompts": args.prompts, "prompt_tokens": len(tokenizer(texts[0], add_special_tokens=False)[
        "input_ids"]), "budget": args.budget, "temperature": config.temperature, "top_p": config.top_p,
        "compile_threads": args.compile_threads}
    if end_at:
        workload |= {"mean": args.mean, "sd": args.sd, "drawn_mean": round(float(np.mean(end_at))),
                     "cut_at_budget": sum(n == args.budget for n in end_at)}
    results = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
               "commit": args.commit, "workload": args.workload, "settings": workload, "routes": {}}
    if args.processes:
        counts = [int(n) for n in args.processes.split(",")]
        results["gpus"] = torch.cuda.device_count()
        results["processes"] = []
        for n in counts:  # each run's figures written as it ends: a call that runs out of time keeps them
            results["processes"].append(run_processes(n, args.model_dir, adapter, texts, config, end_at,
                                                      args.startup))
            print(json.dumps(results["processes"][-1]), flush=True)
            save(results, args.out)
        first, last = results["processes"][0], results["processes"][-1]
        results["speedup"] = round(last["useful_tokens_per_second"] / first["useful_tokens_per_second"], 2)
        if args.startup:
            results["speedup_after_startup"] = round(last["useful_tokens_per_second_after_startup"]
                                                     / first["useful_tokens_per_second_after_startup"], 2)
        print(json.dumps(results, indent=2))
        save(results, args.out)
        return
    model_params = params.ModelParams(name=args.model_dir, revision="main", max_seq_length=4096, directive="")
    model = generation.load_model(model_params, adapter)
    if args.step_sizes:
        results["decode_steps"] = step_times(model, [int(n) for n in args.step_sizes.split(",")],
                                             args.step_context, args.bandwidth, profile=args.step_profile,
                                             caches=args.step_caches.split(","))
        save(results, args.out)
    limits = {route: float(seconds) for route, seconds in (item.split("=") for item in args.limit.split(",") if item)}
    for route in [r for r in args.routes.split(",") if r]:
        results["routes"][route] = run_route(route, model, tokenizer, texts, config, end_at, limits.get(route),
                                             args.bandwidth)
        print(json.dumps({route: results["routes"][route]}), flush=True)
        save(results, args.out)
        gc.collect()  # a stopped route's engine (its cache) lives on in reference cycles of its traceback's frames
        torch.cuda.empty_cache()
    routes = list(results["routes"].values())
    if len(routes) > 1:
        results["baseline_useful_tokens_per_second"] = routes[0]["useful_tokens_per_second"]
        results["useful_tokens_per_second"] = routes[-1]["useful_tokens_per_second"]
        results["speedup"] = round(routes[-1]["useful_tokens_per_second"] / routes[0]["useful_tokens_per_second"], 2)
        names = list(results["routes"])
        results["speedup_of"] = f"{names[-1]} over {names[0]}"
    print(json.dumps(results, indent=2))
    save(results, args.out)


def step_times(model, sizes: list[int], context: int, bandwidth: float, repeats: int = 20,
               profile: bool = False, caches: list[str] = ("flash", "bf16", "fp8")) -> list[dict]:
    """Milliseconds of one compiled, graph-replayed decode step (sampling as the model card says) with every
    slot at `context` tokens, per batch size: without the Triton kernels (attention, top-p), with them, and
    with them over an 8-bit cache; against the step's bandwidth bound: the weights plus each slot's keys and
    values, read once, at `bandwidth` bytes/s. profile: also where a step's GPU time goes (kernel_profile).
    caches: which of the three ("flash", "bf16", "fp8") to time."""
    config = params.load("eval", ROOT / "params.yaml")
    weights = weight_bytes(model)
    rows = []
    # the route before the Triton kernels; the stage's with eval.kv_cache model; with fp8
    variants = {"flash": (False, model.dtype), "bf16": (True, model.dtype), "fp8": (True, paged_attention.EIGHT_BIT)}
    unknown = set(caches) - set(variants)
    if unknown:
        raise SystemExit(f"--step-caches: {', '.join(sorted(unknown))} unknown; choose among {', '.join(variants)}")
    variants = [variants[name] for name in caches]
    for size, (kernels, dtype) in itertools.product(sizes, variants):
        engine = ContinuousBatcher(model, size, context + 1, eos=-1, temperature=config.temperature,
                                   top_p=config.top_p, compile=True, kernels=kernels, kv_dtype=dtype)
        with torch.inference_mode():
            engine._compile()
            engine._capture()
            for slot in range(size):
                assert engine.cache.grow(slot, context + 1)
            random_cache(engine.cache)
            engine.positions.fill_(context)
            engine.active.fill_(1)
            engine.graphs[size].replay()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                engine.graphs[size].replay()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / repeats
            profiled = kernel_profile(engine.graphs[size].replay, repeats) if profile else {}
        read = weights + size * (context + 1) * kv_bytes_per_token(model.config, dtype)
        rows.append({"slots": size, "context": context, "attention": engine.attention,
                     "kv_cache": engine.stats.kv_cache,
                     "top_p_kernels": engine.stats.top_p_kernels,
                     "fused_projections": engine.stats.fused_projections, "ms": round(1e3 * seconds, 2),
                     "bound_ms": round(1e3 * read / bandwidth, 2), "tokens_per_second": round(size / seconds),
                     **profiled})
        print(json.dumps(rows[-1]), flush=True)
        del engine
        torch.cuda.empty_cache()
    return rows


def random_cache(cache) -> None:
    """Fill a block cache with random keys and values (8-bit: with scales as a model's give), as a run's cache
    holds: an empty one's zero scales send an 8-bit kernel through 0/0 (NaN weights), not a run's path."""
    for tensor in (*cache.keys, *cache.values):  # a layer at a time
        tensor.copy_(torch.randn(tensor.shape, device=tensor.device, dtype=torch.bfloat16))
    for tensor in itertools.chain(*cache.scales or ()):
        tensor.uniform_(1e-3, 1e-2)


def kernel_profile(step: Callable[[], None], repeats: int, top: int = 12) -> dict:
    """Where one step's GPU time goes (torch.profiler over `repeats` steps): the sum of its kernels' times
    (`kernel_ms`; the step's milliseconds less this is time the GPU ran no kernel) and its `top` kernels by
    time, each with its microseconds and launches a step."""
    from torch.autograd import DeviceType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in profiler.key_averages() if e.device_type == DeviceType.CUDA),
                     key=lambda e: -e.self_device_time_total)
    return {"kernel_ms": round(sum(e.self_device_time_total for e in kernels) / repeats / 1e3, 3),
            "kernels": [{"name": e.key[:90], "us": round(e.self_device_time_total / repeats, 1),
                         "launches": round(e.count / repeats, 1)} for e in kernels[:top]]}


def save(results: dict, out: Path | None) -> None:
    if out:
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
