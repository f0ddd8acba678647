"""A model, not a measurement: what bounds the continuous route's rate and tail on a workload, from step
times measured by the other benchmarks. It replays the engine's schedule (stages.generation.continuous: up to
--slots responses in flight, a refill once a sixteenth of the slots are free, the tail's shrinking graph
sizes) over the lengths bench.generate_speed draws, and charges each decode step

    a + b x graph size + c x tokens of context in flight   (milliseconds)

c: the attention kernel's cost a token of context (`--attention-ms` a layer at --attention-case, times 28
layers, from bench.decode_kernels); a, b: least squares through `--steps` (size:ms at --context tokens, from
bench.generate_speed --step-sizes) less that attention. `--bound` charges instead each step's bandwidth bound
(the weights and every slot's keys and values read once at 3.35 TB/s). Prefills are not charged. Each line
also gives the tail's steps and seconds by graph size (`tail_by_size`): how many responses its steps carry.

    python -m bench.tail_model --prompts 400,2048 [--bound] [--order longest-first]

`--charge-attention-ms 0.284` charges a faster attention kernel (here the 8-bit cache's at 787c934) with the
same fitted rest of the step. `--order longest-first` admits the prompts longest response first, as if
lengths were known beforehand: what ordering by a length predictor could at best do to the tail and the rate.

Defaults: the H100 figures of commit b0935a2 (bench/results/generate-2026-12-07-h100-r1math500-400-b0935a2.json,
decode-kernels-2026-12-07-h100-b0935a2.json), where 400 prompts measured 18,027 useful tokens/s and a 78.6 s
tail. `--kv-bytes 14784` models an 8-bit cache's bytes a token (--bound): a byte a number and a float32
scale per token and KV head. `peak_cache_tokens` says whether a slot count would pause responses: it must
stay within the cache (on an H100: ~2.59M tokens in bf16, ~4.8M in 8 bits; the run's `cache_tokens`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.decode_kernels import HEAD_DIM, KV_HEADS, LAYERS
from bench.generate_speed import WORKLOADS, end_lengths
from stages.generation.continuous import BLOCK_TOKENS, graph_sizes

PROMPT_TOKENS = 164  # bench.generate_speed's prompts
WEIGHT_BYTES = 3.09e9  # what a step reads of the 1.5B model in bf16: all but the embedding table
KV_BYTES = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2  # keys and values of a token, every layer, bf16 (28,672)


def replay(lengths: list[int], slots: int, step_ms) -> dict:
    """Decode steps of the engine's schedule; step_ms(graph size, context tokens in flight). tail_by_size: the
    tail's steps and seconds by graph size, largest first; peak_cache_tokens: the most tokens the responses in
    flight held in whole blocks (the engine pauses responses where its cache holds fewer; this replay does not)."""
    waiting = lengths[::-1]
    left, context = np.zeros(0, int), np.zeros(0, int)
    sizes = graph_sizes(slots)
    ms = tokens = 0.0
    peak = 0
    tail_from = None
    tail = {}  # graph size -> [steps, ms]
    while len(waiting) or len(left):
        free = slots - len(left)
        if waiting and (free >= min(max(1, slots // 16), len(waiting)) or not len(left)):
            admit = [waiting.pop() for _ in range(min(free, len(waiting)))]
            left = np.concatenate([left, admit])
            context = np.concatenate([context, np.full(len(admit), PROMPT_TOKENS)])
            if not waiting:
                tail_from = ms
        size = slots if waiting else min(n for n in sizes if n >= len(left))
        step = step_ms(size, int(context.sum()))
        peak = max(peak, int((-(-(context + 1) // BLOCK_TOKENS)).sum()) * BLOCK_TOKENS)
        ms += step
        if tail_from is not None:
            tail.setdefault(size, [0, 0.0])
            tail[size][0] += 1
            tail[size][1] += step
        tokens += len(left)
        left, context = left - 1, context + 1
        keep = left > 0
        left, context = left[keep], context[keep]
    return {"useful_tokens_per_second": round(tokens / ms * 1e3),
            "tail_seconds": round(float(ms - tail_from) / 1e3, 1), "seconds": round(float(ms) / 1e3, 1),
            "peak_cache_tokens": peak,
            "tail_by_size": {size: {"steps": steps, "seconds": round(float(spent) / 1e3, 2)}
                             for size, (steps, spent) in sorted(tail.items(), reverse=True)}}


def fitted(steps: dict[int, float], context: int, attention_ms: float, case: tuple[int, int],
           charged_ms: float | None = None):
    """a + b x size + c x context tokens, c from the attention kernel, a and b by least squares through the
    steps less that kernel's share; charged_ms: then c from a kernel of that cost instead (a, b unchanged)."""
    c = LAYERS * attention_ms / (case[0] * case[1])
    sizes = np.array(list(steps), float)
    rest = np.array(list(steps.values())) - c * sizes * context
    b, a = np.polyfit(sizes, rest, 1)
    c = c if charged_ms is None else LAYERS * charged_ms / (case[0] * case[1])
    return (lambda size, tokens: a + b * size + c * tokens), {"a_ms": round(float(a), 3),
                                                              "b_ms": round(float(b), 5), "c_ms_per_token": c}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="400,2048")
    parser.add_argument("--slots", default="512", help="e.g. 128,256,512")
    parser.add_argument("--budget", type=int, default=8192)
    parser.add_argument("--steps", default="8:2.70,64:3.93,512:17.11", help="size:ms, the stage's step")
    parser.add_argument("--context", type=int, default=2048, help="--steps: tokens of each slot's context")
    parser.add_argument("--attention-ms", type=float, default=0.384, help="a layer's attention at --attention-case")
    parser.add_argument("--attention-case", default="512x2048", help="slots x context")
    parser.add_argument("--charge-attention-ms", type=float,
                        help="charge attention as a kernel of this cost at --attention-case (what if; the fit "
                             "still takes --attention-ms out of --steps)")
    parser.add_argument("--bound", action="store_true", help="every step at its bandwidth bound")
    parser.add_argument("--kv-bytes", type=int, default=KV_BYTES, help="--bound: a token's keys and values")
    parser.add_argument("--bandwidth", type=float, default=3.35e12)
    parser.add_argument("--order", choices=["drawn", "longest-first"], default="drawn")
    args = parser.parse_args()
    if args.bound:
        def step_ms(size, tokens):
            return 1e3 * (WEIGHT_BYTES + tokens * args.kv_bytes) / args.bandwidth
        print(json.dumps({"model": "bandwidth bound", "kv_bytes": args.kv_bytes}))
    else:
        steps = {int(s): float(ms) for s, ms in (item.split(":") for item in args.steps.split(","))}
        case = tuple(map(int, args.attention_case.split("x")))
        step_ms, coefficients = fitted(steps, args.context, args.attention_ms, case, args.charge_attention_ms)
        print(json.dumps({"model": "fitted", **coefficients}))
    for prompts in map(int, args.prompts.split(",")):
        lengths = end_lengths(prompts, *WORKLOADS["r1-math500"], args.budget)
        if args.order == "longest-first":
            lengths.sort(reverse=True)
        for slots in map(int, args.slots.split(",")):
            print(json.dumps({"prompts": prompts, "slots": slots, "order": args.order,
                              **replay(lengths, slots, step_ms)}))


if __name__ == "__main__":
    main()
