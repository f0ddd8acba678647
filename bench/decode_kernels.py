"""Benchmark: the decode step's Triton kernels against the route before them, on synthetic inputs of the real
1.5B shape, one call: attention over a paged cache (FlashAttention's variable-length kernel, one sequence per
(slot, block), against stages.generation.paged_attention) per (slots, context), compiled as the decode step
compiles them (the route before's merge of the blocks' results is fused there) and replayed as CUDA graphs of
28 layers, with the bytes each layer reads and the bandwidth that makes (and the Triton kernel over an 8-bit
cache, `eval.kv_cache: fp8`); top-p sampling at temperature 0.6 / top-p 0.95 over 151,936 logits (the sort,
compiled as the decode step compiles it, against stages.generation.top_p) per row count, on two kinds of
logits: `flat` (random: the kept set is most of the vocabulary) and `peaked` (as a language model's: a bulk
of N(0, 2) and 8 tokens 14-20 above it, the kept set a few tokens: the kernels skip the tiles below the cut).

    python -m bench.decode_kernels --commit SHA --out bench/results/decode-kernels-DATE-GPU-SHA.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from stages.generation import continuous, paged_attention, top_p

LAYERS, KV_HEADS, HEADS, HEAD_DIM, VOCAB, BLOCK = 28, 2, 12, 128, 151_936, 512
PER_SLOT = 17  # blocks a slot may hold: 8,192 new tokens and a prompt, in blocks of 512


def replay_ms(step, repeats: int = 4) -> float:
    """Milliseconds of one call of step, captured LAYERS times in a CUDA graph and replayed."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            step()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (repeats * LAYERS) * 1e3


def paged_cache(slots: int, per_slot: int = PER_SLOT) -> tuple[torch.Tensor, ...]:
    """A bf16 cache of random keys and values, `per_slot` scattered blocks a slot: keys, values [blocks, BLOCK,
    KV_HEADS, HEAD_DIM], table [slots, per_slot], a query [slots, HEADS, HEAD_DIM] (seeded: the same each call)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    keys, values = (torch.randn(1 + slots * per_slot, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", generator=generator,
                                dtype=torch.bfloat16) for _ in range(2))
    table = (torch.randperm(slots * per_slot, device="cuda", generator=generator) + 1).view(slots, per_slot)
    query = torch.randn(slots, HEADS, HEAD_DIM, device="cuda", generator=generator, dtype=torch.bfloat16)
    return keys, values, table, query


def as_eight_bit(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A bf16 cache as an 8-bit cache keeps it: keys, values (transposed a block), key scales, value scales."""
    (keys, key_scales), (values, value_scales) = paged_attention.quantize(keys), paged_attention.quantize(values)
    return keys, paged_attention.value_layout(values), key_scales, value_scales


def launch_ms(inputs: tuple) -> float:
    """Milliseconds of one paged_attention._attend(*inputs) launch (partials and merge), as a CUDA graph."""
    from triton.testing import do_bench_cudagraph

    torch.cuda.synchronize()  # do_bench_cudagraph runs on a stream of its own, which does not wait
    return do_bench_cudagraph(lambda: paged_attention._attend(*inputs), rep=30)


def bytes_read(slots: int, context: int, eight_bit: bool = False) -> int:
    """Keys and values of every slot's context, one layer: bf16, or 8-bit with a float32 scale a token and head."""
    return slots * context * 2 * KV_HEADS * (HEAD_DIM + 4 if eight_bit else 2 * HEAD_DIM)


def attention(slots: int, context: int) -> dict:
    keys, values, table, query = paged_cache(slots)
    query = query[:, :, None]  # [slots, heads, 1, head_dim], as the decode step attends
    positions = torch.full((slots,), context - 1, device="cuda")
    order = paged_attention.longest_first(positions)  # as the decode step gives the Triton kernel
    read = bytes_read(slots, context)
    row = {"slots": slots, "context": context, "mb_read": round(read / 1e6, 1)}
    for kernel in ("flash", "triton"):
        step = continuous.DecodeStep(positions, table, kernel, order=order)
        attend = torch.compile(lambda q, k, v, step=step: step.attend(q, k, v, HEAD_DIM ** -0.5), fullgraph=True)
        ms = replay_ms(lambda attend=attend: attend(query, keys, values))
        row[kernel] = {"ms": round(ms, 4), "tb_per_s": round(read / ms / 1e9, 2)}
    row["speedup"] = round(row["flash"]["ms"] / row["triton"]["ms"], 2)
    # eval.kv_cache: fp8: the Triton kernel over 8-bit keys and values and their float32 scales
    keys, values, key_scales, value_scales = as_eight_bit(keys, values)
    step = continuous.DecodeStep(positions, table, "triton", (key_scales, value_scales), order)
    attend = torch.compile(lambda q, k, v, step=step: step.attend(q, k, v, HEAD_DIM ** -0.5), fullgraph=True)
    ms = replay_ms(lambda attend=attend: attend(query, keys, values))
    read_fp8 = bytes_read(slots, context, eight_bit=True)
    row["triton_fp8"] = {"ms": round(ms, 4), "mb_read": round(read_fp8 / 1e6, 1),
                         "tb_per_s": round(read_fp8 / ms / 1e9, 2)}
    return row


def sampling(rows: int, kind: str, temperature: float = 0.6, p: float = 0.95) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(rows, VOCAB, device="cuda", generator=generator)
    if kind == "peaked":
        top = torch.randint(0, VOCAB, (rows, 8), device="cuda", generator=generator)
        lift = 14 + 6 * torch.rand(rows, 8, device="cuda", generator=generator)
        logits = (2 * logits).scatter_add(1, top, lift)
    logits = logits.to(torch.bfloat16)
    hashes = torch.randint(0, 2**32, (rows,), device="cuda", generator=generator)
    result = {"rows": rows, "logits": kind}
    for name, kernel in (("sort", False), ("triton", True)):
        sample = torch.compile(continuous.sampler(temperature, p, kernel=kernel), fullgraph=True)
        result[name] = {"ms": round(replay_ms(lambda sample=sample: sample(logits, hashes), repeats=1), 3)}
    result["speedup"] = round(result["sort"]["ms"] / result["triton"]["ms"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", default="512x2048,256x3000,64x4096,8x8192", help="slots x context, ...")
    parser.add_argument("--sampling", default="512,64,8", help="rows, ... ('': none)")
    parser.add_argument("--logits", default="flat,peaked", help="kinds of logits to sample (flat, peaked)")
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    assert top_p.available(torch.device("cuda"), torch.bfloat16, VOCAB), "the top-p kernels do not run here"
    results = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
               "commit": args.commit, "command": "python -m bench.decode_kernels", "attention": [], "sampling": []}
    for case in filter(None, args.attention.split(",")):
        slots, context = map(int, case.split("x"))
        results["attention"].append(attention(slots, context))
        print(json.dumps(results["attention"][-1]), flush=True)
    for kind in filter(None, args.logits.split(",")):
        for rows in filter(None, args.sampling.split(",")):
            results["sampling"].append(sampling(int(rows), kind))
            print(json.dumps(results["sampling"][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
