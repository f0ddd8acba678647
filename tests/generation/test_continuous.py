"""Continuous batching (stages.generation.continuous) on CPU with the tiny model: the tokens of transformers' generate,
sampling as transformers' top-p cuts it, forced ends for benchmarks."""

import dataclasses
import itertools
import types
from pathlib import Path

import pytest
import torch

from stages.core import params
from stages.generation import batched as generation
from stages.generation import continuous, paged_attention

ROOT = Path(__file__).resolve().parents[2]


def reference_ids(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy new ids from transformers' generate for the prompt alone (no padding)."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    return output[0, ids.shape[1]:].tolist()


def forced_end(ids: list[int], end: int, eos: int) -> list[int]:
    """ids ended as end_at=end forces: end-of-sequence as token number `end` unless one came before."""
    return ids if eos in ids[:end] else ids[:end - 1] + [eos]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return generation.load_model(params.ModelParams(str(tiny_model_dir), "main", 1024, ""), None)


def eval_config(**changes) -> params.EvalParams:
    return dataclasses.replace(params.load("eval", ROOT / "params.yaml"), **changes)


PROMPTS = [f"What is {i} plus {3 * i}? " * (1 + i % 4) for i in range(37)]


def test_greedy_continuous_batching_returns_the_tokens_of_generate_for_each_prompt(model, tokenizer):
    config = eval_config(temperature=0.0, max_new_tokens=24, batch_size=16, batching="continuous")
    stats = {}
    outputs = generation.generate(model, tokenizer, PROMPTS, config, seed=0, stats=stats)
    assert stats["prefill_calls"] > 1  # slots were refilled ...
    assert stats["slot_steps"] < stats["decode_steps"] * 16  # ... and the batch shrank once no prompt waited
    assert any(not o.hit_max_tokens for o in outputs) and any(o.hit_max_tokens for o in outputs)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output == generation.to_generation(tokenizer, reference_ids(model, tokenizer, prompt, 24),
                                                  tokenizer.eos_token_id)


def test_no_prompts_give_no_generations_and_allocate_nothing(model, tokenizer, monkeypatch):
    monkeypatch.setattr(generation, "ContinuousBatcher", None)  # would fail if a cache were built
    assert generation.generate(model, tokenizer, [], eval_config(batching="continuous"), seed=0) == []


def test_both_routes_end_responses_where_forced_and_agree_when_greedy(model, tokenizer):
    end_at = [1 + (5 * i) % 20 for i in range(len(PROMPTS))]
    eos = tokenizer.eos_token_id
    routes = {}
    for batching in ("continuous", "padded"):
        config = eval_config(temperature=0.0, max_new_tokens=20, batch_size=8, batching=batching)
        routes[batching] = generation.generate(model, tokenizer, PROMPTS, config, seed=0, end_at=end_at)
    assert routes["continuous"] == routes["padded"]
    for prompt, output, end in zip(PROMPTS, routes["continuous"], end_at, strict=True):
        expected = forced_end(reference_ids(model, tokenizer, prompt, end), end, eos)
        assert output == generation.to_generation(tokenizer, expected, eos)


def test_sampling_repeats_with_the_seed_and_changes_with_another(model, tokenizer):
    config = eval_config(temperature=0.6, top_p=0.95, max_new_tokens=16, batch_size=8, batching="continuous")
    first = generation.generate(model, tokenizer, PROMPTS[:12], config, seed=1)
    assert generation.generate(model, tokenizer, PROMPTS[:12], config, seed=1) == first
    assert generation.generate(model, tokenizer, PROMPTS[:12], config, seed=2) != first


def test_the_sampler_keeps_transformers_top_p_set_and_draws_in_proportion():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    logits = (probabilities.log() * 0.6).expand(40_000, -1).contiguous()  # /0.6 restores the probabilities
    hashes = continuous.sampling_hashes(torch.arange(40_000), torch.full((40_000,), 7))  # one key per row
    draws = continuous.sampler(temperature=0.6, top_p=0.9)(logits, hashes)
    kept = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.6)(None, logits[:1].clone()))[0] > float("-inf")
    assert kept.tolist() == [True, True, True, False, False]
    counts = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.where(kept, probabilities, 0) / probabilities[kept].sum()
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)


def test_greedy_sampler_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert continuous.sampler(temperature=0.0, top_p=0.95)(logits, torch.arange(2)).tolist() == [1, 0]


def test_the_sampling_numbers_are_uniform_and_change_with_key_and_position():
    keys = torch.tensor([0, 1, 2**40, 2**63 - 1]).repeat_interleave(25_000)
    numbers = continuous.uniforms(continuous.sampling_hashes(keys, torch.arange(100_000) % 25_000))
    assert 0 < numbers.min() and numbers.max() < 1
    counts = torch.histc(numbers, bins=20, min=0, max=1)
    assert ((counts - 5_000).abs() < 5_000 * 0.05).all()  # 20 bins of 5,000 +- 5% (about 7 standard deviations)
    assert numbers.unique().numel() > 99_000  # 24 bits: a few collisions among 100,000
    neighbours = continuous.uniforms(continuous.sampling_hashes(torch.full((10_000,), 5), torch.arange(10_000)))
    assert abs(torch.corrcoef(torch.stack([neighbours[:-1], neighbours[1:]]))[0, 1]) < 0.05


def test_a_sampled_response_does_not_depend_on_its_batch_slots_or_neighbours(model, tokenizer):
    prompts = PROMPTS[:12] * 2  # each problem twice: two samples
    keys = generation.sampling_keys(prompts, seed=5)
    outputs = {}
    for slots in (4, 16):
        config = eval_config(temperature=0.6, top_p=0.95, max_new_tokens=16, batch_size=slots, batching="continuous")
        outputs[slots] = generation.generate(model, tokenizer, prompts, config, seed=5)
    assert outputs[4] == outputs[16]
    alone = generation.generate(model, tokenizer, prompts[7:9], config, seed=5, keys=keys[7:9])
    assert alone == outputs[4][7:9]
    assert outputs[4][:12] != outputs[4][12:]  # the second sample of a problem is drawn apart from the first


def test_a_model_with_sliding_window_layers_is_refused_with_a_reason(model):
    class Sliding:
        config = dataclasses.make_dataclass("C", [("layer_types", list)])(["full_attention", "sliding_attention"])
        device, dtype = model.device, model.dtype

        def get_decoder(self):
            return None

        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="sliding"):
        continuous.ContinuousBatcher(Sliding(), slots=4, length=16, eos=0, temperature=0.0, top_p=1.0)


def test_a_decoder_without_the_parts_a_decode_step_runs_is_refused_naming_them(model):
    class Decoder(torch.nn.Module):  # layers and a norm, but no embeddings or rotary positions of its own
        def __init__(self):
            super().__init__()
            self.layers, self.norm = torch.nn.ModuleList(), torch.nn.Identity()

    class Other:
        config, device, dtype = model.config, model.device, model.dtype

        def get_decoder(self):
            return Decoder()

        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match="embed_tokens, rotary_emb, layers, norm itself.*\\(Decoder\\) lacks some"):
        continuous.ContinuousBatcher(Other(), slots=4, length=16, eos=0, temperature=0.0, top_p=1.0)


@pytest.mark.parametrize("batching", ["continuous", "padded"])
def test_each_route_reports_the_share_of_decode_slots_that_kept_a_token(model, tokenizer, batching):
    config = eval_config(temperature=0.0, max_new_tokens=8, batch_size=4, batching=batching)
    stats = {}
    outputs = generation.generate(model, tokenizer, PROMPTS[:4], config, seed=0, end_at=[2, 4, 6, 8], stats=stats)
    lengths = [o.n_tokens for o in outputs]
    # one batch of 4 either way (4 slots are below the smallest graph): it decodes until its longest ends
    assert stats["decode_slot_share"] == sum(n - 1 for n in lengths) / (4 * (max(lengths) - 1))


def reference_varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_q, max_k, dropout, causal,
                               debug_mask, *, scale=None, seqused_k=None):
    """FlashAttention's variable-length forward as documented, one sequence at a time: rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1] of query attend to the first seqused_k[i] rows from cu_seqlens_k[i] of
    key/value (non-causal), head h to key head h // (heads / key heads); returns the output and each row's
    log-sum-exp of scores [heads, rows] (+inf for a sequence without keys, whose output is 0)."""
    assert not causal and dropout == 0.0
    output = torch.zeros_like(query)
    lse = torch.full((query.shape[1], query.shape[0]), float("inf"))
    groups = query.shape[1] // key.shape[1]
    for i in range(len(cu_seqlens_q) - 1):
        start, end, k0 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i])
        used = int(seqused_k[i]) if seqused_k is not None else int(cu_seqlens_k[i + 1]) - k0
        if used == 0:
            continue
        k = key[k0:k0 + used].repeat_interleave(groups, dim=1).transpose(0, 1)  # [heads, used, dim]
        v = value[k0:k0 + used].repeat_interleave(groups, dim=1).transpose(0, 1)
        q = query[start:end].transpose(0, 1)  # [heads, rows, dim]
        scores = q @ k.transpose(1, 2) * scale
        lse[:, start:end] = scores.logsumexp(-1)
        output[start:end] = (scores.softmax(-1) @ v).transpose(0, 1)
    return output, lse, None, None, None


def test_the_flash_decode_reads_each_slots_blocks_and_weighs_them_into_attention_over_its_tokens(monkeypatch):
    """The fallback GPU path gives FlashAttention one sequence per (slot, block), its rows the query heads of
    a key head, and merges the blocks by their log-sum-exps; checked against masked SDPA over the gathered blocks
    with FlashAttention's documented semantics standing in for the CUDA kernel, and both against plain
    attention over each slot's tokens."""
    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", reference_varlen_attention)
    torch.manual_seed(0)
    slots, block, per_slot, kv_heads, heads, head_dim = 5, 8, 4, 2, 12, 16
    keys, values = (torch.randn(1 + slots * per_slot, block, kv_heads, head_dim) for _ in range(2))
    table = (torch.randperm(slots * per_slot) + 1).view(slots, per_slot)  # scattered, block 0 left out
    query = torch.randn(slots, heads, 1, head_dim)
    positions = torch.tensor([0, 3, 31, 17, 8])  # one block, one, all four, three, two (a block's first token)
    flash = continuous.DecodeStep(positions, table, "flash").attend(query, keys, values, head_dim ** -0.5)
    masked = continuous.DecodeStep(positions, table, "sdpa").attend(query, keys, values, head_dim ** -0.5)
    torch.testing.assert_close(flash, masked)
    # and masked SDPA itself is plain attention over each slot's first position + 1 keys, head h on kv h // 6
    for slot, position in enumerate(positions.tolist()):
        tokens = keys[table[slot]].reshape(-1, kv_heads, head_dim)[:position + 1]
        k = tokens.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        v = values[table[slot]].reshape(-1, kv_heads, head_dim)[:position + 1]
        v = v.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        expected = torch.nn.functional.scaled_dot_product_attention(query[slot], k, v, scale=head_dim ** -0.5)
        torch.testing.assert_close(masked[slot, 0], expected[:, 0])


def test_a_response_that_finds_no_free_block_is_paused_and_resumed_with_the_tokens_it_would_have_drawn(model):
    """A cache of 4 blocks of 8 tokens for 4 slots: responses of 4-token prompts, which grow to 3 blocks, run out
    of blocks, the last admitted is paused (blocks freed) and resumed later; the tokens are those of an ample
    cache, greedy and sampled, and nothing is dropped."""
    prompts = [[5 + i, 6, 7, 8] for i in range(6)]
    budgets = [12, 3, 9, 14, 5, 10]
    for temperature in (0.0, 0.6):
        ample, engine = run_engine(model, prompts, budgets, slots=4, length=24, temperature=temperature, block=8)
        assert engine.stats.preempted == 0
        tight, engine = run_engine(model, prompts, budgets, slots=4, length=24, temperature=temperature, block=8,
                                   cache_tokens=32)
        assert engine.stats.preempted > 0 and engine.stats.in_flight_max > 1 and engine.stats.cache_tokens == 32
        assert tight == ample and sorted(tight) == list(range(6))
        assert [len(tight[i]) for i in range(6)] == budgets


def test_responses_in_flight_follow_their_lengths_not_the_budget(model):
    """A cache that holds 2 responses at full length carries 8 short ones at once."""
    prompts = [[5 + i, 6, 7] for i in range(8)]
    done, engine = run_engine(model, prompts, [4] * 8, slots=8, length=64, block=4, cache_tokens=128)
    assert engine.stats.in_flight_max == 8 and engine.stats.preempted == 0
    assert [len(done[i]) for i in range(8)] == [4] * 8


@pytest.mark.parametrize("tokens", [32, 0])  # 0: a GPU with nothing free, never the default of full slots
def test_a_cache_that_cannot_hold_one_response_is_refused(model, tokens):
    with pytest.raises(continuous.CacheTooSmall,
                       match=f"a KV cache of {tokens} tokens cannot hold one response of 40 tokens"):
        continuous.ContinuousBatcher(model, slots=4, length=40, eos=0, temperature=0.0, top_p=1.0, block=8,
                                     cache_tokens=tokens)


def test_progress_reports_the_tokens_generated_so_far_while_responses_run(model):
    engine = continuous.ContinuousBatcher(model, slots=4, length=200, eos=-1, temperature=0.0, top_p=1.0)
    reports, done = [], {}
    engine.run([[5, 6, 7]] * 6, [150] * 6, done.__setitem__, reports.append)
    assert len(reports) > 2 and reports == sorted(reports)  # reported during the run, not only when prompts end
    assert reports[-1] == sum(map(len, done.values())) == 6 * 150


def test_the_tail_counts_the_decode_steps_after_the_last_prompt_went_in(model):
    """2 slots, budgets 2, 6, 3 (first token from the prefill): prompts 0 and 1 go in; prompt 0 ends at
    step 1 and prompt 2 takes its slot; prompt 2 ends at step 3 and prompt 1 at step 5: 4 steps of tail.
    The steps attend over 4 + 4 tokens (3 of prompt, 1 new), then 4 + 5, 5 + 6, 7, 8: 43, 35 in the tail."""
    engine = continuous.ContinuousBatcher(model, slots=2, length=64, eos=-1, temperature=0.0, top_p=1.0)
    ends = []
    engine.run([[5, 6, 7], [8, 9, 10], [10, 11, 12]], [2, 6, 3], lambda index, ids: ends.append((index, len(ids))))
    assert ends == [(0, 2), (2, 3), (1, 6)]
    assert engine.stats.decode_steps == 5 and engine.stats.tail_steps == 4
    assert engine.stats.tail_seconds >= 0
    assert (engine.stats.context_tokens, engine.stats.tail_context_tokens) == (43, 35)


def test_a_shrinking_batch_decodes_at_most_a_quarter_more_slots_than_it_holds(model, monkeypatch):
    """64 responses of 1-64 tokens, all in at once: the whole run is the tail, the batch shrinking by one
    response a step. Each step runs at the smallest decode size that holds its responses, and sizes lie at
    most a quarter (and 8) apart: at 33 responses 40 slots, not 64."""
    engine = continuous.ContinuousBatcher(model, slots=64, length=80, eos=-1, temperature=0.0, top_p=1.0)
    steps = []
    step = engine._step
    monkeypatch.setattr(engine, "_step", lambda size: (steps.append((size, engine.owner.count(None))), step(size)))
    done = {}
    engine.run([[5 + i, 6, 7] for i in range(64)], list(range(1, 65)), done.__setitem__)
    assert [len(done[i]) for i in range(64)] == list(range(1, 65))
    held = [(size, engine.slots - free) for size, free in steps]
    assert (40, 33) in held and all(size - busy < max(8, busy / 4) for size, busy in held)


def test_the_decode_step_fuses_a_qwen2_layers_projections_into_views_of_one_weight(model):
    fused = continuous.ContinuousBatcher(model, slots=4, length=16, eos=-1, temperature=0.0, top_p=1.0).fused
    assert fused is not None and len(fused) == len(model.get_decoder().layers)
    attn, mlp = model.get_decoder().layers[0].self_attn, model.get_decoder().layers[0].mlp
    qkv_weight, qkv_bias, gate_up = fused[0]
    assert attn.k_proj.weight.untyped_storage().data_ptr() == qkv_weight.untyped_storage().data_ptr()
    assert torch.equal(qkv_weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    assert torch.equal(qkv_bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    assert torch.equal(gate_up, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert continuous.ContinuousBatcher(model, slots=4, length=16, eos=-1, temperature=0.0, top_p=1.0,
                                        kernels=False).fused is None  # the route before: 7 products a layer


@pytest.mark.parametrize("safe_merge", [False, True])  # True: PEFT assigns each merged weight anew (no views)
def test_an_adapter_merged_after_the_base_model_decoded_gives_a_freshly_merged_models_tokens(
        tiny_model_dir, tmp_path, safe_merge):
    """The evaluation decodes the base model's sets (which fuses its projections), then merges the adapter
    into the same model: its decode steps must see the merged weights in the fused ones."""
    from tests.test_evaluate import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    model_params = params.ModelParams(str(tiny_model_dir), "main", 1024, "")
    prompts = [[5 + i, 6, 7, 8] for i in range(6)]
    model = generation.load_model(model_params, None)
    before, _ = run_engine(model, prompts, [12] * 6, slots=4)
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=safe_merge)
    after, engine = run_engine(model, prompts, [12] * 6, slots=4)
    fresh, _ = run_engine(generation.load_model(model_params, adapter), prompts, [12] * 6, slots=4, kernels=False)
    assert engine.fused is not None and after == fresh and after != before


def run_engine(model, prompts: list[list[int]], budgets: list[int], slots: int = 16, length: int = 128,
               temperature: float = 0.0, **options) -> tuple[dict, continuous.ContinuousBatcher]:
    engine = continuous.ContinuousBatcher(model, slots=slots, length=length, eos=1, temperature=temperature,
                                          top_p=0.95, **options)
    done = {}
    with torch.inference_mode():
        engine.run(prompts, budgets, done.__setitem__)
    return done, engine


# 24 prompts in 16 slots: refills, then the batch shrinks to the 8-slot size once none waits
COMPILE_PROMPTS = [[5 + (3 * i + j) % 200 for j in range(4 + i % 7)] for i in range(24)]
COMPILE_BUDGETS = [3 + (5 * i) % 17 for i in range(24)]


def test_the_compiled_decode_step_gives_the_eager_tokens_with_two_graphs_for_every_layer_batch_cache_and_model(
        model, tiny_model_dir):
    """Two graphs: one decoder layer, which both layers run, and the step's end (norm, head, sampler), for the
    16- and 8-slot steps, for another engine's cache of other slots and length, and for another model object
    (so every worker, model and set of a run, and later runs through Inductor's on-disk cache, reuse them)."""
    eager, _ = run_engine(model, COMPILE_PROMPTS, COMPILE_BUDGETS)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled, engine = run_engine(model, COMPILE_PROMPTS, COMPILE_BUDGETS, compile=True)
    assert engine.stats.compiled
    assert engine.stats.slot_steps < engine.stats.decode_steps * 16  # it ran at 16 slots and at 8
    assert compiled == eager
    other, engine = run_engine(model, COMPILE_PROMPTS, COMPILE_BUDGETS, slots=12, length=100, compile=True)
    assert engine.stats.compiled and other == eager
    reloaded = generation.load_model(params.ModelParams(str(tiny_model_dir), "main", 1024, ""), None)
    again, engine = run_engine(reloaded, COMPILE_PROMPTS, COMPILE_BUDGETS, compile=True)
    assert engine.stats.compiled and again == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2


@pytest.mark.parametrize("kv_dtype", [None, paged_attention.EIGHT_BIT])  # eval.kv_cache: model, fp8
def test_the_compiled_decode_step_samples_the_eager_tokens(model, caplog, kv_dtype):
    eager, _ = run_engine(model, COMPILE_PROMPTS, COMPILE_BUDGETS, temperature=0.6, kv_dtype=kv_dtype)
    with caplog.at_level("INFO", logger="stages"):
        compiled, engine = run_engine(model, COMPILE_PROMPTS, COMPILE_BUDGETS, temperature=0.6, compile=True,
                                      kv_dtype=kv_dtype)
    assert engine.stats.compiled and compiled == eager
    assert "compiling the decode step" in caplog.text and "compiled the decode step in" in caplog.text


def test_a_decode_step_that_does_not_compile_is_run_eagerly_and_said(model, monkeypatch, caplog):
    def broken(function, **options):
        def call(*args, **kwargs):
            raise RuntimeError("no C compiler here\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    eager, _ = run_engine(model, COMPILE_PROMPTS[:6], COMPILE_BUDGETS[:6])
    with caplog.at_level("WARNING", logger="stages"):
        fallen_back, engine = run_engine(model, COMPILE_PROMPTS[:6], COMPILE_BUDGETS[:6], compile=True)
    assert not engine.stats.compiled and fallen_back == eager
    assert "decoding without torch.compile, which failed here (RuntimeError: no C compiler here)" in caplog.text


def test_a_decode_step_whose_graphs_cannot_be_captured_is_run_without_them_and_said(model, monkeypatch, caplog):
    eager, _ = run_engine(model, COMPILE_PROMPTS[:6], COMPILE_BUDGETS[:6])

    def capture(self):
        self._decode(self.slots)  # a warm-up step into the scratch block, as the capture runs first
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(continuous.ContinuousBatcher, "_capture", capture)
    engine = continuous.ContinuousBatcher(model, slots=16, length=128, eos=1, temperature=0.0, top_p=0.95)
    engine.use_graphs = True  # as on a GPU
    fallen_back = {}
    with caplog.at_level("WARNING", logger="stages"), torch.inference_mode():
        engine.run(COMPILE_PROMPTS[:6], COMPILE_BUDGETS[:6], fallen_back.__setitem__)
    assert not engine.use_graphs and fallen_back == eager
    assert "without CUDA graphs, whose capture failed here (RuntimeError: operation not permitted" in caplog.text


def test_a_gpu_too_full_for_one_response_is_one_line_naming_what_to_do(model, tokenizer, monkeypatch):
    monkeypatch.setattr(generation, "cache_tokens", lambda model, dtype, slots: 8)  # a GPU shared with another process
    config = eval_config(temperature=0.0, max_new_tokens=24, batch_size=4, batching="continuous")
    expected = (r"^evaluate: a KV cache of 8 tokens cannot hold one response of \d+ tokens \(the GPU memory free at "
                r"the start, less 3\.5 GiB\); free the GPU of other processes or lower eval\.max_new_tokens$")
    with pytest.raises(generation.GenerationError, match=expected):
        generation.generate(model, tokenizer, PROMPTS[:2], config, seed=0)


def test_the_cache_leaves_each_slot_room_for_its_logits_so_more_slots_get_fewer_tokens(model, monkeypatch):
    """6 GiB of the free memory left out at 512 slots (the default), as before; at 1,024 a step's logits and
    sampler take twice theirs, 8.5 GiB (an eval.batch_size above the default must not run out of memory)."""
    monkeypatch.setattr(generation, "free_memory", lambda device: 40 * 2**30)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"), config=model.config)
    per_token = continuous.kv_bytes_per_token(model.config, torch.bfloat16)
    assert generation.cache_tokens(on_gpu, torch.bfloat16, 512) == 34 * 2**30 // per_token
    assert generation.cache_tokens(on_gpu, torch.bfloat16, 1024) == int(31.5 * 2**30) // per_token
    assert generation.cache_tokens(model, torch.bfloat16, 512) is None  # on a CPU: every slot at full length


def test_an_eight_bit_cache_draws_the_same_tokens_in_any_batch_and_through_a_pause(model):
    """eval.kv_cache: fp8. Prefills attend to the keys and values as the cache holds them (rounded), as decode
    steps do: a response paused and resumed (its tokens prefilled again) draws what it would have drawn."""
    prompts = [[5 + i, 6, 7, 8] for i in range(6)]
    budgets = [12, 3, 9, 14, 5, 10]
    eight_bit = {"kv_dtype": paged_attention.EIGHT_BIT, "block": 8}
    for temperature in (0.0, 0.6):
        ample, engine = run_engine(model, prompts, budgets, slots=4, length=24, temperature=temperature, **eight_bit)
        assert engine.stats.kv_cache == "float8_e4m3fn" and engine.cache.keys[0].dtype == paged_attention.EIGHT_BIT
        assert engine.stats.preempted == 0
        tight, engine = run_engine(model, prompts, budgets, slots=4, length=24, temperature=temperature,
                                   cache_tokens=32, **eight_bit)
        assert engine.stats.preempted > 0
        wide, _ = run_engine(model, prompts, budgets, slots=16, length=24, temperature=temperature, **eight_bit)
        assert tight == ample == wide and [len(tight[i]) for i in range(6)] == budgets


@pytest.mark.parametrize("dtype", [torch.bfloat16, paged_attention.EIGHT_BIT])
def test_the_cache_allocates_the_bytes_a_token_that_its_sizing_counts(model, dtype):
    cache = continuous.BlockCache(model.config, slots=2, length=16, block=8, tokens=None, dtype=dtype,
                                  device=torch.device("cpu"))
    tensors = [*cache.keys, *cache.values, *itertools.chain(*cache.scales or ())]
    per_token = sum(t.numel() * t.element_size() for t in tensors) / (cache.blocks * cache.block)
    assert per_token == continuous.kv_bytes_per_token(model.config, dtype)


def test_an_eight_bit_cache_on_a_gpu_without_the_triton_kernel_is_one_line_naming_what_to_do(model, tokenizer,
                                                                                                monkeypatch):
    monkeypatch.setattr(continuous, "flash_decode_available", lambda device, dtype: True)  # as such a GPU
    config = eval_config(temperature=0.0, max_new_tokens=8, batch_size=4, batching="continuous", kv_cache="fp8")
    expected = (r"^evaluate: eval\.kv_cache is 'fp8', but an 8-bit KV cache needs the Triton attention kernel, which "
                r"does not run here \(the log says why\); set eval\.kv_cache: model$")
    with pytest.raises(generation.GenerationError, match=expected):
        generation.generate(model, tokenizer, PROMPTS[:2], config, seed=0)


def test_an_eight_bit_cache_asked_of_the_padded_route_is_said_to_apply_to_continuous_batching_only(
        model, tokenizer, caplog):
    config = eval_config(temperature=0.0, max_new_tokens=4, batch_size=2, batching="padded", kv_cache="fp8")
    with caplog.at_level("WARNING", logger="stages"):
        generation.generate(model, tokenizer, PROMPTS[:2], config, seed=0)
    assert "eval.kv_cache: fp8 applies to continuous batching; the padded route keeps the model's dtype" in caplog.text
