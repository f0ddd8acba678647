"""Continuous batching on a CUDA GPU with a random-weight model of the real 1.5B shape: the same tokens as
transformers' generate where the arithmetic allows it (fp32), and FlashAttention's decode path against the
masked SDPA one in bf16.

    pytest -m gpu
"""

import dataclasses

import pytest
import torch

from stages.core import params
from stages.generation import batched as generation
from stages.generation import continuous
from tests import random_model
from tests.generation.test_continuous import ROOT, reference_ids

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model.for_tests(tmp_path_factory)


def test_greedy_continuous_batching_returns_the_tokens_of_generate_in_fp32(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map={"": 0},
                                                 attn_implementation=generation.register_attention()).eval()
    prompts = [f"Find x if {i}x + {i + 3} = {7 * i}. " * (1 + i % 3) for i in range(12)]
    end_at = [8 + 5 * (i % 4) for i in range(12)]  # uneven ends: slots are refilled and the batch shrinks
    config = dataclasses.replace(params.load("eval", ROOT / "params.yaml"), temperature=0.0, max_new_tokens=32,
                                 batch_size=8, batching="continuous", static_cache=True)
    stats = {}
    outputs = generation.generate(model, tokenizer, prompts, config, seed=0, end_at=end_at, stats=stats)
    assert stats["graph_sizes"] and stats["compiled"]  # the CUDA graphs of the compiled step ran
    for prompt, output, end in zip(prompts, outputs, end_at, strict=True):
        expected = reference_ids(model, tokenizer, prompt, end)
        assert generation.to_generation(tokenizer, expected[:end - 1] + [tokenizer.eos_token_id],
                                        tokenizer.eos_token_id) == output


def test_flash_decode_attention_matches_masked_sdpa_in_bf16(model_dir):
    assert continuous.flash_decode_available(torch.device("cuda"), torch.bfloat16)
    torch.manual_seed(0)
    slots, length, kv_heads, heads, head_dim = 16, 1024, 2, 12, 128
    keys, values = (torch.randn(slots, length, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
    query = torch.randn(slots, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, length, (slots,), device="cuda")
    flash = continuous.DecodeStep(positions, flash=True).attend(query, keys, values, head_dim ** -0.5)
    masked = continuous.DecodeStep(positions, flash=False).attend(query, keys, values, head_dim ** -0.5)
    torch.testing.assert_close(flash, masked, atol=2e-2, rtol=2e-2)


def test_sampled_generation_with_graphs_ends_where_forced_and_repeats_with_the_seed(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = generation.load_model(params.ModelParams(str(model_dir), "main", 4096, ""), None)
    config = dataclasses.replace(params.load("eval", ROOT / "params.yaml"), max_new_tokens=64, batch_size=16,
                                 batching="continuous", static_cache=True)
    prompts = [f"What is {i} squared? Explain." for i in range(40)]
    end_at = [1 + (7 * i) % 64 for i in range(40)]
    stats = {}
    first = generation.generate(model, tokenizer, prompts, config, seed=3, end_at=end_at, stats=stats)
    assert stats["compiled"]  # 16 slots: the sampler's cumulative sums once failed to compile at this size
    # Random weights seldom end by themselves (1 sampled end-of-sequence in 12,800 draws on an H200; one of
    # these 40 responses did on an H100): each response ends where forced, or before it with a sampled end.
    assert all(o.n_tokens == end or (o.n_tokens < end and not o.hit_max_tokens)
               for o, end in zip(first, end_at, strict=True))
    assert sum(o.n_tokens == end for o, end in zip(first, end_at, strict=True)) >= len(end_at) - 2
    assert generation.generate(model, tokenizer, prompts, config, seed=3, end_at=end_at) == first
