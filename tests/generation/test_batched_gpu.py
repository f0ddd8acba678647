"""Continuous batching on a CUDA GPU with a random-weight model of the real 1.5B shape: the same tokens as
transformers' generate where the arithmetic allows it (fp32), and the Triton decode kernel against the
masked SDPA one in bf16.

    pytest -m gpu
"""

import dataclasses

import pytest
import torch

from stages.core import params
from stages.generation import batched as generation
from stages.generation import continuous, paged_attention
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


@pytest.mark.parametrize("eight_bit", [False, True])  # eval.kv_cache: model, fp8
@pytest.mark.parametrize("block", [512, 48])  # 48: a block's end inside a kernel's tile of keys
# partitions of 128 tokens (blocks of 512; one block of 48), of 3 blocks, of all 6 (slots x 2 x 6 = 192)
@pytest.mark.parametrize("programs", [4096, 64, 1])
def test_the_triton_decode_kernel_over_scattered_blocks_matches_masked_sdpa_in_bf16(block, programs, eight_bit,
                                                                                     monkeypatch):
    monkeypatch.setattr(paged_attention, "PROGRAMS", programs)
    torch.manual_seed(0)
    block = 64 if eight_bit and block % paged_attention.TILE else block  # 8-bit: whole tiles a block
    slots, per_slot, kv_heads, heads, head_dim = 16, 6, 2, 12, 128
    assert paged_attention.available(torch.device("cuda"), torch.bfloat16, head_dim, eight_bit)
    keys, values = (torch.randn(1 + slots * per_slot, block, kv_heads, head_dim, device="cuda",
                                dtype=torch.bfloat16) for _ in range(2))
    scales = None
    if eight_bit:
        (keys, key_scales), (values, value_scales) = paged_attention.quantize(keys), paged_attention.quantize(values)
        values, scales = paged_attention.value_layout(values), (key_scales, value_scales)
    table = (torch.randperm(slots * per_slot, device="cuda") + 1).view(slots, per_slot)
    query = torch.randn(slots, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, block * per_slot, (slots,), device="cuda")
    # the first token, a full block, a block's first token, every token of the slot's blocks
    positions[:4] = torch.tensor([0, block - 1, block, block * per_slot - 1])
    paged = continuous.DecodeStep(positions, table, "triton", scales).attend(query, keys, values, head_dim ** -0.5)
    masked = continuous.DecodeStep(positions, table, "sdpa", scales).attend(query.float(), keys, values,
                                                                            head_dim ** -0.5)
    torch.testing.assert_close(paged.float(), masked, atol=1e-2, rtol=1e-2)


def test_compiled_graph_steps_over_small_blocks_give_generates_tokens_in_fp32_and_pause_without_loss(model_dir):
    """Blocks of 16 tokens (responses span several), then a cache of 4 blocks for 8 slots (responses are
    paused and resumed): the tokens of transformers' generate, every response to its budget."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map={"": 0},
                                                 attn_implementation=generation.register_attention()).eval()
    prompts = [tokenizer(f"Find x if {i}x + {i + 3} = {7 * i}.", add_special_tokens=False)["input_ids"]
               for i in range(12)]
    budgets = [8 + 5 * (i % 4) for i in range(12)]
    length = max(map(len, prompts)) + max(budgets)
    runs = {}
    for cache in (None, 4 * 16):
        engine = continuous.ContinuousBatcher(model, 8, length, eos=-1, temperature=0.0, top_p=1.0, compile=True,
                                              block=16, cache_tokens=cache)
        done = {}
        with torch.inference_mode():
            engine.run(prompts, budgets, done.__setitem__)
        assert engine.stats.compiled and engine.stats.graph_sizes
        runs[cache] = (done, engine.stats.preempted)
    assert runs[None][1] == 0 and runs[64][1] > 0
    assert runs[64][0] == runs[None][0]
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budgets[i],
                                    min_new_tokens=budgets[i], do_sample=False, pad_token_id=0)
        assert runs[None][0][i] == output[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kv_cache", ["model", "fp8"])
def test_sampled_generation_with_graphs_ends_where_forced_and_repeats_with_the_seed(model_dir, kv_cache):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = generation.load_model(params.ModelParams(str(model_dir), "main", 4096, ""), None)
    config = dataclasses.replace(params.load("eval", ROOT / "params.yaml"), max_new_tokens=64, batch_size=16,
                                 batching="continuous", static_cache=True, kv_cache=kv_cache)
    prompts = [f"What is {i} squared? Explain." for i in range(40)]
    end_at = [1 + (7 * i) % 64 for i in range(40)]
    stats = {}
    first = generation.generate(model, tokenizer, prompts, config, seed=3, end_at=end_at, stats=stats)
    assert stats["compiled"]  # 16 slots: the sampler's cumulative sums once failed to compile at this size
    assert stats["attention"] == "triton" and stats["top_p_kernels"] and stats["fused_projections"]  # in the graphs
    assert stats["kv_cache"] == {"model": "bfloat16", "fp8": "float8_e4m3fn"}[kv_cache]
    # Random weights seldom end by themselves (1 sampled end-of-sequence in 12,800 draws on an H200; one of
    # these 40 responses did on an H100): each response ends where forced, or before it with a sampled end.
    assert all(o.n_tokens == end or (o.n_tokens < end and not o.hit_max_tokens)
               for o, end in zip(first, end_at, strict=True))
    assert sum(o.n_tokens == end for o, end in zip(first, end_at, strict=True)) >= len(end_at) - 2
    assert generation.generate(model, tokenizer, prompts, config, seed=3, end_at=end_at) == first


@pytest.mark.parametrize("case", ["ties", "peaked", "flat"])
def test_the_top_p_kernels_draw_each_token_as_often_as_the_sorted_reference_says(case):
    """400,000 draws from one row of logits, each with its own sampling hash: per token, the count against
    the reference's probability (top_p.kept_shares: transformers' cut by sorting, ties at the cut sharing what
    it leaves them); no token outside the kept set is drawn. A chi-square over the kept tokens. The peaked
    case's 400,000 rows of 20,000 tokens pass 2**31 elements: the kernels' row offsets must not overflow."""
    from stages.generation import top_p

    generator = torch.Generator().manual_seed(1)
    row = {"ties": torch.tensor([5.0, 5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 0.5]),
           "peaked": torch.randn(20_000, generator=generator) * 4,
           "flat": torch.randn(3_000, generator=generator) * 0.5}[case]
    draws = 400_000
    logits = row.bfloat16().cuda()[None].expand(draws, -1).contiguous()
    hashes = continuous.sampling_hashes(torch.arange(draws, device="cuda"), torch.full((draws,), 11, device="cuda"))
    counts = torch.bincount(top_p.top_p_sample(logits, hashes, 0.6, 0.8), minlength=len(row)).cpu().double()
    expected = top_p.kept_shares(logits[:1].float().cpu(), 0.6, 0.8)[0] * draws
    kept = expected > 0
    assert counts[~kept].sum() == 0
    chi2 = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10  # ~6 standard deviations of a chi-square with dof degrees


def test_the_cache_is_sized_with_the_memory_pytorch_holds_cached_from_freed_tensors(model_dir):
    """An earlier model's cache or a test's tensors, freed, stay reserved by PyTorch's allocator: they are
    free for this process, and the KV cache counts them."""
    model = generation.load_model(params.ModelParams(str(model_dir), "main", 4096, ""), None)
    before = generation.cache_tokens(model, model.dtype, 512)
    held = torch.empty(8 * 2**30, dtype=torch.uint8, device="cuda")
    del held  # 8 GiB now cached by the allocator, not free to the device
    assert generation.cache_tokens(model, model.dtype, 512) >= 0.99 * before


@pytest.mark.parametrize("kv_cache", ["model", "fp8"])
def test_the_attention_kernels_every_graph_size_launches_are_compiled_before_the_first_step(model_dir, kv_cache):
    """ContinuousBatcher compiles the attention kernel's variants (a partition size per graph size) in threads
    before its first step; compiling the step and capturing its graphs then finds each one compiled: Triton's
    cache of them does not grow. Blocks of a size no other test uses: the variants are new here."""
    from stages.generation.paged_attention import merge, partials

    model = generation.load_model(params.ModelParams(str(model_dir), "main", 4096, ""), None)
    eight_bit = kv_cache == "fp8"
    # 72 slots of up to 8,192 tokens in blocks of 576: partitions of 128 to 320 tokens among the graph sizes
    engine = continuous.ContinuousBatcher(
        model, 72, 8192, eos=-1, temperature=0.6, top_p=0.95, compile=True, block=576, cache_tokens=64 * 576,
        kv_dtype=paged_attention.EIGHT_BIT if eight_bit else None)
    assert engine.attention == "triton" and engine.use_graphs

    def compiled() -> int:
        device = torch.cuda.current_device()
        return len(partials.device_caches[device][0]) + len(merge.device_caches[device][0])

    before = compiled()
    engine._compile_kernels()
    ahead = compiled()
    done = {}
    with torch.inference_mode():
        engine.run([[1, 2, 3]] * 5, [3] * 5, done.__setitem__)
    assert engine.stats.compiled and len(engine.stats.graph_sizes) > 5 and len(done) == 5
    assert ahead > before + 2  # partition sizes differ among the graph sizes
    assert compiled() == ahead
