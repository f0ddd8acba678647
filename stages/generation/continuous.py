"""Continuous batching for evaluation: a fixed number of slots, each holding one response's KV cache at
its own length; a slot whose response ended takes the next waiting prompt, so no step decodes padding.

On a GPU each decode step is one CUDA graph replay, and attention reads each slot's cache only up to
that slot's own length (FlashAttention's variable-length kernel in PyTorch); on a CPU the same steps
run eagerly with a masked SDPA. Prompts are prefilled eagerly, a group at a time, into free slots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)
PREFILL_TOKENS = 32_768  # prompt tokens per prefill forward: bounds its activation memory
PROGRESS_STEPS = 64  # decode steps between progress reports
SMALLEST_GRAPH = 8  # slots of the smallest decode graph; once no prompt waits, the batch shrinks to fit


class DecodeStep:
    """What attention needs in a decode step over the slot cache; passed to the model in place of a mask,
    so transformers hands it, untouched, to the attention function (stages.generation.batched)."""

    def __init__(self, positions: torch.Tensor, flash: bool):
        self.positions = positions  # per slot: where this step's token is written (= tokens before it)
        self.flash = flash

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None):
        """query [slots, heads, 1, head_dim] against the slot cache [slots, length, kv_heads, head_dim] ->
        [slots, 1, heads, head_dim], each slot's query seeing its cache up to and including its position."""
        slots, length, kv_heads, head_dim = keys.shape
        heads = query.shape[1]
        used = self.positions + 1
        if self.flash:
            # One query row per slot with every head: FlashAttention folds each KV head's query heads into rows
            # itself (every KV head read once) and, when few slots leave SMs idle, splits each slot's keys over
            # several blocks (split-KV; measured on an H200: 8 slots at ~3,000 tokens, 7.9 -> 5.1 ms a step).
            steps = torch.arange(slots + 1, device=query.device, dtype=torch.int32)
            output = torch.ops.aten._flash_attention_forward(
                query.reshape(slots, heads, head_dim), keys.view(slots * length, kv_heads, head_dim),
                values.view(slots * length, kv_heads, head_dim), steps, steps * length, 1, length, 0.0, False, False,
                scale=scaling, seqused_k=used.to(torch.int32))[0]
            return output.reshape(slots, 1, heads, head_dim)
        # Masked SDPA, each group of query heads folded into the query length (no K/V copies per head).
        mask = (torch.arange(length, device=query.device) < used[:, None])[:, None, None, :]
        folded = query.reshape(slots, kv_heads, heads // kv_heads, head_dim)
        output = torch.nn.functional.scaled_dot_product_attention(
            folded, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scaling)
        return output.reshape(slots, 1, heads, head_dim)


def token_kv_shape(config) -> tuple[int, int]:
    """(KV heads, head dim): one layer's keys (or values) of one token."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


class SlotCache:
    """The KV cache of every slot, per layer [slots, length, kv_heads, head_dim] (FlashAttention's layout).
    A prefill passes it to the model as past_key_values: transformers' attention layers call update()."""

    def __init__(self, config, slots: int, length: int, dtype: torch.dtype, device: torch.device):
        shape = (slots, length, *token_kv_shape(config))
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.rows: torch.Tensor | None = None  # the slots the prompts being prefilled go to

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Prompts are written from position 0; they attend to themselves only."""
        length = key_states.shape[2]
        self.keys[layer_idx][self.rows, :length] = key_states.transpose(1, 2)
        self.values[layer_idx][self.rows, :length] = value_states.transpose(1, 2)
        return key_states, value_states

    def compact(self, keep: torch.Tensor) -> None:
        """Move the slots in `keep` to the front, in that order."""
        for tensor in (*self.keys, *self.values):
            tensor[:len(keep)] = tensor[keep]


class LayerSlots:
    """One layer's slot cache as a decode step's attention sees it (its past_key_values): update() writes
    each slot's new key and value at the slot's position and returns the cache of the stepping slots. It
    ignores the layer index, so one compiled layer step serves every layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        self.keys, self.values, self.positions = keys, values, positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        slots = key_states.shape[0]
        index = torch.arange(slots, device=key_states.device)
        self.keys[index, self.positions] = key_states[:, :, 0]
        self.values[index, self.positions] = value_states[:, :, 0]
        return self.keys[:slots], self.values[:slots]


DECODER_PARTS = ("embed_tokens", "rotary_emb", "layers", "norm")  # what a decode step runs, in this order


def layer_step(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               keys: torch.Tensor, values: torch.Tensor, flash: bool) -> torch.Tensor:
    """One decoder layer of a decode step: hidden [slots, 1, hidden] of the slots' last tokens, written to
    and attending over the layer's cache (keys, values) up to each slot's position."""
    return layer(hidden, attention_mask=DecodeStep(positions, flash), position_ids=positions[:, None],
                 past_key_values=LayerSlots(keys, values, positions), use_cache=True, position_embeddings=(cos, sin))


def last_step(norm, head, sample, hidden: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A decode step's end: the final norm, the output head and the sampler: each slot's next token."""
    return sample(head(norm(hidden[:, -1])), uniforms(keys, positions))


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


def uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One number in (0, 1) per row, a hash of the row's 63-bit key (seed, prompt, sample number) and its
    counter (the position of the token whose logits are sampled): a response draws the same numbers
    whatever batch, slot or GPU it runs in."""
    mixed = _mix32(_mix32((keys >> 32) & 0xFFFFFFFF) ^ (keys & 0xFFFFFFFF))
    mixed = _mix32(mixed ^ (counters & 0xFFFFFFFF))
    return ((mixed >> 8).float() + 0.5) / 2**24  # 24 bits: exact in float32, never 0 or 1


@torch.library.custom_op("r1_math_lora::cumsum", mutates_args=(), schema="(Tensor x) -> Tensor")
def cumsum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sums over the last dimension, opaque to torch.compile: Inductor's own scan, split over a
    dynamic number of rows (a graph compiled at few slots), fails to generate its code (torch 2.11, an H100)."""
    return x.cumsum(-1)


@cumsum.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def sampler(temperature: float, top_p: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Next tokens from logits [rows, vocab] and one uniform number per row: argmax for temperature 0, else
    the model card's sampling (temperature, then top-p as transformers' TopPLogitsWarper cuts it). The logits
    are sorted as they come (bf16 from the model: half the bytes of float, the same order), and the draw
    inverts the kept tokens' cumulative distribution at the row's number: one number a row instead of
    noise over the whole vocabulary, and no random state (graph safe)."""
    def sample(logits: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        ascending, order = logits.sort(dim=-1)
        cumulative = cumsum((ascending.float() / temperature).softmax(-1))
        # the tokens cut (the least likely, a prefix of the ascending order) end at `floor`; 0 when none are
        floor = torch.zeros_like(cumulative[:, :1])
        if top_p < 1:
            cut = cumulative <= 1 - top_p
            cut[:, -1] = False  # the most likely token always stays
            floor = torch.where(cut, cumulative, 0).amax(-1, keepdim=True)
        target = floor + numbers[:, None] * (cumulative[:, -1:] - floor)  # inside the kept tokens' mass
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
    compiled: bool = False  # the decode step ran torch.compile's code
    compile_seconds: float = 0.0


class ContinuousBatcher:
    """Generates token ids for many prompts through `slots` concurrent KV-cache slots."""

    def __init__(self, model, slots: int, length: int, eos: int, temperature: float, top_p: float,
                 graphs: bool = True, compile: bool = False):
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        config, self.device = model.config, model.device
        if set(getattr(config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
            raise ValueError("continuous batching supports full attention only (this model has sliding layers)")
        if not all(hasattr(self.decoder, part) for part in DECODER_PARTS):
            raise ValueError(f"continuous batching runs the decoder's {', '.join(DECODER_PARTS)} itself, and this "
                             f"model's decoder ({type(self.decoder).__name__}) lacks some")
        self.layers = self.decoder.layers[:config.num_hidden_layers]
        self.slots, self.length, self.eos = slots, length, eos
        self.cache = SlotCache(config, slots, length, model.dtype, self.device)
        self.sample = sampler(temperature, top_p)
        self.flash = flash_decode_available(self.device, model.dtype)
        # each slot's next input token: the token a decode step just drew, read back by run()
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.active = torch.zeros(slots, dtype=torch.long, device=self.device)  # 1: a response is in the slot
        self.keys = torch.zeros(slots, dtype=torch.long, device=self.device)  # each slot's sampling key
        self.use_graphs = graphs and self.device.type == "cuda"
        # torch.compile fuses the step's many small kernels (norms, rotary, activations, the sampler's
        # arithmetic) in two graphs: one decoder layer, which every layer runs (Dynamo traces one layer, not
        # all 28: ~1 s instead of ~10 s a process), and the step's end. The slot count is a dynamic dimension:
        # the two graphs serve every decode size, cache, engine and model of a process.
        self.compiled = compile  # until compiling fails; stats.compiled once it succeeded
        self.layer_step, self.last_step = layer_step, last_step
        if compile:
            self.layer_step = torch.compile(layer_step, fullgraph=True)
            self.last_step = torch.compile(last_step, fullgraph=True)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.owner: list[int | None] = [None] * slots  # the prompt (index) each slot is answering
        self.stats = Stats()

    def _next_tokens(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The next token of each slot from its last one, its write position and its sampling key; writes
        their keys and values into the cache. The decoder's forward pass, run part by part (DECODER_PARTS)."""
        hidden = self.decoder.embed_tokens(tokens[:, None])
        cos, sin = self.decoder.rotary_emb(hidden, positions[:, None])
        for layer, layer_keys, layer_values in zip(self.layers, self.cache.keys, self.cache.values, strict=True):
            hidden = self.layer_step(layer, *self._any_slots(hidden, cos, sin, positions), layer_keys, layer_values,
                                     self.flash)
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

    def _graph_sizes(self) -> list[int]:
        sizes, size = [], self.slots
        while size >= SMALLEST_GRAPH:
            sizes.append(size)
            size //= 2
        return sizes or [self.slots]

    def _compile(self) -> None:
        """Compile the decode step (a first step into the empty cache); if torch.compile fails here (no
        Triton, no C compiler), say so and decode eagerly."""
        start = time.perf_counter()
        log.info("compiling the decode step (tens of seconds on a machine's first run; seconds once cached)")
        # Graphs for any cache's slots and length: every worker, model and set of a run, and later runs
        # (through Inductor's on-disk cache), reuse them instead of compiling anew.
        for tensor in (*self.cache.keys, *self.cache.values):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
            torch._dynamo.maybe_mark_dynamic(tensor, 1)
        try:
            self._decode(self.slots)  # writes only into empty slots, at position 0
        except Exception as e:  # torch.compile raises many kinds; the eager step is always there
            log.warning("decoding without torch.compile, which failed here (%s: %s)", type(e).__name__,
                        (str(e).strip().splitlines() or [""])[0])
            self.compiled, self.layer_step, self.last_step = False, layer_step, last_step
        else:
            self.stats.compiled, self.stats.compile_seconds = True, time.perf_counter() - start
            log.info("compiled the decode step in %.1f s", self.stats.compile_seconds)
        self.positions.zero_()
        self.tokens.zero_()

    def _capture(self) -> None:
        """One graph per decode size (slots, slots/2, ...), captured before any prompt is in the cache:
        the warm-up steps write only into empty slots."""
        pool = None
        for size in self._graph_sizes():
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
        self.positions.zero_()
        self.tokens.zero_()
        self.stats.graph_sizes = sorted(self.graphs)

    def _step(self, size: int) -> None:
        if self.use_graphs:
            self.graphs[size].replay()
        else:
            self._decode(size)
        self.stats.decode_steps += 1
        self.stats.slot_steps += size

    def _prefill(self, slots: list[int], prompts: list[list[int]], keys: list[int]) -> list[int]:
        """Write the prompts' KV into `slots` and return each one's first generated token."""
        width = max(map(len, prompts))
        input_ids = torch.tensor([p + [self.eos] * (width - len(p)) for p in prompts], device=self.device)
        rows = self.cache.rows = torch.tensor(slots, device=self.device)
        hidden = self.decoder(input_ids=input_ids, position_ids=torch.arange(width, device=self.device)[None],
                              attention_mask={"full_attention": None}, past_key_values=self.cache,
                              use_cache=True).last_hidden_state  # right padding: causal attention suffices
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        self.keys[rows] = torch.tensor(keys, device=self.device)
        first = self.sample(self.head(hidden[torch.arange(len(prompts), device=self.device), last]),
                            uniforms(self.keys[rows], last))
        self.tokens[rows] = first
        self.positions[rows] = torch.tensor([len(p) for p in prompts], device=self.device)
        self.active[rows] = 1
        self.stats.prefill_calls += 1
        return first.tolist()

    def run(self, prompts: list[list[int]], budgets: list[int], on_done: Callable[[int, list[int]], None],
            on_tokens: Callable[[int], None] | None = None, keys: list[int] | None = None) -> None:
        """Generate for every prompt (ids) until its end-of-sequence token or its budget of new tokens;
        on_done(index, new ids) as each one ends, end-of-sequence included when it came; on_tokens(all new
        tokens so far) every PROGRESS_STEPS decode steps and at the end (responses finish late: progress).
        keys: each prompt's sampling key, below 2^63 (default: its index)."""
        keys = list(range(len(prompts))) if keys is None else keys
        if self.compiled and not self.stats.compiled:
            self._compile()
        if self.use_graphs and not self.graphs:
            self._capture()
        self.owner = [None] * self.slots
        waiting = list(range(len(prompts)))[::-1]  # popped from the end: prompts go in their given order
        generated: dict[int, list[int]] = {}
        size = self.slots
        refill_at = max(1, self.slots // 16)  # free slots worth a prefill while prompts wait

        taken = 0

        def take(slot: int, token: int) -> None:
            nonlocal taken
            taken += 1
            index = self.owner[slot]
            ids = generated[index]
            ids.append(token)
            if token == self.eos or len(ids) >= budgets[index]:
                self._release(slot)
                on_done(index, generated.pop(index))

        while waiting or any(index is not None for index in self.owner[:size]):
            free = [slot for slot in range(size) if self.owner[slot] is None]
            if waiting and (len(free) >= min(refill_at, len(waiting)) or len(free) == size):
                group = self._admit(free, waiting, prompts)
                first = self._prefill(group, [prompts[self.owner[slot]] for slot in group],
                                      [keys[self.owner[slot]] for slot in group])
                for slot, token in zip(group, first, strict=True):
                    generated[self.owner[slot]] = []
                    take(slot, token)
                if not waiting:
                    tail_from = (self.stats.decode_steps, time.perf_counter())
                continue
            if not waiting:  # the tail: decode with the smallest graph that holds every response left
                size = self._shrink(size)
            self._step(size)
            for slot, token in enumerate(self.tokens[:size].tolist()):
                if self.owner[slot] is not None:
                    take(slot, token)
            if on_tokens and self.stats.decode_steps % PROGRESS_STEPS == 0:
                on_tokens(taken)
        if on_tokens:
            on_tokens(taken)
        if prompts:
            self.stats.tail_steps = self.stats.decode_steps - tail_from[0]
            self.stats.tail_seconds = time.perf_counter() - tail_from[1]

    def _admit(self, free: list[int], waiting: list[int], prompts: list[list[int]]) -> list[int]:
        """Give waiting prompts to free slots, as many as one prefill takes; returns those slots."""
        group, tokens = [], 0
        for slot in free:
            if not waiting or (group and tokens + len(prompts[waiting[-1]]) > PREFILL_TOKENS):
                break
            self.owner[slot] = waiting.pop()
            tokens += len(prompts[self.owner[slot]])
            group.append(slot)
        return group

    def _shrink(self, size: int) -> int:
        """Move the busy slots to the front and return the smallest graph size that holds them."""
        busy = [slot for slot in range(size) if self.owner[slot] is not None]
        smaller = min((n for n in self._graph_sizes() if n >= len(busy)), default=size)
        if smaller < size:
            keep = torch.tensor(busy, device=self.device)
            self.cache.compact(keep)
            for buffer in (self.tokens, self.positions, self.active, self.keys):
                buffer[:len(busy)] = buffer[keep].clone()
                buffer[len(busy):] = 0
            self.owner = [self.owner[slot] for slot in busy] + [None] * (self.slots - len(busy))
        return smaller

    def _release(self, slot: int) -> None:
        self.owner[slot] = None
        self.active[slot] = 0
        self.positions[slot] = 0
