"""A tiny random Qwen2 model whose tokenizer carries the real DeepSeek-R1-Distill chat template and
special tokens, built in seconds on a CPU, for offline tests and the laptop smoke run.

    python -m tests.tiny_model OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

TEMPLATE = Path(__file__).parent / "assets" / "deepseek-r1-distill-chat-template.jinja"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2 and DeepSeek-R1-Distill-Qwen): single digits.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = [
    "What is 12 + 13? I add the numbers. Wait, let me double-check: 12 + 13 = 25. The answer is \\boxed{25}.",
    "Find x if 2x + 3 = 7. Hmm, 2x = 4, so x = 2. Actually, no wait, that is right: $x = \\frac{4}{2}$.",
    "Explain briefly. The sum of 0 and 1 is 1; 0123456789 +-*/=()[]{}\\^_$.,;:!? abcdefghijklmnopqrstuvwxyz",
]


def build_tokenizer(out: Path, *, qwen_split: bool = False, corpus: list[str] = CORPUS):
    """A byte-level BPE trained on corpus; GPT-2's pre-tokenizer, or with qwen_split Qwen2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen_split:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    fast.chat_template = TEMPLATE.read_text()
    fast.save_pretrained(out)
    return fast


def add_chat_template(model_dir: str | Path) -> None:
    """Give the tokenizer of a model folder made elsewhere (R1_RANDOM_MODEL=DIR) the real R1 chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TEMPLATE.read_text()
    tokenizer.save_pretrained(model_dir)


def build(out: str | Path, *, with_weights: bool = True, seed: int = 0) -> Path:
    """Write the tokenizer and (unless with_weights is False) a 2-layer random Qwen2 model to out."""
    out = Path(out)
    tokenizer = build_tokenizer(out)
    if with_weights:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=4096, tie_word_embeddings=False,
                             initializer_range=0.3,  # wide enough logits for LoRA alone to fit data
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(seed)
        Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1]))
