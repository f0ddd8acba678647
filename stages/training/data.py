"""Training examples from the splits' rows: token ids with the prompt masked out of the loss, kept compact,
and the collator that batches them (padding-free packed rows, or padded ones).

Imports torch only; transformers is imported inside functions, so stages/train.py can import Unsloth first.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from stages.core.prompts import encode_pairs, example_texts
from stages.training.choices import TrainError

IGNORE_INDEX = -100  # label value the loss skips: the prompt is context, not a target


class Examples(torch.utils.data.Dataset):
    """Tokenized examples kept as int32 arrays: 4 bytes a token, where Python lists of ints take ~10x
    that (a real train split holds ~10^8 tokens)."""

    def __init__(self, ids: list[np.ndarray], prompt_lengths: list[int]):
        self.ids, self.prompt_lengths = ids, prompt_lengths

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        ids = self.ids[index].tolist()
        prompt = self.prompt_lengths[index]
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def tokenize(tokenizer, table: pa.Table, max_seq_length: int, split: str, *, directive: str,
             chunk_rows: int = 1024) -> Examples:
    """Examples as input ids + labels, the prompt masked out of the loss. Nothing is truncated."""
    ids, prompt_lengths = [], []
    for start in range(0, table.num_rows, chunk_rows):
        chunk = table.slice(start, chunk_rows)
        rows = zip(chunk["instruction"].to_pylist(), chunk["reasoning"].to_pylist(), chunk["answer"].to_pylist(),
                   strict=True)
        pairs = [example_texts(tokenizer, *row, directive=directive) for row in rows]
        prompts, completions = encode_pairs(tokenizer, pairs)
        for prompt, completion in zip(prompts, completions, strict=True):
            length = len(prompt) + len(completion)
            if length > max_seq_length:
                raise TrainError(f"train: a {split} example has {length} tokens, above model.max_seq_length="
                                 f"{max_seq_length}; re-run the filter stage with this model's tokenizer "
                                 "(filter.check_length: true) so such examples are dropped, not truncated")
            ids.append(np.array(prompt.ids + completion.ids, dtype=np.int32))
            prompt_lengths.append(len(prompt))
    return Examples(ids, prompt_lengths)


def collator(tokenizer, packing: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        # One row of concatenated sequences; position ids restart per sequence, so attention
        # (SDPA, flash attention, Unsloth) stays within each example.
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
