"""Batched generation for evaluation: the base model, or the base model with the LoRA merged into its
weights, answering many prompts at once. The default route is continuous batching (stages.generation.continuous);
the padded route (eval.batching: padded) runs transformers' generate on batches of prompts sorted by
length, on a GPU with a static KV cache, which makes transformers compile the forward pass.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from stages.core import params
from stages.core.cli import StageError
from stages.core.prompts import THINK_CLOSE
from stages.generation import paged_attention
from stages.generation.continuous import (
    CacheTooSmall,
    ContinuousBatcher,
    DecodeStep,
    NoEightBitKernel,
    kv_bytes_per_token,
)

log = logging.getLogger(__name__)
PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this, so compiled shapes repeat
MAX_SLOTS = 512  # the most responses a decode step carries
EIGHT_BIT_SLOTS = 1024  # with eval.kv_cache: fp8, whose cache holds twice the tokens (H100, 2,048 prompts of the
# r1-math500 spread: 29,312 useful tokens/s; bench/results/generate-2026-12-07-h100-r1math500-2048-fp8at1024-*)
ATTENTION = "sdpa_grouped"
# GPU memory left out of the paged KV cache: a prefill's activations (~2 GiB at 32k tokens) and the graphs'
# workspaces, and a share a slot for the decode step's logits and sampler (~2.5 GiB at 512 slots). At 512 slots
# 6 GiB; on an H100, 92% of what is free goes to the cache.
CACHE_HEADROOM = int(3.5 * 2**30)
SLOT_HEADROOM = 5 * 2**20


def headroom(slots: int) -> int:
    """Bytes of free GPU memory the paged KV cache leaves to the rest of a run of `slots` responses at once."""
    return CACHE_HEADROOM + slots * SLOT_HEADROOM


class GenerationError(StageError):
    """The model or adapter cannot be used for evaluation as configured."""


@dataclass(frozen=True)
class Generation:
    text: str  # the generated continuation of the prompt, up to (without) the end-of-sequence token
    n_tokens: int  # generated tokens, end-of-sequence included when it came
    hit_max_tokens: bool  # stopped by max_new_tokens instead of ending by itself
    reasoning_tokens: int  # generated tokens before the last `</think>`; without one, all but end-of-sequence
    answer_tokens: int  # generated tokens after the last `</think>`, end-of-sequence excluded (0 without one)


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for grouped-query attention with a padding mask, without copying K/V per query head.

    transformers' SDPA path repeats K and V for every query head whenever a mask is given (always, in
    batched generation), so each decode step copies the whole KV cache several times (6x for the
    R1-Distill-1.5B's 12 query / 2 KV heads). Folding each group's query heads into the query length
    instead gives SDPA the same arithmetic on the cache as it is.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(attention_mask, DecodeStep):  # continuous batching: key/value are the slot cache
        return attention_mask.attend(query, key, value, scaling), None
    batch, q_heads, q_length, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    if attention_mask is None or groups == 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    folded = query.reshape(batch, kv_heads, groups * q_length, head_dim)  # heads are ordered kv-major
    mask = attention_mask[:, :, -q_length:, : key.shape[2]]
    mask = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], 1, groups * q_length, -1)
    output = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(batch, q_heads, q_length, head_dim).transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make ATTENTION loadable by name (attn_implementation=...), with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, grouped_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION


def load_model(model_params: params.ModelParams, adapter: Path | None):
    """The model to generate with: bf16 on CUDA (fp32 on CPU), the adapter merged in when given."""
    from transformers import AutoModelForCausalLM

    from stages.core.base_model import local_model_dir

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        local_model_dir(model_params), dtype=torch.bfloat16 if cuda else torch.float32,
        use_safetensors=True, trust_remote_code=False, device_map={"": 0} if cuda else None,
        attn_implementation=register_attention())
    # Generation needs no gradients, and PEFT turns them off as it merges: torch.compile guards on each
    # parameter's requires_grad, so with it off from the start the decode step compiled for the base model
    # serves the merged one too.
    model.requires_grad_(False)
    if adapter is not None:
        model = merge_adapter(model, adapter)
    return model.eval()


def merge_adapter(model, adapter: Path):
    """The model (from load_model) with the LoRA adapter merged into its weights, in place: the same object
    comes back, so the decode step torch.compile compiled for it is reused, not compiled again. Merged, the
    adapter costs nothing per token."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def check_context(model, longest_prompt: int, max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest_prompt + max_new_tokens > limit:
        raise GenerationError(f"eval.max_new_tokens={max_new_tokens} plus the longest prompt ({longest_prompt} "
                              f"tokens) exceeds the model's context of {limit} tokens; lower eval.max_new_tokens")


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def think_token_counts(tokenizer, ids: list[int], text: str) -> tuple[int, int]:
    """(reasoning, answer) token counts of generated ids (end-of-sequence cut off) that decode to `text`:
    the ids before and after the `</think>` at which grading splits the text (its last), or (all, 0)
    without one. Counted on the ids, never by re-encoding text, so they add up to at most len(ids)."""
    at = text.rfind(THINK_CLOSE)
    if at < 0:
        return len(ids), 0
    end = at + len(THINK_CLOSE)
    close = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)  # one added token in R1's tokenizer
    start = next((i for i in range(len(ids) - len(close), -1, -1) if ids[i:i + len(close)] == close), None)
    if start is not None and _decode(tokenizer, ids[start + len(close):]) == text[end:]:
        return start, len(ids) - start - len(close)
    # `</think>` spelled by other tokens (possible where it is no single token): the longest prefix of ids
    # that decodes within the reasoning, and the longest suffix after the tag; a token across either
    # edge counts in neither. Decoded length grows with the prefix, so a bisection finds both.
    def decoded_length(k: int) -> int:
        return len(_decode(tokenizer, ids[:k]))

    prefixes = range(len(ids) + 1)
    reasoning = bisect.bisect_right(prefixes, at, key=decoded_length) - 1
    answer_from = bisect.bisect_left(prefixes, end, key=decoded_length)
    return reasoning, len(ids) - answer_from


def _bucket(length: int) -> int:
    return -(-length // PROMPT_BUCKET) * PROMPT_BUCKET


def batch_size(config: params.EvalParams, model, longest_prompt: int, paged: bool = False) -> int:
    """eval.batch_size, or for 'auto' on a GPU: with a paged cache (continuous batching), 512 (beyond that a
    step no longer gets cheaper per token; the cache's blocks bound the responses in flight), 1,024 with an
    8-bit cache (as many tokens in half the bytes: more responses in flight per step read); else the most
    sequences whose KV cache at full length fits in 60% of free GPU memory, at most 512. 16 on CPU."""
    if config.batch_size != "auto":
        return config.batch_size if torch.cuda.is_available() else min(config.batch_size, 16)
    if not torch.cuda.is_available():
        return 16
    if paged:
        return EIGHT_BIT_SLOTS if config.kv_cache == "fp8" else MAX_SLOTS
    free = free_memory(torch.device("cuda"))
    sequence_bytes = kv_bytes_per_token(model.config, model.dtype) * (_bucket(longest_prompt) + config.max_new_tokens)
    return max(8, min(MAX_SLOTS, int(0.6 * free // sequence_bytes) // 8 * 8))


def free_memory(device: torch.device) -> int:
    """Bytes this process can allocate on the GPU: what the device has free, and what PyTorch's allocator
    holds cached from tensors freed before (an earlier model's cache, a test's tensors)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def cache_tokens(model, dtype: torch.dtype, slots: int) -> int | None:
    """The tokens of the paged KV cache in `dtype` for `slots` responses at once: on a GPU, all free memory but
    headroom(slots) (the decode step's logits and sampler, a prefill's activations, the graphs); None on CPU
    (every slot at full length)."""
    if model.device.type != "cuda":
        return None
    return max(0, free_memory(model.device) - headroom(slots)) // kv_bytes_per_token(model.config, dtype)


def kv_dtype(config: params.EvalParams, model) -> torch.dtype:
    """The continuous route's KV cache dtype: eval.kv_cache 'model' (the model's own) or 'fp8'."""
    return paged_attention.EIGHT_BIT if config.kv_cache == "fp8" else model.dtype


def to_generation(tokenizer, new_tokens: list[int], eos: int) -> Generation:
    """The record of one response from its generated ids (anything after end-of-sequence ignored)."""
    ended = eos in new_tokens
    cut = new_tokens.index(eos) if ended else len(new_tokens)
    text = _decode(tokenizer, new_tokens[:cut])
    reasoning, answer = think_token_counts(tokenizer, new_tokens[:cut], text)
    return Generation(text=text, n_tokens=cut + 1 if ended else cut, hit_max_tokens=not ended,
                      reasoning_tokens=reasoning, answer_tokens=answer)


@dataclass(frozen=True)
class Request:
    """What a generation route answers: prompts as token ids, admitted in `order` (longest first), each with
    its sampling key (continuous batching draws a response's random numbers from it; the padded route
    samples by the seed), `slots` sequences at a time."""
    encoded: list[list[int]]
    order: list[int]
    config: params.EvalParams
    slots: int
    eos: int
    pad: int
    keys: list[int]
    end_at: list[int] | None = None  # benchmarks: each response's forced end (random weights never end)
    # benchmarks: the route before paging and the Triton kernels (each slot reserves the full length;
    # FlashAttention where it runs, top-p by sorting)
    reserved: bool = False
    # benchmarks: called with the tokens generated so far and the engine's counts (continuous.Stats) as the
    # continuous route runs (a raise stops it)
    on_tokens: Callable[[int, object], None] | None = None


def sampling_keys(prompts: list[str], seed: int) -> list[int]:
    """Each prompt's sampling key for continuous batching, from the seed, the prompt's text and how many
    times the same text came before it in the list (the samples of one problem draw apart). Keys of the
    whole list, before it is split over workers, so the split does not change them."""
    seen: dict[str, int] = {}
    keys = []
    for prompt in prompts:
        sample = seen[prompt] = seen.get(prompt, -1) + 1
        digest = hashlib.blake2b(f"{seed}\0{sample}\0{prompt}".encode(), digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little") >> 1)  # 63 bits: a non-negative int64
    return keys


def generate(model, tokenizer, prompts: list[str], config: params.EvalParams, seed: int, desc: str = "generate",
             end_at: list[int] | None = None, stats: dict | None = None, keys: list[int] | None = None,
             on_generation: Callable[[int, Generation], None] | None = None,
             reserved: bool = False, on_tokens: Callable[[int, object], None] | None = None) -> list[Generation]:
    """Generate one response per prompt. end_at (benchmarks): force each response's end-of-sequence as
    its token number end_at[i], since random weights never end by themselves. stats, when given, receives
    how the route used its decode slots. keys: the prompts' sampling keys (default: sampling_keys with the
    seed); continuous batching keys each response's random numbers by them, the padded route by the seed.
    on_generation(i, generation) as each response ends (the padded route: as each batch ends). reserved
    (benchmarks): continuous batching with each slot's cache at full length, as before paging. on_tokens
    (benchmarks; continuous route): on_tokens(tokens generated so far, the engine's counts) every few decode
    steps; what it raises stops the generation."""
    if not prompts:
        return []
    keys = sampling_keys(prompts, seed) if keys is None else keys
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    longest = max(map(len, encoded), default=0)
    check_context(model, longest, config.max_new_tokens)
    route = generate_padded if config.batching == "padded" else generate_continuous
    if route is generate_padded and config.kv_cache != "model":
        log.warning("eval.kv_cache: %s applies to continuous batching; the padded route keeps the model's dtype",
                    config.kv_cache)
    size = batch_size(config, model, longest, paged=route is generate_continuous and not reserved)
    eos = tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    longest_first = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    request = Request(encoded, longest_first, config, size, eos, pad, keys, end_at, reserved, on_tokens)
    log.info("%s: %d prompts, %s batching of %d, up to %d new tokens each", desc, len(prompts), config.batching,
             size, config.max_new_tokens)
    torch.manual_seed(seed)
    generations: list[Generation] = [None] * len(prompts)  # type: ignore[list-item]  (each set once it ends)

    def finished(i: int, new_tokens: list[int]) -> None:
        generations[i] = to_generation(tokenizer, new_tokens, eos)
        if on_generation:
            on_generation(i, generations[i])

    with tqdm(total=len(prompts), desc=desc, unit="prompt") as progress:
        paid_slots, details = route(model, request, progress, finished)
    # Each response's first token comes from its prompt's forward pass; the rest each took a decode slot.
    share = sum(max(g.n_tokens - 1, 0) for g in generations) / paid_slots if paid_slots else 0.0
    log.info("%s: %.0f%% of the decode slots paid for kept a token", desc, 100 * share)
    if stats is not None:
        stats.update(details, batch_size=size, decode_slot_share=share)
    return generations


def generate_continuous(model, request: Request, progress,
                        finished: Callable[[int, list[int]], None]) -> tuple[int, dict]:
    """Continuous batching (stages.generation.continuous), prompts admitted in `order`: finished(i, new ids) as each
    response ends; returns the decode slots paid for and the engine's counts."""
    encoded, order, config, end_at, eos = request.encoded, request.order, request.config, request.end_at, request.eos
    budgets = [min(config.max_new_tokens, end_at[i]) if end_at else config.max_new_tokens for i in order]
    length = max(map(len, encoded), default=0) + config.max_new_tokens
    if request.reserved:
        paging = {"block": length, "kernels": False}
    else:
        dtype = kv_dtype(config, model)
        paging = {"cache_tokens": cache_tokens(model, dtype, request.slots), "kv_dtype": dtype}
    try:
        engine = ContinuousBatcher(model, request.slots, length, eos, config.temperature, config.top_p,
                                   graphs=config.static_cache,
                                   compile=config.static_cache and model.device.type == "cuda", **paging)
    except CacheTooSmall as e:
        raise GenerationError(f"evaluate: {e} (the GPU memory free at the start, less "
                              f"{round(headroom(request.slots) / 2**30, 1):g} GiB); free the GPU of other "
                              "processes or lower eval.max_new_tokens") from e
    except NoEightBitKernel as e:
        raise GenerationError(f"evaluate: eval.kv_cache is 'fp8', but {e}; set eval.kv_cache: model") from e
    except ValueError as e:
        raise GenerationError(f"evaluate: eval.batching is 'continuous', but {e}; set eval.batching: padded") from e

    def done(k: int, new_tokens: list[int]) -> None:
        i = order[k]
        if end_at and len(new_tokens) == end_at[i]:
            new_tokens[-1] = eos
        finished(i, new_tokens)
        progress.update(1)

    def tokens_so_far(count: int) -> None:
        progress.set_postfix(tokens=count, refresh=False)
        if request.on_tokens:
            request.on_tokens(count, engine.stats)

    with torch.inference_mode():
        engine.run([encoded[i] for i in order], budgets, done, tokens_so_far, [request.keys[i] for i in order])
    stats = engine.stats
    log.info("decoded in %d steps (graphs of %s slots); the last %d, %.0f s, after the last prompt went in",
             stats.decode_steps, stats.graph_sizes or "no", stats.tail_steps, stats.tail_seconds)
    return stats.slot_steps, dataclasses.asdict(stats)


class EndAt:
    """A transformers logits processor that forces end-of-sequence as each row's token number end_at[row]."""

    def __init__(self, end_at: list[int], prompt_width: int, eos: int, device):
        self.end_at, self.prompt_width, self.eos = torch.tensor(end_at, device=device), prompt_width, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ending = self.end_at == input_ids.shape[1] - self.prompt_width + 1
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.eos] = 0
        return torch.where(ending[:, None], forced, scores)


def generate_padded(model, request: Request, progress, finished: Callable[[int, list[int]], None]) -> tuple[int, dict]:
    """transformers' generate on batches of consecutive prompts of `order` (sorted by length, so a batch's
    prompts are alike; each batch runs until its longest response ends): finished(i, new ids) as each batch
    ends; returns the decode slots paid for and the batches run. Samples by the seed, not by keys."""
    encoded, order, config, end_at, eos, pad = (request.encoded, request.order, request.config, request.end_at,
                                                request.eos, request.pad)
    size, static = request.slots, torch.cuda.is_available() and request.config.static_cache
    paid_slots = batches = 0
    for start in range(0, len(order), size):
        indices = order[start:start + size]
        rows = [encoded[i] for i in indices]
        ends = [end_at[i] for i in indices] if end_at else None
        if static:  # full batches and bucketed lengths: the compiled graphs are reused
            rows += [rows[0]] * (size - len(rows))
            ends = ends and ends + [ends[0]] * (size - len(ends))
        width = _bucket(max(map(len, rows))) if static else max(map(len, rows))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
        sample = config.temperature > 0
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=config.max_new_tokens,
                do_sample=sample, temperature=config.temperature if sample else None,
                top_p=config.top_p if sample else None, top_k=None, pad_token_id=pad, eos_token_id=eos,
                cache_implementation="static" if static else None,
                logits_processor=[EndAt(ends, width, eos, model.device)] if ends else None)
        for i, new_tokens in zip(indices, output[:, width:].tolist(), strict=False):
            finished(i, new_tokens)
        paid_slots += len(rows) * max(output.shape[1] - width - 1, 0)
        batches += 1
        progress.update(len(indices))
    return paid_slots, {"batches": batches}
