"""Benchmark: the decode attention kernel at the contexts a real run holds, per partition size. A run's slots
hold contexts from a few tokens to the whole budget, where bench.decode_kernels and bench.kernel_launch give
every slot the same; and a fresh 8-bit cache holds zero scales (what a decode step's benchmark on an empty
cache reads). Per (slots, spread, cache, partition tokens): ms a layer and the bandwidth of the bytes the slots'
contexts hold (each slot's tokens up to its position, once). Spreads: `uniform:N` (every slot at N tokens) or
`r1-math500` (each slot at a uniform point of a response drawn as bench.generate_speed's workload draws them,
prompt included). Partition `auto`: what the stage launches (paged_attention.launch_shape).

    python -m bench.kernel_partitions --slots 512,1024 --spreads uniform:3000,r1-math500
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from bench.decode_kernels import BLOCK, HEAD_DIM, KV_HEADS, PER_SLOT, as_eight_bit, bytes_read, launch_ms, paged_cache
from bench.generate_speed import WORKLOADS, end_lengths
from bench.tail_model import PROMPT_TOKENS
from stages.generation import paged_attention


def positions_of(slots: int, spread: str, budget: int = 8192) -> torch.Tensor:
    """Each slot's last position: all at N - 1 (uniform:N), or a uniform point of a drawn response."""
    if spread.startswith("uniform:"):
        return torch.full((slots,), int(spread.split(":")[1]) - 1, device="cuda")
    lengths = np.array(end_lengths(slots, *WORKLOADS[spread], budget, seed=1)) + PROMPT_TOKENS
    points = np.random.default_rng(2).uniform(0, 1, slots) * lengths
    return torch.tensor(points.astype(int), device="cuda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", default="512,1024")
    parser.add_argument("--spreads", default="uniform:3000,r1-math500")
    parser.add_argument("--parts", default="auto,512,1024,2048,4096", help="tokens a partition, or auto")
    parser.add_argument("--layouts", default="scattered", help="scattered (blocks in random order, as a run's "
                        "cache comes to hold them), contiguous (each slot's blocks one after another), or both")
    parser.add_argument("--orders", default="longest-first", help="the programs' order: longest-first (the "
                        "stage's: paged_attention.longest_first), drawn (the slots' own), or both")
    parser.add_argument("--merges", default="auto", help="a slot's partitions merged by its last program "
                        "(merged), by a kernel of their own (separate), as the stage chooses (auto: "
                        "paged_attention.MERGED_PARTS), or several")
    parser.add_argument("--zero-scales", action="store_true", help="also an 8-bit cache whose scales are 0")
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
               "commit": args.commit, "launches": []}
    merge_parts = paged_attention.MERGED_PARTS
    caches = ["bfloat16", "fp8"] + (["fp8-zero-scales"] if args.zero_scales else [])
    for slots, spread, layout, order in itertools.product(map(int, args.slots.split(",")), args.spreads.split(","),
                                                         args.layouts.split(","), args.orders.split(",")):
        positions = positions_of(slots, spread)
        ordered = paged_attention.longest_first(positions) if order == "longest-first" else None
        tokens = int((positions + 1).sum())
        bf16 = paged_cache(slots)
        if layout == "contiguous":
            bf16 = (*bf16[:2], bf16[2].flatten().sort().values.view_as(bf16[2]), bf16[3])
        for cache in caches:
            keys, values, table, query = bf16
            key_scales = value_scales = None
            if cache != "bfloat16":
                keys, values, key_scales, value_scales = as_eight_bit(keys, values)
                if cache == "fp8-zero-scales":
                    key_scales.zero_(), value_scales.zero_()
            eight_bit = key_scales is not None
            read = bytes_read(1, tokens, eight_bit)  # the slots' contexts, end to end
            for part in args.parts.split(","):
                if part == "auto":
                    part, tile = paged_attention.launch_shape(slots, KV_HEADS, PER_SLOT, BLOCK, eight_bit)
                else:
                    part = int(part)
                    tile = paged_attention.tile_for(part, BLOCK, eight_bit)
                inputs = (query, keys, values, table, positions, HEAD_DIM ** -0.5, key_scales, value_scales, part,
                          tile, ordered)
                for merge in args.merges.split(","):
                    paged_attention.MERGED_PARTS = {"merged": PER_SLOT * BLOCK, "separate": 0}.get(merge, merge_parts)
                    ms = launch_ms(inputs)
                    in_place = paged_attention.in_place(PER_SLOT, BLOCK, part)  # the order only then
                    row = {"slots": slots, "spread": spread, "layout": layout,
                           "order": order if in_place else "drawn", "merge": "merged" if in_place else "separate",
                           "mean_context": round(tokens / slots), "kv_cache": cache, "partition": part, "tile": tile,
                           "ms": round(ms, 4), "tb_per_s": round(read / ms / 1e9, 2)}
                    results["launches"].append(row)
                    print(json.dumps(row), flush=True)
            del keys, values, key_scales, value_scales
        del bf16
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
