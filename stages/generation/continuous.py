"""Continuous batching for evaluation: a fixed number of slots, each holding one response's KV cache at
its own length; a slot whose response ended takes the next waiting prompt, so no step decodes padding.

On a GPU each decode step is one CUDA graph replay, and attention reads each slot's cache only up to
that slot's own length (a Triton kernel: stages.generation.paged_attention); on a CPU the same steps
run eagerly with a masked SDPA. Prompts are prefilled eagerly, a group at a time, into free slots.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from stages.core.cli import cause, usable_cpus
from stages.generation import paged_attention
from stages.generation import top_p as top_p_kernels

log = logging.getLogger(__name__)
PREFILL_TOKENS = 32_768  # prompt tokens per prefill forward: bounds its activation memory
PROGRESS_STEPS = 64  # decode steps between progress reports
BLOCK_TOKENS = 512  # tokens of a KV-cache block: a response wastes half of one on average (H100: 512 steps
# fastest of 256-2048 at 8 slots x 8k tokens, within 3% of 1024-2048 at 256-512 slots)
# Threads compiling the attention kernel's variants (a partition size per graph size: 13 at 1,024 slots, ~0.5-1 s
# each) before the first step; 0: each compiled at its first launch, one after another
COMPILE_THREADS = min(16, usable_cpus())
SMALLEST_GRAPH = 8  # slots of the smallest decode graph; once no prompt waits, the batch shrinks to fit


Attention = Literal["triton", "flash", "sdpa"]  # a decode step's attention kernels, fastest first


class DecodeStep:
    """What attention needs in a decode step over the block cache; passed to the model in place of a mask,
    so transformers hands it, untouched, to the attention function (stages.generation.batched)."""

    def __init__(self, positions: torch.Tensor, table: torch.Tensor, kernel: Attention,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None, order: torch.Tensor | None = None):
        self.positions = positions  # per slot: where this step's token is written (= tokens before it)
        self.table = table  # per slot: the cache blocks holding its tokens, in order [slots, blocks a slot may hold]
        self.kernel = kernel
        self.scales = scales  # an 8-bit cache's key and value scales [blocks, block, kv_heads]; None: not 8-bit
        self.order = order  # the Triton kernel's: the slots longest first (paged_attention.longest_first), or None

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None):
        """query [slots, heads, 1, head_dim] against the block cache [blocks, block, kv_heads, head_dim] ->
        [slots, 1, heads, head_dim], each slot's query seeing its tokens up to and including its position."""
        slots, heads, _, head_dim = query.shape
        _, block, kv_heads, _ = keys.shape
        scaling = head_dim ** -0.5 if scaling is None else scaling
        if self.kernel == "triton":  # reads only the blocks each slot holds, once for all the heads of a group
            return paged_attention.paged_decode(query[:, :, 0], keys, values, self.table, self.positions,
                                                scaling, *(self.scales or (None, None)), self.order)[:, None]
        per_slot = self.table.shape[1]
        if self.kernel == "flash":  # (not for an 8-bit cache: ContinuousBatcher refuses the pair)
            # (The route before the Triton kernel, kept where Triton does not run: it computes a query tile of
            # 128 rows for each sequence's 6, so on an H100 it is half bound by arithmetic.)
            # how many of each of the slot's blocks' tokens it has written (0 for the blocks it does not hold)
            starts = torch.arange(per_slot, device=query.device) * block
            used = (self.positions[:, None] + 1 - starts).clamp(0, block)
            # Every (slot, block) is a sequence of FlashAttention's variable-length kernel that reads its keys
            # where the block lies in the cache (offset = block number x block size): the kernel reads only
            # the blocks a slot holds. Its query rows are the slot's query heads of one KV head (a group), so
            # each block is read once for all of them. The blocks' partial results, weighted by their log-sum-
            # exps, add up to the attention over all of the slot's tokens.
            groups = heads // kv_heads
            rows = query.reshape(slots, kv_heads, groups, head_dim).transpose(1, 2)  # [slots, groups, kv, dim]
            rows = rows[:, None].expand(slots, per_slot, groups, kv_heads, head_dim).reshape(-1, kv_heads, head_dim)
            entries = slots * per_slot
            query_starts = torch.arange(entries + 1, device=query.device, dtype=torch.int32) * groups
            key_starts = torch.cat([self.table.reshape(-1) * block, self.table.new_zeros(1)]).to(torch.int32)
            output, lse = torch.ops.aten._flash_attention_forward(
                rows, keys.view(-1, kv_heads, head_dim), values.view(-1, kv_heads, head_dim), query_starts,
                key_starts, groups, block, 0.0, False, False, scale=scaling,
                seqused_k=used.reshape(-1).to(torch.int32))[:2]
            output = output.view(slots, per_slot, groups, kv_heads, head_dim)
            if lse.dim() == 2:  # [kv_heads, query rows]
                lse = lse.view(kv_heads, slots, per_slot, groups).permute(1, 2, 3, 0)  # [slots, blocks, groups, kv]
            else:  # [sequences, kv_heads, rows of a sequence]
                lse = lse.view(slots, per_slot, kv_heads, groups).transpose(2, 3)
            lse = torch.where((used > 0)[:, :, None, None], lse, float("-inf"))
            weights = (lse - lse.amax(1, keepdim=True)).exp()
            weights = (weights / weights.sum(1, keepdim=True))[..., None]
            merged = (output.float() * weights).sum(1).to(query.dtype)  # [slots, groups, kv, dim]
            return merged.transpose(1, 2).reshape(slots, 1, heads, head_dim)
        # Masked SDPA over each slot's blocks gathered in order, each group of query heads folded into the
        # query length (no K/V copies per head).
        length = per_slot * block
        key_scales, value_scales = self.scales or (None, None)
        values = values if self.scales is None else paged_attention.value_layout(values, back=True)
        gathered_keys, gathered_values = (
            paged_attention.dequantize(cache[self.table], None if scales is None else scales[self.table],
                                       query.dtype).reshape(slots, length, kv_heads, head_dim)
            for cache, scales in ((keys, key_scales), (values, value_scales)))
        mask = (torch.arange(length, device=query.device) <= self.positions[:, None])[:, None, None, :]
        folded = query.reshape(slots, kv_heads, heads // kv_heads, head_dim)
        output = torch.nn.functional.scaled_dot_product_attention(
            folded, gathered_keys.transpose(1, 2), gathered_values.transpose(1, 2), attn_mask=mask, scale=scaling)
        return output.reshape(slots, 1, heads, head_dim)


def token_kv_shape(config) -> tuple[int, int]:
    """(KV heads, head dim): one layer's keys (or values) of one token."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """The keys and values of one token in every layer, in a cache of `dtype` (8-bit: with their scales)."""
    kv_heads, head_dim = token_kv_shape(config)
    scale = 4 if dtype == paged_attention.EIGHT_BIT else 0  # a float32 per token and KV head
    return 2 * config.num_hidden_layers * kv_heads * (head_dim * dtype.itemsize + scale)


class CacheTooSmall(ValueError):
    """The GPU memory left for the KV cache cannot hold one response at full length."""


class NoEightBitKernel(ValueError):
    """An 8-bit KV cache on a GPU where the Triton attention kernel does not run."""


class BlockCache:
    """The KV cache in blocks of `block` tokens, per layer [blocks, block, kv_heads, head_dim], handed to
    responses a block at a time as they grow, so the responses in flight follow their actual lengths, not the
    budget. Block 0 is scratch: every slot's table points there until it holds blocks, so writes of empty
    slots land nowhere that matters. A prefill passes it to the model as past_key_values: transformers'
    attention layers call update(). In 8-bit (dtype paged_attention.EIGHT_BIT) each token's key and value of
    each KV head is kept with a float32 scale (paged_attention.quantize), in `scales`, and the values are
    stored [blocks, kv_heads, head_dim, block] (paged_attention.value_layout)."""

    def __init__(self, config, slots: int, length: int, block: int, tokens: int | None, dtype: torch.dtype,
                 device: torch.device):
        """tokens: the cache's size; None: every slot at full length."""
        self.block = block
        self.per_slot = self.blocks_for(length)  # blocks a slot may hold
        tokens = slots * self.per_slot * block if tokens is None else tokens
        self.blocks = tokens // block + 1
        if self.blocks - 1 < self.per_slot:
            raise CacheTooSmall(f"a KV cache of {tokens} tokens cannot hold one response of {length} tokens")
        kv_heads, head_dim = token_kv_shape(config)
        eight_bit = dtype == paged_attention.EIGHT_BIT
        layers = range(config.num_hidden_layers)
        self.keys = [torch.zeros(self.blocks, block, kv_heads, head_dim, dtype=dtype, device=device) for _ in layers]
        values = (self.blocks, kv_heads, head_dim, block) if eight_bit else (self.blocks, block, kv_heads, head_dim)
        self.values = [torch.zeros(values, dtype=dtype, device=device) for _ in layers]
        # per layer, 8-bit: its keys' and values' scales
        self.scales: list[tuple[torch.Tensor, torch.Tensor]] | None = [
            (torch.zeros(self.blocks, block, kv_heads, device=device),
             torch.zeros(self.blocks, block, kv_heads, device=device)) for _ in layers] if eight_bit else None
        self.table = torch.zeros(slots, self.per_slot, dtype=torch.long, device=device)
        self.held: list[list[int]] = [[] for _ in range(slots)]  # the blocks of each slot, in order
        self.free = list(range(self.blocks - 1, 0, -1))  # popped from the end: low blocks first
        self.rows: torch.Tensor | None = None  # the slots the prompts being prefilled go to

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block)

    def grow(self, slot: int, tokens: int) -> bool:
        """Give the slot the blocks that hold `tokens`; False (and nothing given) when too few are free."""
        needed = self.blocks_for(tokens) - len(self.held[slot])
        if needed > len(self.free):
            return False
        if needed > 0:
            new = [self.free.pop() for _ in range(needed)]
            self.table[slot, len(self.held[slot]):len(self.held[slot]) + needed] = torch.tensor(new)
            self.held[slot] += new
        return True

    def release(self, slot: int) -> None:
        self.free += self.held[slot][::-1]
        self.held[slot] = []
        self.table[slot] = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Prompts are written from position 0; they attend to themselves only, as the cache holds them (in
        8-bit: their keys and values rounded, as later tokens see them)."""
        length = key_states.shape[2]
        positions = torch.arange(length, device=key_states.device)
        blocks = self.table[self.rows][:, positions // self.block]  # [rows, length]; beyond a slot's: scratch
        keys, values = write(self.keys[layer_idx], self.values[layer_idx], self.scales and self.scales[layer_idx],
                             (blocks, positions % self.block), key_states.transpose(1, 2), value_states.transpose(1, 2))
        return keys.transpose(1, 2), values.transpose(1, 2)

    def compact(self, keep: list[int]) -> None:
        """Move the slots in `keep` to the front, in that order (their tables: no keys or values move)."""
        index = torch.tensor(keep, device=self.table.device)
        self.table[:len(keep)] = self.table[index].clone()
        self.table[len(keep):] = 0
        self.held = [self.held[slot] for slot in keep] + [[] for _ in range(len(self.held) - len(keep))]


def write(keys: torch.Tensor, values: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None, where,
          key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store keys and values [..., kv_heads, head_dim] at `where` (blocks, offsets in them), in 8-bit with
    their scales when `scales` is given (the values transposed: BlockCache); returns them as stored, in their
    dtype (8-bit: rounded). A decode step drops what it returns: the compiled step never computes it."""
    if scales is None:
        keys[where], values[where] = key_states, value_states
        return key_states, value_states
    blocks, offsets = where
    stored = []
    for cache, scale, states, at in ((keys, scales[0], key_states, where),
                                     (values, scales[1], value_states, (blocks, slice(None), slice(None), offsets))):
        cache[at], scale[where] = eight_bit = paged_attention.quantize(states)
        stored.append(paged_attention.dequantize(*eight_bit, states.dtype))
    return stored[0], stored[1]


class LayerBlocks:
    """One layer's block cache as a decode step's attention sees it (its past_key_values): update() writes
    each slot's new key and value at the slot's position, in the block its table gives, and returns the
    layer's cache. It ignores the layer index, so one compiled layer step serves every layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.keys, self.values, self.positions, self.table, self.scales = keys, values, positions, table, scales

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        block = self.keys.shape[1]
        slots = key_states.shape[0]
        blocks = self.table[torch.arange(slots, device=key_states.device), self.positions // block]
        write(self.keys, self.values, self.scales, (blocks, self.positions % block), key_states[:, :, 0],
              value_states[:, :, 0])
        return self.keys, self.values


DECODER_PARTS = ("embed_tokens", "rotary_emb", "layers", "norm")  # what a decode step runs, in this order


def layer_step(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               table: torch.Tensor, order: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
               scales: tuple[torch.Tensor, torch.Tensor] | None, kernel: Attention) -> torch.Tensor:
    """One decoder layer of a decode step: hidden [slots, 1, hidden] of the slots' last tokens, written to
    and attending over the layer's block cache (keys, values; an 8-bit cache's scales) up to each slot's
    position (order: DecodeStep's)."""
    return layer(hidden, attention_mask=DecodeStep(positions, table, kernel, scales, order),
                 position_ids=positions[:, None],
                 past_key_values=LayerBlocks(keys, values, positions, table, scales), use_cache=True,
                 position_embeddings=(cos, sin))


Fused = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a layer's q/k/v weight, q/k/v bias, gate/up weight


def fuse_projections(layer) -> Fused | None:
    """A Qwen2 decoder layer's q/k/v projections as one weight and bias and its gate/up projections as one
    weight, so a decode step runs 4 matrix products a layer instead of 7 (its prototype on an H100: a step
    12% faster at 8 slots, 8% at 64, the same at 512). The layer's own weights become views of them: no
    second copy, and an adapter merged in place later writes through. Fused anew for every engine, from the
    weights as they are then. None for a layer of another kind, or whose projections are not plain Linear
    layers (an unmerged adapter, a quantized model): its own forward runs."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    if not isinstance(layer, Qwen2DecoderLayer):
        return None
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
    if any(type(p) is not torch.nn.Linear for p in (*qkv, *gate_up)) or any(p.bias is None for p in qkv) \
            or any(p.bias is not None for p in gate_up):
        return None
    sizes = [p.out_features for p in qkv]
    qkv_weight, qkv_bias = torch.cat([p.weight for p in qkv]), torch.cat([p.bias for p in qkv])
    gate_up_weight = torch.cat([p.weight for p in gate_up])
    for p, weight, bias in zip(qkv, qkv_weight.split(sizes), qkv_bias.split(sizes), strict=True):
        p.weight.data, p.bias.data = weight, bias
    for p, weight in zip(gate_up, gate_up_weight.chunk(2), strict=True):
        p.weight.data = weight
    return qkv_weight, qkv_bias, gate_up_weight


def fused_layer_step(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                     table: torch.Tensor, order: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                     scales: tuple[torch.Tensor, torch.Tensor] | None, kernel: Attention,
                     qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """layer_step for a layer fuse_projections fused: Qwen2DecoderLayer's forward, with q/k/v and gate/up
    each one matrix product."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    attn, mlp = layer.self_attn, layer.mlp
    normed = layer.input_layernorm(hidden)
    shape = (*normed.shape[:-1], -1, attn.head_dim)
    sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    query, key, value = (t.view(shape).transpose(1, 2) for t in
                         torch.nn.functional.linear(normed, qkv_weight, qkv_bias).split(sizes, dim=-1))
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    keys, values = LayerBlocks(keys, values, positions, table, scales).update(key, value, 0)  # any layer: one graph
    attended = DecodeStep(positions, table, kernel, scales, order).attend(query, keys, values, attn.scaling)
    hidden = hidden + attn.o_proj(attended.reshape(*normed.shape[:-1], -1))
    gate, up = torch.nn.functional.linear(layer.post_attention_layernorm(hidden), gate_up).chunk(2, dim=-1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)


def last_step(norm, head, sample, hidden: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A decode step's end: the final norm, the output head and the sampler: each slot's next token."""
    return sample(head(norm(hidden[:, -1])), sampling_hashes(keys, positions))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 values in [0, 2^32), as tensor operations (graph
    safe, the same on CPU and GPU). Products stay below 2^63: each multiplier goes in as two 16-bit halves."""
    def times(x: torch.Tensor, multiplier: int) -> torch.Tensor:
        high, low = multiplier >> 16, multiplier & 0xFFFF
        return ((((x * high) & 0xFFFF) << 16) + x * low) & 0xFFFFFFFF

    x = x ^ (x >> 16)
    x = times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = times(x, 0x846CA68B)
    return x ^ (x >> 16)


def sampling_hashes(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One 32-bit number per row (int64 in [0, 2^32)), a hash of the row's 63-bit key (seed, prompt, sample
    number) and its counter (the position of the token whose logits are sampled): a response draws the same
    numbers whatever batch, slot or GPU it runs in."""
    mixed = _mix32(_mix32((keys >> 32) & 0xFFFFFFFF) ^ (keys & 0xFFFFFFFF))
    return _mix32(mixed ^ (counters & 0xFFFFFFFF))


def uniforms(hashes: torch.Tensor) -> torch.Tensor:
    """sampling_hashes -> numbers in (0, 1): 24 bits, exact in float32, never 0 or 1."""
    return ((hashes >> 8).float() + 0.5) / 2**24


@torch.library.custom_op("r1_math_lora::cumsum", mutates_args=(), schema="(Tensor x) -> Tensor")
def cumsum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sums over the last dimension, opaque to torch.compile: Inductor's own scan, split over a
    dynamic number of rows (a graph compiled at few slots), fails to generate its code (torch 2.11, an H100)."""
    return x.cumsum(-1)


@cumsum.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


Sample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, sampling hashes) -> tokens


def sampler(temperature: float, top_p: float, kernel: bool = False) -> Sample:
    """Next tokens from logits [rows, vocab] and one sampling hash per row: argmax for temperature 0, else the
    model card's sampling (temperature, then top-p as transformers' TopPLogitsWarper cuts it). kernel: bf16
    logits on a GPU, by Triton kernels that do not sort the vocabulary (stages.generation.top_p). Else the
    logits are sorted as they come, and the draw inverts the kept tokens' cumulative distribution at the row's
    number (uniforms): one number a row instead of noise over the whole vocabulary, and no random state
    (graph safe)."""
    def sample(logits: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        if kernel:
            return top_p_kernels.top_p_sample(logits, hashes, temperature, top_p)
        ascending, order = logits.sort(dim=-1)
        cumulative = cumsum((ascending.float() / temperature).softmax(-1))
        # the tokens cut (the least likely, a prefix of the ascending order) end at `floor`; 0 when none are
        floor = torch.zeros_like(cumulative[:, :1])
        if top_p < 1:
            cut = cumulative <= 1 - top_p
            cut[:, -1] = False  # the most likely token always stays
            floor = torch.where(cut, cumulative, 0).amax(-1, keepdim=True)
        target = floor + uniforms(hashes)[:, None] * (cumulative[:, -1:] - floor)  # inside the kept tokens' mass
        pick = torch.searchsorted(cumulative, target).clamp_(max=cumulative.shape[-1] - 1)
        return order.gather(-1, pick).squeeze(-1)
    return sample


def flash_decode_available(device: torch.device, dtype: torch.dtype) -> bool:
    """PyTorch's FlashAttention kernel with per-sequence key lengths (seqused_k) works here."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        keys = torch.zeros(2 * 64, 1, 64, device=device, dtype=dtype)
        cumulative = torch.arange(3, device=device, dtype=torch.int32)
        torch.ops.aten._flash_attention_forward(
            torch.zeros(2, 2, 64, device=device, dtype=dtype), keys, keys, cumulative, cumulative * 64, 1, 64, 0.0,
            False, False, seqused_k=torch.tensor([3, 5], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, TypeError) as e:
        log.info("FlashAttention with per-slot lengths is not available here (%s); decoding with masked SDPA",
                 str(e).splitlines()[0])
        return False


def decode_attention(device: torch.device, dtype: torch.dtype, head_dim: int, kernels: bool = True,
                     eight_bit: bool = False) -> Attention:
    """The fastest attention kernel that runs here (kernels=False: not the Triton kernel) for a model of
    `dtype`; with 8-bit keys and values (eight_bit), which FlashAttention cannot read, the Triton kernel or
    masked SDPA."""
    if kernels and paged_attention.available(device, dtype, head_dim, eight_bit):
        return "triton"
    if not flash_decode_available(device, dtype):
        return "sdpa"
    if eight_bit:
        raise NoEightBitKernel("an 8-bit KV cache needs the Triton attention kernel, which does not run here (the log "
                               "says why)")
    return "flash"


def graph_sizes(slots: int) -> list[int]:
    """The decode sizes, largest first: the slots, and below them four sizes an octave (multiples of 8 at
    least), so a shrinking batch pays for at most ~25% more slots than it uses, not up to 100% as with halving
    (on an H100 a 512-slot step costs ~3x a 64-slot one, and the tail's last thousands of steps carry the
    budget-length responses alone). One graph per size; they share one memory pool."""
    sizes = {slots}
    for size in range(SMALLEST_GRAPH, slots, SMALLEST_GRAPH):
        octave = 1 << (size.bit_length() - 1)  # the power of two at or below the size
        if size % max(SMALLEST_GRAPH, octave // 4) == 0:
            sizes.add(size)
    return sorted(sizes, reverse=True)


@dataclass
class Stats:
    decode_steps: int = 0
    slot_steps: int = 0  # decode steps x slots of the graph that ran them: the decode work paid for
    prefill_calls: int = 0
    graph_sizes: list[int] = field(default_factory=list)
    # The tail: decode steps (and wall seconds) after the last prompt went in, while the batch runs down to
    # its last, longest responses. Every GPU of a multi-GPU run pays its own.
    tail_steps: int = 0
    tail_seconds: float = 0.0
    # Tokens of context the decode steps attended over (each response's, every step, summed), in all and in the
    # tail: with the steps, what they read (each step the weights, and these tokens' keys and values).
    context_tokens: int = 0
    tail_context_tokens: int = 0
    # Wall seconds from each decode step's launch to its tokens read back, and of the prefills: the rest of a
    # run's time is the engine's bookkeeping between steps, when the GPU waits.
    decode_seconds: float = 0.0
    prefill_seconds: float = 0.0
    compiled: bool = False  # the decode step ran torch.compile's code
    compile_seconds: float = 0.0
    # Wall seconds compiling the attention kernel's variants (COMPILE_THREADS at a time), and capturing the
    # graphs (a warm-up step each: kernels not compiled before compile there)
    kernels_seconds: float = 0.0
    capture_seconds: float = 0.0
    cache_tokens: int = 0  # tokens the KV cache holds (its blocks, scratch left out)
    block_tokens: int = 0
    in_flight_mean: float = 0.0  # responses in the cache during a decode step, on average
    in_flight_max: int = 0
    preempted: int = 0  # responses paused for lack of free blocks (their tokens recomputed when resumed)
    attention: str = ""  # the decode step's attention kernel (an Attention)
    top_p_kernels: bool = False  # sampling by the Triton kernels (else by sorting)
    kv_cache: str = ""  # the KV cache's dtype
    fused_projections: bool = False  # q/k/v and gate/up each one matrix product (fuse_projections)


class ContinuousBatcher:
    """Generates token ids for many prompts through `slots` concurrent sequences, their KV cache in blocks
    of `block` tokens (`cache_tokens` in all; default: every slot at full `length`) handed out as they grow.
    When a response needs a block and none is free, the response admitted last is paused: its blocks are
    freed, and it waits at the head of the queue to be resumed (its prompt and tokens so far prefilled
    again: the same sampling numbers, so the same tokens). A block as long as `length` with the default
    cache is one fixed slot per response: the cache of continuous batching before paging."""

    def __init__(self, model, slots: int, length: int, eos: int, temperature: float, top_p: float,
                 graphs: bool = True, compile: bool = False, block: int = BLOCK_TOKENS,
                 cache_tokens: int | None = None, kernels: bool = True, kv_dtype: torch.dtype | None = None):
        """kernels: the Triton kernels for attention and top-p where they run, and fused projections
        (fuse_projections); False: the route before them (FlashAttention where it runs, top-p by sorting, 7
        matrix products a layer), the benchmarks' baseline. kv_dtype: the KV cache's (default: the model's;
        paged_attention.EIGHT_BIT: 8-bit keys and values with their scales, half the bytes a token)."""
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        config, self.device, self.dtype = model.config, model.device, model.dtype
        if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
            raise ValueError("continuous batching supports full attention only (this model has sliding layers)")
        if not all(hasattr(self.decoder, part) for part in DECODER_PARTS):
            raise ValueError(f"continuous batching runs the decoder's {', '.join(DECODER_PARTS)} itself, and this "
                             f"model's decoder ({type(self.decoder).__name__}) lacks some")
        self.layers = self.decoder.layers[:config.num_hidden_layers]
        self.slots, self.length, self.eos = slots, length, eos
        self.graph_sizes = graph_sizes(slots)  # a tail step looks up the smallest that holds its responses
        block = min(block, length)
        kv_dtype = kv_dtype or model.dtype
        eight_bit = kv_dtype == paged_attention.EIGHT_BIT
        self.attention = decode_attention(self.device, model.dtype, token_kv_shape(config)[1], kernels, eight_bit)
        if eight_bit and self.attention == "triton":  # its 8-bit tiles lie in one block
            block = -(-block // paged_attention.TILE) * paged_attention.TILE
        self.cache = BlockCache(config, slots, length, block, cache_tokens, kv_dtype, self.device)
        vocab = self.head.weight.shape[0]  # the logits' width: the top-p kernels are checked at it
        kernel = kernels and temperature > 0 and top_p_kernels.available(self.device, model.dtype, vocab)
        self.sample = sampler(temperature, top_p, kernel=kernel)
        # each slot's next input token: the token a decode step just drew, read back by run()
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.active = torch.zeros(slots, dtype=torch.long, device=self.device)  # 1: a response is in the slot
        self.keys = torch.zeros(slots, dtype=torch.long, device=self.device)  # each slot's sampling key
        self.use_graphs = graphs and self.device.type == "cuda"
        # torch.compile fuses the step's many small kernels (norms, rotary, activations, the sampler's
        # arithmetic) in two graphs: one decoder layer, which every layer runs (Dynamo traces one layer, not
        # all 28: ~1 s instead of ~10 s a process), and the step's end. The slot count and the cache's shape
        # are dynamic: the two graphs serve every decode size, cache, engine and model of a process.
        self.compiled = compile  # until compiling fails; stats.compiled once it succeeded
        # kernels: fused projections too (the route before them had none)
        fused = [fuse_projections(layer) for layer in self.layers] if kernels else []
        self.fused: list[Fused] | None = fused if fused and all(f is not None for f in fused) else None
        self.eager_layer_step = fused_layer_step if self.fused else layer_step
        self.layer_step, self.last_step = self.eager_layer_step, last_step
        if compile:
            self.layer_step = torch.compile(self.eager_layer_step, fullgraph=True)
            self.last_step = torch.compile(last_step, fullgraph=True)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.heads, self.kernels_compiled = config.num_attention_heads, False
        self.owner: list[int | None] = [None] * slots  # the prompt (index) each slot is answering
        self.lengths = [0] * slots  # tokens in each slot's cache after its next decode step
        self.stats = Stats(cache_tokens=(self.cache.blocks - 1) * block, block_tokens=block, attention=self.attention,
                           top_p_kernels=kernel, fused_projections=self.fused is not None,
                           kv_cache=str(kv_dtype).removeprefix("torch."))

    def _next_tokens(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The next token of each slot from its last one, its write position and its sampling key; writes
        their keys and values into the cache. The decoder's forward pass, run part by part (DECODER_PARTS)."""
        hidden = self.decoder.embed_tokens(tokens[:, None])
        cos, sin = self.decoder.rotary_emb(hidden, positions[:, None])
        table = self.cache.table[:len(tokens)]
        # sorted once for the 28 layers: the Triton kernel starts the longest contexts first
        order = self._any_slots(paged_attention.longest_first(positions))[0] if self.attention == "triton" else None
        layers = len(self.layers)
        for layer, fused, layer_keys, layer_values, scales in zip(
                self.layers, self.fused or [()] * layers, self.cache.keys, self.cache.values,
                self.cache.scales or [None] * layers, strict=True):
            hidden = self.layer_step(layer, *self._any_slots(hidden, cos, sin, positions, table), order, layer_keys,
                                     layer_values, scales, self.attention, *fused)
        return self.last_step(self.decoder.norm, self.head, self.sample, *self._any_slots(hidden, keys, positions))

    def _any_slots(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors, their first dimension (the stepping slots) marked dynamic when the step compiles:
        one graph for every size."""
        if self.compiled:
            for tensor in tensors:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return tensors

    def _decode(self, size: int) -> None:
        """One token for the first `size` slots: writes it to tokens (the next input), advances positions."""
        self.tokens[:size].copy_(self._next_tokens(self.tokens[:size], self.positions[:size], self.keys[:size]))
        self.positions[:size].add_(self.active[:size]).clamp_(max=self.length - 1)

    def _compile(self) -> None:
        """Compile the decode step (a first step into the empty cache); if torch.compile fails here (no
        Triton, no C compiler), say so and decode eagerly."""
        start = time.perf_counter()
        log.info("compiling the decode step (tens of seconds on a machine's first run; seconds once cached)")
        # Graphs for any cache's blocks, block size and blocks per slot: every worker, model and set of a
        # run, and later runs (through Inductor's on-disk cache), reuse them instead of compiling anew.
        for tensor in (*self.cache.keys, *itertools.chain(*self.cache.scales or ())):
            torch._dynamo.maybe_mark_dynamic(tensor, (0, 1))
        for tensor in self.cache.values:  # a block's tokens: 8-bit values keep them last
            torch._dynamo.maybe_mark_dynamic(tensor, (0, 3 if self.cache.scales else 1))
        torch._dynamo.maybe_mark_dynamic(self.cache.table, 1)
        try:
            self._decode(self.slots)  # writes only into the scratch block
        except Exception as e:  # torch.compile raises many kinds; the eager step is always there
            log.warning("decoding without torch.compile, which failed here (%s)", cause(e))
            self.compiled, self.layer_step, self.last_step = False, self.eager_layer_step, last_step
        else:
            self.stats.compiled, self.stats.compile_seconds = True, time.perf_counter() - start
            log.info("compiled the decode step in %.1f s", self.stats.compile_seconds)
        self._clear_warm_up()

    def _compile_kernels(self) -> None:
        """The attention kernel for every graph size, compiled COMPILE_THREADS at a time (Triton releases the
        GIL while it compiles): else each at its size's first step, one after another. If this fails, the
        steps compile them (and fail, or fall back, as they would have)."""
        start = time.perf_counter()
        try:
            compiled = paged_attention.precompile(
                self.graph_sizes, self.heads, self.dtype,
                self.cache.keys[0], self.cache.values[0], self.cache.table, self.positions,
                *(self.cache.scales[0] if self.cache.scales else (None, None)), threads=COMPILE_THREADS)
        except Exception as e:  # any compile error: the launch meets it again, and says so where it is handled
            log.warning("the attention kernels were not compiled ahead of the steps (%s)", cause(e))
        else:
            log.info("compiled %d attention kernels in %.1f s", compiled, time.perf_counter() - start)
        self.kernels_compiled, self.stats.kernels_seconds = True, time.perf_counter() - start

    def _clear_warm_up(self) -> None:
        """After warm-up steps (they wrote only into the scratch block): every slot back at position 0."""
        self.positions.zero_()
        self.tokens.zero_()

    def _capture(self) -> None:
        """One graph per decode size (slots, slots/2, ...), captured before any prompt is in the cache:
        the warm-up steps write only into the scratch block."""
        pool, start = None, time.perf_counter()
        for size in self.graph_sizes:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._decode(size)  # warm-up: kernels chosen, workspaces allocated
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._decode(size)
            pool = graph.pool()
            self.graphs[size] = graph
        self._clear_warm_up()
        self.stats.graph_sizes = sorted(self.graphs)
        self.stats.capture_seconds = time.perf_counter() - start

    def _step(self, size: int) -> None:
        if self.use_graphs:
            self.graphs[size].replay()
        else:
            self._decode(size)
        self.stats.decode_steps += 1
        self.stats.slot_steps += size

    def _prefill(self, slots: list[int], prompts: list[list[int]], keys: list[int]) -> list[int]:
        """Write the prompts' KV into `slots` (whose blocks hold them) and return each one's first generated
        token."""
        width = max(map(len, prompts))
        input_ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)  # any id
        rows = self.cache.rows = torch.tensor(slots, device=self.device)
        hidden = self.decoder(input_ids=input_ids, position_ids=torch.arange(width, device=self.device)[None],
                              attention_mask={"full_attention": None}, past_key_values=self.cache,
                              use_cache=True).last_hidden_state  # right padding: causal attention suffices
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        self.keys[rows] = torch.tensor(keys, device=self.device)
        first = self.sample(self.head(hidden[torch.arange(len(prompts), device=self.device), last]),
                            sampling_hashes(self.keys[rows], last))
        self.tokens[rows] = first
        self.positions[rows] = torch.tensor([len(p) for p in prompts], device=self.device)
        self.active[rows] = 1
        for slot, prompt in zip(slots, prompts, strict=True):
            self.lengths[slot] = len(prompt) + 1
        self.stats.prefill_calls += 1
        return first.tolist()

    def run(self, prompts: list[list[int]], budgets: list[int], on_done: Callable[[int, list[int]], None],
            on_tokens: Callable[[int], None] | None = None, keys: list[int] | None = None) -> None:
        """Generate for every prompt (ids) until its end-of-sequence token or its budget of new tokens;
        on_done(index, new ids) as each one ends, end-of-sequence included when it came; on_tokens(all new
        tokens so far) every PROGRESS_STEPS decode steps and at the end (responses finish late: progress).
        keys: each prompt's sampling key, below 2^63 (default: its index)."""
        keys = list(range(len(prompts))) if keys is None else keys
        if self.attention == "triton" and not self.kernels_compiled:
            self._compile_kernels()
        if self.compiled and not self.stats.compiled:
            self._compile()
        if self.use_graphs and not self.graphs:
            try:
                self._capture()
            except Exception as e:  # a kernel that cannot be captured: the same step, its kernels launched one by one
                log.warning("decoding without CUDA graphs, whose capture failed here (%s)", cause(e))
                self.use_graphs, self.graphs = False, {}
                self._clear_warm_up()
        self.owner = [None] * self.slots
        waiting = list(range(len(prompts)))[::-1]  # popped from the end: prompts go in their given order
        generated: dict[int, list[int]] = {}  # the tokens of each response in flight (or paused)
        admitted: dict[int, int] = {}  # the admission number of each response in flight: the last is paused first
        admissions = itertools.count()
        size = self.slots
        refill_at = max(1, self.slots // 16)  # free slots worth a prefill while prompts wait
        taken = in_flight = 0  # tokens taken; responses in flight, summed over decode steps

        def take(slot: int, token: int) -> None:
            nonlocal taken
            taken += 1
            index = self.owner[slot]
            ids = generated[index]
            ids.append(token)
            if token == self.eos or len(ids) >= budgets[index]:
                self._release(slot)
                admitted.pop(index)
                on_done(index, generated.pop(index))

        def context(index: int) -> list[int]:
            """What a response's prefill reads: its prompt, and its tokens so far when it was paused (the
            position of its last token keys the next token's number, as in a decode step)."""
            return prompts[index] + generated.get(index, [])

        while waiting or any(index is not None for index in self.owner[:size]):
            free = [slot for slot in range(size) if self.owner[slot] is None]
            if waiting and (len(free) >= min(refill_at, len(waiting)) or len(free) == size):
                group = self._admit(free, waiting, context)
                if group:
                    contexts = [context(self.owner[slot]) for slot in group]
                    began = time.perf_counter()
                    first = self._prefill(group, contexts, [keys[self.owner[slot]] for slot in group])
                    self.stats.prefill_seconds += time.perf_counter() - began
                    for slot, token in zip(group, first, strict=True):
                        admitted[self.owner[slot]] = next(admissions)
                        generated.setdefault(self.owner[slot], [])
                        take(slot, token)
                    if not waiting:
                        tail_from = (self.stats.decode_steps, time.perf_counter(), self.stats.context_tokens)
                    continue
            if not waiting:  # the tail: decode with the smallest graph that holds every response left
                size = self._shrink(size)
            self._grow(size, waiting, admitted)
            in_flight += len(admitted)
            self.stats.in_flight_max = max(self.stats.in_flight_max, len(admitted))
            began = time.perf_counter()
            self._step(size)
            tokens = self.tokens[:size].tolist()  # waits for the step
            self.stats.decode_seconds += time.perf_counter() - began
            for slot, token in enumerate(tokens):
                if self.owner[slot] is not None:
                    self.stats.context_tokens += self.lengths[slot]  # what the step held of the response
                    self.lengths[slot] += 1
                    take(slot, token)
            if on_tokens and self.stats.decode_steps % PROGRESS_STEPS == 0:
                on_tokens(taken)
        if on_tokens:
            on_tokens(taken)
        if prompts:
            self.stats.tail_steps = self.stats.decode_steps - tail_from[0]
            self.stats.tail_seconds = time.perf_counter() - tail_from[1]
            self.stats.tail_context_tokens = self.stats.context_tokens - tail_from[2]
            self.stats.in_flight_mean = in_flight / max(self.stats.decode_steps, 1)

    def _admit(self, free: list[int], waiting: list[int], context: Callable[[int], list[int]]) -> list[int]:
        """Give waiting prompts to free slots, as many as one prefill takes and the free blocks hold, 1% of
        the cache kept for the responses in flight to grow into (as vLLM does); returns those slots."""
        group, tokens = [], 0
        spare = (self.cache.blocks - 1) // 100
        for slot in free:
            if not waiting:
                break
            length = len(context(waiting[-1])) + 1
            if group and tokens + length > PREFILL_TOKENS:
                break
            if len(self.cache.free) < self.cache.blocks_for(length) + spare or not self.cache.grow(slot, length):
                break
            self.owner[slot] = waiting.pop()
            tokens += length
            group.append(slot)
        return group

    def _grow(self, size: int, waiting: list[int], admitted: dict[int, int]) -> None:
        """Give each response whose next token starts a block that block; where none is free, pause the
        response admitted last (perhaps the one growing) and put it back at the head of the queue."""
        held, block = self.cache.held, self.cache.block
        for slot in range(size):  # (the length test first: a step starts a block for few slots; a grow() call for
            # each was a quarter of the bookkeeping, python -m bench.host_overhead)
            while self.owner[slot] is not None and self.lengths[slot] > len(held[slot]) * block \
                    and not self.cache.grow(slot, self.lengths[slot]):
                last = max(admitted, key=admitted.get)
                victim = self.owner.index(last)
                admitted.pop(last)
                self._release(victim)
                waiting.append(last)
                self.stats.preempted += 1

    def _shrink(self, size: int) -> int:
        """Move the busy slots to the front and return the smallest graph size that holds them."""
        busy = [slot for slot in range(size) if self.owner[slot] is not None]
        smaller = min((n for n in self.graph_sizes if n >= len(busy)), default=size)
        if smaller < size:
            keep = torch.tensor(busy, device=self.device)
            self.cache.compact(busy)
            for buffer in (self.tokens, self.positions, self.active, self.keys):
                buffer[:len(busy)] = buffer[keep].clone()
                buffer[len(busy):] = 0
            self.owner = [self.owner[slot] for slot in busy] + [None] * (self.slots - len(busy))
            self.lengths = [self.lengths[slot] for slot in busy] + [0] * (self.slots - len(busy))
        return smaller

    def _release(self, slot: int) -> None:
        self.owner[slot] = None
        self.active[slot] = 0
        self.positions[slot] = 0
        self.cache.release(slot)
