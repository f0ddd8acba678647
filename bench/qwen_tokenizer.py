"""A tokenizer with the real Qwen2 vocabulary (the one DeepSeek-R1-Distill-Qwen uses), built offline
from Qwen's `qwen.tiktoken` rank file, for benchmarks on machines without the Hugging Face Hub.

The rank file ships in the `qwen-agent` wheel on PyPI (qwen_agent/utils/qwen.tiktoken, 151,643 byte-level
BPE tokens; sha256 b2b1b8df...a33186 in qwen-agent 0.0.34):

    pip download --no-deps -d /tmp/dl qwen-agent==0.0.34
    unzip -o /tmp/dl/qwen_agent-0.0.34-py3-none-any.whl qwen_agent/utils/qwen.tiktoken -d /tmp/qwen
    python -m bench.qwen_tokenizer /tmp/qwen/qwen_agent/utils/qwen.tiktoken /tmp/qwen-r1-tokenizer

Pre-tokenizer and merges follow Qwen2's tokenizer.json (NFC, Qwen's split regex with single digits,
byte-level); special tokens and chat template are the R1-Distill ones of tests/tiny_model.py.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

from tests import tiny_model


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build(ranks_file: Path, out: Path) -> Path:
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = read_ranks(ranks_file)
    converter = TikTokenConverter(vocab_file=str(ranks_file), pattern=tiny_model.QWEN2_SPLIT,
                                  extra_special_tokens=tiny_model.SPECIAL)
    converter.load_tiktoken_bpe = lambda _: ranks  # tiktoken itself is not needed to read the file
    tok = converter.converted()
    tok.model.ignore_merges = False  # as in Qwen2's tokenizer.json
    tok.normalizer = normalizers.NFC()  # the converter already split with the pattern, then byte-level
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=tiny_model.BOS, eos_token=tiny_model.EOS,
                                   pad_token=tiny_model.EOS)
    fast.chat_template = tiny_model.TEMPLATE.read_text()
    fast.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.qwen_tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ranks", type=Path, help="qwen.tiktoken, Qwen's rank file")
    parser.add_argument("out", type=Path, help="the tokenizer's folder, written")
    args = parser.parse_args()
    print(build(args.ranks, args.out))
