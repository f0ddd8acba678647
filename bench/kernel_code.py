"""Benchmark without a GPU: the top-p kernels (stages.generation.top_p), and the decode attention kernel
(stages.generation.paged_attention) over a bf16 and an 8-bit cache, compiled for an H100 (sm_90) by the
installed Triton, as a launch on the real vocabulary compiles them (pointers and integer arguments
specialized as the launch would specialize them), and their main loop counted: machine instructions per
token, shared-memory barriers per tile (a round trip of the tokens between the threads' layouts), and
registers. The loop is the part that runs once per tile of every chunk of every row; at 512 rows a pass meets
77.8M tokens, so its instructions per token set the pass's time once the GPU is bound by issuing them.

    python -m bench.kernel_code --commit SHA --out bench/results/kernel-code-DATE-sm90-SHA.json

It reads the PTX, which Triton emits on any machine, and the registers and, for the attention kernel, the
machine code's loop (SASS) from the cubin (cuobjdump, which Triton's CUDA backend brings); no GPU runs. The
SASS loop's warp-instructions a key (a tile's instructions, times the warps, over its keys) against a
kernel's measured rate says whether issuing them bounds it (an H100 issues ~0.9T warp-instructions a second).
Its loads to registers (LDG; cp.async's LDGSTS apart) show a tile's keys or values read a byte at a time.

The code is the installed Triton's, and versions differ: compile with the GPU's (torch 2.11 brings Triton 3.6,
torch 2.13 3.9; `pip install triton==3.6.0` into a separate venv) before reading a GPU timing from it.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from stages.generation import paged_attention, top_p  # noqa: E402

VOCAB = 151_936
ROW_STRIDE = VOCAB  # logits rows are contiguous
TYPES = {"logits": "*bf16", "row_stride": "i32", "vocab": "i32", "lows": "*i32", "step": "i32", "maxes": "*fp32",
         "part_max": "*fp32", "part_mass": "*fp32", "part_count": "*i32", "scale": "fp32", "bounds": "*i32",
         "shares": "*fp32", "seeds": "*i64", "part_score": "*fp32", "part_index": "*i32", "tile_keys": "*i32"}
INTEGERS = {"row_stride": ROW_STRIDE, "vocab": VOCAB}
INSTRUCTION = re.compile(r"^\s*(@!?%\w+\s+)?[a-z][\w.]*[\s;]")  # a PTX instruction line, predicated or not


def compile_kernel(kernel, flags: dict[str, bool], warps: int = 4):
    """The kernel for sm_90 with the module's constants and the given boolean constexprs."""
    names = list(inspect.signature(kernel.fn).parameters)
    constants = {"CHUNKS": -(-VOCAB // top_p.CHUNK), "CHUNK": top_p.CHUNK, "TILE": top_p.TILE,
                 "COUNT": top_p.THRESHOLDS} | flags
    signature = {name: "constexpr" if name in constants else TYPES[name] for name in names}
    # a launch marks pointers, and integers divisible by 16 unless told not to specialize them, as divisible
    specialized = [name for name in names if signature[name].startswith("*")
                   or (name in INTEGERS and name not in kernel.do_not_specialize and INTEGERS[name] % 16 == 0)]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in specialized}
    source = ASTSource(kernel, signature, constexprs={k: v for k, v in constants.items() if k in names}, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def main_loop(ptx: str, containing: str = "") -> list[str]:
    """The instructions of the innermost loop: from a label to the branch back to it, the shortest such (in
    the passes that skip tiles, the path of a skipped tile) among those with an instruction starting
    `containing` (the attention kernel's: "mma", not its merge's loop)."""
    lines = ptx.splitlines()
    labels = {line.strip().split(":")[0]: i for i, line in enumerate(lines)
              if re.match(r"^\$L__BB\d+_\d+:", line.strip())}
    loops = []
    for i, line in enumerate(lines):
        back = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if back and labels.get(back.group(1), i) < i:
            loops.append(lines[labels[back.group(1)] + 1:i + 1])
    body = min((loop for loop in loops if any(line.strip().startswith(containing) for line in loop)), key=len)
    return [line.strip() for line in body if INSTRUCTION.match(line)]


def cuobjdump(cubin: bytes, option: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(tool), option, file.name], capture_output=True, text=True, check=True).stdout


def registers(cubin: bytes) -> int:
    return int(re.search(r"REG:(\d+)", cuobjdump(cubin, "--dump-resource-usage")).group(1))


SASS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)")  # address, opcode, operands
SASS_KINDS = {"conversions": ("F2FP.F16.E4M3",), "moves": ("MOV", "IMAD.MOV"), "tensor_core": ("HMMA",),
              "shared_loads": ("LDS", "LDSM"), "barriers": ("BAR.SYNC",),
              "global_loads": ("LDG.E",)}  # to registers: cp.async's (LDGSTS) not counted


def sass_loop(cubin: bytes) -> dict[str, int]:
    """The machine code's main loop (the longest backward branch's body), counted: instructions, and those of
    each kind in SASS_KINDS (by opcode prefix)."""
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(SASS.match, cuobjdump(cubin, "-sass")
                                                                         .splitlines()) if m]
    loops = [(int(target.group(1), 16), address) for address, opcode, operands in code if opcode == "BRA"
             and (target := re.search(r"(0x[0-9a-f]+)", operands)) and int(target.group(1), 16) < address]
    first, last = max(loops, key=lambda loop: loop[1] - loop[0])
    body = [opcode for address, opcode, _ in code if first <= address <= last]
    return {"instructions": len(body)} | {kind: sum(opcode.startswith(prefixes) for opcode in body)
                                          for kind, prefixes in SASS_KINDS.items()}


def measure(name: str, kernel, flags: dict[str, bool], warps: int = 4) -> dict:
    compiled = compile_kernel(kernel, flags, warps)
    loop = main_loop(compiled.asm["ptx"])
    tokens_per_thread = top_p.TILE // (32 * warps)  # a tile's tokens, over the program's threads
    return {"kernel": name, **flags, "tile": top_p.TILE, "warps": warps,
            "loop_instructions_per_token": round(len(loop) / tokens_per_thread, 1),
            "barriers_per_tile": sum(line.startswith("bar.sync") for line in loop),
            "registers": registers(compiled.asm["cubin"])}


# The attention kernel as a decode step launches it on the 1.5B shape: 2 KV heads of 128, groups of 6 query
# heads, blocks of 512 tokens (8-bit values transposed), 17 blocks a slot, two blocks a partition (9 a slot).
ATTENTION_TYPES = {"query": "*bf16", "table": "*i64", "positions": "*i64", "order": "*i32", "out": "*fp32",
                   "lse": "*fp32", "result": "*bf16", "tickets": "*i32", "scale_log2": "fp32"}
ATTENTION_INTEGERS = {"q_slot": 12 * 128, "q_head": 128, "k_block": 512 * 256, "k_token": 256, "k_head": 128,
                      "v_block": 512 * 256, "v_head": 128 * 512, "v_dim": 512, "s_block": 1024, "s_token": 2,
                      "t_slot": 17, "o_slot": 9 * 12 * 128, "o_part": 12 * 128, "o_head": 128, "l_slot": 9 * 12,
                      "l_part": 12, "r_slot": 12 * 128, "r_head": 128}


def measure_attention(eight_bit: bool, tile: int = paged_attention.TILE, warps: int = paged_attention.WARPS,
                      stages: int = paged_attention.STAGES) -> dict:
    """The attention kernel's loop: instructions a tile of `tile` tokens (their keys and values)."""
    kernel = paged_attention.partials
    names = list(inspect.signature(kernel.fn).parameters)
    constants = {"BLOCK": 512, "PART": 1024, "GROUPS": 6, "ROWS": paged_attention.ROWS, "DIM": 128,
                 "TILE": tile, "SCALED": eight_bit, "FLOAT_DOTS": False, "ORDERED": True, "MERGED": True,
                 "KV_HEADS": 2}
    cache = "*fp8e4nv" if eight_bit else "*bf16"
    types = ATTENTION_TYPES | {"keys": cache, "values": cache, "key_scales": "*fp32" if eight_bit else cache,
                               "value_scales": "*fp32" if eight_bit else cache}
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in names}
    specialized = [name for name in names if signature[name].startswith("*")
                   or ATTENTION_INTEGERS.get(name, 1) % 16 == 0]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in specialized}
    source = ASTSource(kernel, signature, constexprs={k: v for k, v in constants.items() if k in names}, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    loop = main_loop(compiled.asm["ptx"], "mma")
    sass = sass_loop(compiled.asm["cubin"])
    return {"kernel": "paged_attention.partials", "cache": "e4m3" if eight_bit else "bf16",
            "tile": tile, "warps": warps, "loop_instructions_per_tile": len(loop),
            "byte_loads_per_tile": sum(bool(re.search(r"ld\.(global|shared)\.b8", line)) for line in loop),
            "registers": registers(compiled.asm["cubin"]), "shared_bytes": compiled.metadata.shared,
            # a thread's (each of the program's warps runs it): all the warps' a key of one KV head
            "sass_loop_per_tile": sass,
            "sass_warp_instructions_per_key": round(sass["instructions"] * warps / tile, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = list(inspect.signature(top_p.masses.fn).parameters)
    flags = [name for name in ("FIRST", "GROUPS") if name in names]  # a pass's variants, by commit
    if flags == ["FIRST", "GROUPS"]:  # the first pass, the middle two, the last
        passes = [{"FIRST": True, "GROUPS": False}, {"FIRST": False, "GROUPS": False}, {"FIRST": False, "GROUPS": True}]
    else:
        passes = [{flags[0]: False}, {flags[0]: True}] if flags else [{}]
    draw_flags = {"SKIP": True} if "SKIP" in inspect.signature(top_p.draw.fn).parameters else {}
    results = {"target": "sm_90", "triton": triton.__version__, "date": datetime.date.today().isoformat(),
               "commit": args.commit, "command": "python -m bench.kernel_code", "vocab": VOCAB,
               "kernels": [measure("masses", top_p.masses, flags) for flags in passes]
               + [measure("draw", top_p.draw, draw_flags)],
               "attention": [measure_attention(False), measure_attention(True),
                             measure_attention(True, paged_attention.WIDE_TILE)]
               # fewer warps a program, fewer exchanged between (not launched by the stage: candidates)
               + [measure_attention(True, tile, warps) for tile, warps in ((32, 1), (64, 1), (64, 2))]}
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
