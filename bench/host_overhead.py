"""Benchmark without a GPU: the continuous engine's own bookkeeping between decode steps (reading each slot's
token back, ending responses, refilling and growing slots), with the step itself replaced by a no-op that
draws no end-of-sequence, on the tiny test model. What is left is host time a GPU would sit idle for (the
engine reads the tokens back after every step): milliseconds a step, per slot count.

    python -m bench.host_overhead --slots 512,1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from stages.generation.continuous import ContinuousBatcher
from tests import tiny_model


def bookkeeping_ms(model, slots: int, seed: int = 0) -> dict:
    """Two prompts a slot, responses of 100-500 tokens: the engine's loop with a no-op step and prefill."""
    engine = ContinuousBatcher(model, slots, 600, eos=-1, temperature=0.6, top_p=0.95, compile=False)

    def step(size: int) -> None:
        engine.tokens[:size] = 7
        engine.stats.decode_steps += 1
        engine.stats.slot_steps += size

    engine._step = step
    engine._prefill = lambda group, prompts, keys: [7] * len(group)
    draw = random.Random(seed)
    budgets = [draw.randint(100, 500) for _ in range(2 * slots)]
    start = time.perf_counter()
    engine.run([[1, 2, 3]] * len(budgets), budgets, lambda index, ids: None)
    seconds = time.perf_counter() - start
    return {"slots": slots, "decode_steps": engine.stats.decode_steps,
            "ms_per_step": round(1e3 * seconds / engine.stats.decode_steps, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", default="512,1024")
    parser.add_argument("--commit", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model.build(tempfile.mkdtemp()))
    results = {"cpu": platform.processor() or platform.machine(), "date": datetime.date.today().isoformat(),
               "commit": args.commit, "command": f"python -m bench.host_overhead --slots {args.slots}",
               "runs": [bookkeeping_ms(model, int(n)) for n in args.slots.split(",")]}
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
