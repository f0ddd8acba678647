"""A random-weight model of the exact DeepSeek-R1-Distill-Qwen-1.5B shape (1.777B parameters, bf16) and a small
tokenizer with the real special tokens and chat template, for GPU tests and benchmarks where the hub is unreachable.

    python -m tests.random_model OUT_DIR [--layers N] [--device cuda|cpu]

Same config, dtype and kernels as the real model, so speed and memory are representative; its outputs are
noise (generation never stops early by itself).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from tests import tiny_model

# config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
SHAPE = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
         "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 131072, "rope_theta": 10000.0,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False, "hidden_act": "silu"}
# The tokenizer's training text; the benchmarks' prompt lengths (e.g. 164 tokens) were measured with it.
TOKENIZER_TEXT = "Find x if 2x + 3 = 7. Wait, 2x = 4, so x = 2. The answer is \\boxed{2}."


def config(**shape):
    """The real model's Qwen2Config, with any SHAPE entry replaced (e.g. num_hidden_layers=2 for a quick check)."""
    from transformers import Qwen2Config

    unknown = set(shape) - set(SHAPE)
    if unknown:
        raise ValueError(f"random_model: unknown shape keys {sorted(unknown)} (known: {sorted(SHAPE)})")
    # bos and eos: the tokenizer's first two special tokens
    return Qwen2Config(**(SHAPE | shape), bos_token_id=0, eos_token_id=1, dtype="bfloat16")


def build(out: str | Path, *, device: str | None = None, seed: int = 0, **shape) -> Path:
    """Write the tokenizer and random bf16 safetensors weights of config(**shape) to out, replacing a model
    there; written to a side folder and renamed, so a folder out that exists is complete."""
    import torch
    from transformers import Qwen2ForCausalLM

    out = Path(out)
    if out.exists() and not (out / "config.json").is_file():
        raise FileExistsError(f"random_model: {out} exists and holds no model; remove it or choose another folder")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tiny_model.build_tokenizer(partial, corpus=[TOKENIZER_TEXT])
    torch.manual_seed(seed)
    with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
        model = Qwen2ForCausalLM(config(**shape)).to(torch.bfloat16)
    model.save_pretrained(partial, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def for_tests(tmp_path_factory) -> Path:
    """R1_RANDOM_MODEL when set (given the R1 chat template), else a model of the real shape built once per test
    session under pytest's temporary folder."""
    if given := os.environ.get("R1_RANDOM_MODEL"):
        tiny_model.add_chat_template(given)
        return Path(given)
    out = tmp_path_factory.getbasetemp() / "r1-random"
    return out if out.is_dir() else build(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args()
    model_dir = build(args.out, device=args.device, num_hidden_layers=args.layers)
    print(model_dir)


if __name__ == "__main__":
    main()
