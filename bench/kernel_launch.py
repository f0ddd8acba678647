"""Benchmark: the decode attention kernel's launch swept on a GPU, one call: keys a tile (64, 128), warps (4,
8) and pipeline stages (1-4) unless told others, over a bf16 and an 8-bit cache of the real 1.5B shape, per
(slots x context), partitions as stages.generation.paged_attention sizes them for that tile. Each launch (the
partials and the merge) is timed as a CUDA graph (triton.testing.do_bench_cudagraph); its bytes read make a
bandwidth. How paged_attention.WIDE_TILE was chosen.

    python -m bench.kernel_launch --shapes 512x2048,64x4096,8x8192 --out bench/results/kernel-launch-DATE-GPU-SHA.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

from bench import decode_kernels
from bench.decode_kernels import BLOCK, HEAD_DIM, KV_HEADS, PER_SLOT, bytes_read, launch_ms, paged_cache
from stages.generation import paged_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="512x2048,64x4096,8x8192", help="slots x context, ...")
    parser.add_argument("--tiles", default="64,128", help="keys a tile, ...")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--registers", default="0", help="registers a thread at most (maxnreg), 0: the compiler's")
    parser.add_argument("--caches", default="bf16,fp8", help="bf16, fp8 or both")
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
               "commit": args.commit, "command": " ".join(["python -m bench.kernel_launch", *sys.argv[1:]]),
               "launches": []}
    numbers = {name: [int(n) for n in getattr(args, name).split(",")]
               for name in ("tiles", "warps", "stages", "registers")}
    caches = [cache == "fp8" for cache in args.caches.split(",")]
    for shape, eight_bit in itertools.product(args.shapes.split(","), caches):
        slots, context = map(int, shape.split("x"))
        keys, values, table, query = paged_cache(slots)
        key_scales = value_scales = None
        if eight_bit:
            keys, values, key_scales, value_scales = decode_kernels.as_eight_bit(keys, values)
        positions = torch.full((slots,), context - 1, device="cuda")
        read = bytes_read(slots, context, eight_bit)
        for tile, warps, stages, registers in itertools.product(*numbers.values()):
            part = paged_attention.partition_tokens(slots, KV_HEADS, PER_SLOT, BLOCK, tile)
            paged_attention.WARPS, paged_attention.STAGES = warps, stages
            paged_attention.REGISTERS = registers or None
            inputs = (query, keys, values, table, positions, HEAD_DIM ** -0.5, key_scales, value_scales, part, tile,
                      paged_attention.longest_first(positions))  # the order the decode step gives
            ms = launch_ms(inputs)
            row = {"slots": slots, "context": context, "kv_cache": "fp8" if eight_bit else "bfloat16", "tile": tile,
                   "partition": part, "warps": warps, "stages": stages,
                   "registers": registers or None, "ms": round(ms, 4),
                   "tb_per_s": round(read / ms / 1e9, 2)}
            results["launches"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
