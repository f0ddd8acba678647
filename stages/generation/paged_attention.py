"""Decode attention over the block cache in Triton: one query token per slot against the keys and values
its table's blocks hold, read once for all the query heads of a KV head.

Why not FlashAttention's variable-length kernel (the route before this one): it computes a query tile of
128 rows whatever the sequence holds, and a decode step's sequence holds one token's 6 query heads of a KV
head, so 95% of its matrix products were padding; on an H100 at 512 slots that made it half bound by
arithmetic (2.2 TB/s of 3.35). Here a program pads the group to 16 rows (the smallest tensor-core tile).

A slot's tokens are split into partitions (whole blocks, or at small batches parts of one, down to two tiles),
one program per (slot, KV head, partition), so that small batches still fill the GPU; the last of a slot's
programs to finish weighs their results by their log-sum-exps (a slot of one partition writes its own): no
second kernel a layer to launch and wait for. Given the slots' order by context, longest first (the decode
step sorts them once for its 28 layers), the programs start in that order, a slot's partitions and KV heads
together: the longest start first and the short ones fill in at the end, where in the slots' own order a long
one starting last kept the GPU waiting (H100, 1,024 slots at a run's spread of contexts, 8-bit cache: 7% less
time a layer; bench/results/kernel-partitions-*).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from stages.core.cli import cause

log = logging.getLogger(__name__)
TILE = 64  # keys a program reads per iteration
WIDE_TILE = 128  # an 8-bit cache's, where a partition holds 3 such tiles or more: its per-tile work (the scales,
# the softmax's reductions) amortized over twice the keys. H100, ms a layer, 64- / 128-key tiles: 512 slots x 2,048
# (whole blocks) 0.49 / 0.32, 64 x 4,096 (384-token partitions) 0.14 / 0.10; 8 x 8,192 (two 128-key tiles a
# partition, or two 64-key ones) 0.06-0.15 / 0.04 the other way (bench/results/kernel-launch-*)
ROWS = 16  # a KV head's query rows, padded to the smallest tile tl.dot takes
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # on a CPU, in tests
PROGRAMS = 4096  # partitions are as small as it takes to give the GPU about this many programs
MERGE_CHUNK = 16  # partitions' results the merge kernel sums at a time
WARPS, STAGES = 4, 2  # the partials kernel's launch (bench.kernel_launch sweeps them)
REGISTERS = None  # its registers a thread at most (maxnreg), None: the compiler's choice
# The partials kernel merges a slot's partitions itself (its last program; no merge kernel) where a slot may hold
# this many or fewer; more (small batches: partitions of part of a block) go to the merge kernel, which sums them
# 16 at a time in parallel over heads where the last program would sum them one after another. H100, ms a layer,
# merge kernel / merged in place, longest first, 8-bit: 1,024 slots (3 partitions) 0.442 / 0.401, 256 (9) 0.115 /
# 0.105, 64 (23) 0.044 / 0.040, 8 (68) 0.016 / 0.019 (bench/results/kernel-partitions-*)
MERGED_PARTS = 32
EIGHT_BIT = torch.float8_e4m3fn  # eval.kv_cache: fp8 keeps keys and values so, a float32 scale per token and head
EIGHT_BIT_MAX = torch.finfo(EIGHT_BIT).max


try:  # CUDA builds of torch bring Triton; CPU tests run these kernels in its interpreter (TRITON_INTERPRET=1)
    import triton
    import triton.language as tl
except ImportError:
    triton = None
else:
    @triton.jit
    def partials(query, keys, values, key_scales, value_scales, table, positions, order, out, lse, result, tickets,
                 scale_log2, q_slot, q_head, k_block, k_token, k_head, v_block, v_head, v_dim, s_block, s_token,
                 t_slot, o_slot, o_part, o_head, l_slot, l_part, r_slot, r_head, BLOCK: tl.constexpr,
                 PART: tl.constexpr, GROUPS: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
                 TILE: tl.constexpr, SCALED: tl.constexpr, FLOAT_DOTS: tl.constexpr, ORDERED: tl.constexpr,
                 MERGED: tl.constexpr, KV_HEADS: tl.constexpr):
        """MERGED: each program of a slot with one partition writes its result; of one with several, the
        last of them to finish (counted in tickets, zeros before) merges theirs."""
        if ORDERED:  # programs in the slots' given order, partition fastest, then KV head
            part, kv_head = tl.program_id(0), tl.program_id(1)
            slot = tl.load(order + tl.program_id(2))
            tl.assume(part >= 0)  # a first-axis program id may be any int32: else a token's block is figured
            tl.assume(part < 65536)  # in 64-bit signed division (40 more instructions a tile over a bf16 cache)
        else:
            slot, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        first = part * PART  # the partition's first token
        held = tl.load(positions + slot) + 1  # the slot's tokens
        count = tl.minimum(held - first, PART)  # those in the partition
        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, DIM)
        heads = kv_head * GROUPS + rows
        q = tl.load(query + slot * q_slot + heads[:, None] * q_head + dims[None, :], mask=rows[:, None] < GROUPS,
                    other=0.0)
        if SCALED:  # fp16 dots: e4m3 converts to fp16 in one instruction a pair (to bf16 in three); the query
            q = (q.to(tl.float32) * scale_log2).to(tl.float16)  # scaled first, far inside fp16's range
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM], tl.float32)
        offsets = tl.arange(0, TILE)
        for start in range(0, count, TILE):
            tokens = start + offsets  # in the partition
            valid = tokens < count
            if SCALED:  # 8-bit: a tile lies in one block (TILE divides BLOCK and PART); values kept [dim, token]
                block = tl.load(table + slot * t_slot + (first + start) // BLOCK).to(tl.int64)
                within = tl.multiple_of((first + start) % BLOCK, TILE) + offsets  # in the block (a hint Triton
                # 3.6 needs to load the values' rows whole: else a byte a load, 1.4-1.8x slower on an H100)
                # Unmasked, so the loads are whole vectors: a held block's tokens past the slot's are stale
                # numbers (never NaN: written by quantize, or zeros), and weigh 0 below.
                k = tl.load(keys + block * k_block + within[:, None] * k_token + kv_head * k_head + dims[None, :])
                v = tl.load(values + block * v_block + kv_head * v_head + dims[None, :] * v_dim + within[:, None])
                scaled = block * s_block + within * s_token + kv_head
                key_scale = tl.load(key_scales + scaled, mask=valid, other=0.0)
                value_scale = tl.load(value_scales + scaled, mask=valid, other=0.0)
                k, v = k.to(tl.float16), v.to(tl.float16)
            else:
                blocks = tl.load(table + slot * t_slot + (first + tokens) // BLOCK, mask=valid, other=0)
                at = (blocks.to(tl.int64)[:, None] * k_block + ((first + tokens) % BLOCK)[:, None] * k_token
                      + kv_head * k_head + dims[None, :])
                k = tl.load(keys + at, mask=valid[:, None], other=0.0)
                v = tl.load(values + at, mask=valid[:, None], other=0.0)
            if FLOAT_DOTS:  # Triton's interpreter multiplies bf16 as raw integers
                q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k))
            if SCALED:  # q.k = (q.k8) times the key's scale
                scores = scores * key_scale[None, :]
            else:
                scores = scores * scale_log2
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp2(scores - new_best[:, None])
            shrink = tl.exp2(best - new_best)
            total = total * shrink + tl.sum(weights, 1)
            if SCALED:  # the values' scales in the weights, relative to the tile's largest (fp16's range)
                top = tl.max(value_scale, 0)
                weights = weights * (value_scale / top)[None, :]
                acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v) * top
            else:
                acc = acc * shrink[:, None] + tl.dot(weights.to(v.dtype), v)
            best = new_best
        keep = rows < GROUPS
        parts = tl.cdiv(held, PART)  # the slot's partitions that hold tokens
        if count > 0:
            if MERGED and parts == 1:
                tl.store(result + slot * r_slot + heads[:, None] * r_head + dims[None, :],
                         (acc / total[:, None]).to(result.dtype.element_ty), mask=keep[:, None])
            else:
                tl.store(out + slot * o_slot + part * o_part + heads[:, None] * o_head + dims[None, :],
                         acc / total[:, None], mask=keep[:, None])
                tl.store(lse + slot * l_slot + part * l_part + heads, best + tl.log2(total), mask=keep)
            if MERGED and parts > 1:
                tl.debug_barrier()  # every thread's stores before the ticket (released with it)
                ticket = tl.atomic_add(tickets + slot * KV_HEADS + kv_head, 1, sem="acq_rel")
                if ticket == parts - 1:  # the last: the others' results are visible (acquired)
                    top = tl.full([ROWS], float("-inf"), tl.float32)
                    merged = tl.zeros([ROWS, DIM], tl.float32)
                    weight = tl.zeros([ROWS], tl.float32)
                    for each in range(0, parts):  # an online sum of the partitions' results by their lse,
                        # read past the L1 cache (.cg), which may hold another layer's numbers at these addresses
                        part_lse = tl.load(lse + slot * l_slot + each * l_part + heads, mask=keep, other=0.0,
                                           cache_modifier=".cg")
                        part_out = tl.load(out + slot * o_slot + each * o_part + heads[:, None] * o_head
                                           + dims[None, :], mask=keep[:, None], other=0.0, cache_modifier=".cg")
                        new_top = tl.maximum(top, part_lse)
                        shrink, grow = tl.exp2(top - new_top), tl.exp2(part_lse - new_top)
                        merged = merged * shrink[:, None] + part_out * grow[:, None]
                        weight = weight * shrink + grow
                        top = new_top
                    tl.store(result + slot * r_slot + heads[:, None] * r_head + dims[None, :],
                             (merged / weight[:, None]).to(result.dtype.element_ty), mask=keep[:, None])
        elif not MERGED:
            tl.store(lse + slot * l_slot + part * l_part + heads, float("-inf"), mask=keep)

    @triton.jit
    def merge(out, lse, result, parts, o_slot, o_part, o_head, l_slot, l_part, r_slot, r_head,
              PARTS: tl.constexpr, DIM: tl.constexpr, CHUNK: tl.constexpr):
        slot, head = tl.program_id(0), tl.program_id(1)
        each = tl.arange(0, PARTS)
        top = tl.max(tl.load(lse + slot * l_slot + each * l_part + head, mask=each < parts, other=float("-inf")), 0)
        dims = tl.arange(0, DIM)  # (partition 0 always holds the slot's first token: top is finite)
        merged = tl.zeros([DIM], tl.float32)
        total = 0.0
        for first in range(0, parts, CHUNK):  # CHUNK partitions' results at a time: few registers
            chunk = first + tl.arange(0, CHUNK)
            weights = tl.exp2(tl.load(lse + slot * l_slot + chunk * l_part + head, mask=chunk < parts,
                                      other=float("-inf")) - top)
            partial = tl.load(out + slot * o_slot + chunk[:, None] * o_part + head * o_head + dims[None, :],
                              mask=(weights > 0)[:, None], other=0.0)
            merged += tl.sum(partial * weights[:, None], 0)
            total += tl.sum(weights, 0)
        merged = merged / total
        tl.store(result + slot * r_slot + head * r_head + dims, merged.to(result.dtype.element_ty))


def quantize(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys or values [..., head_dim] as 8-bit floats and a float32 scale per row: its largest magnitude maps
    to the format's largest (448), so no row overflows and each keeps e4m3's relative precision (~6%)."""
    scale = states.abs().amax(-1, keepdim=True).float().clamp(min=1e-30) / EIGHT_BIT_MAX
    return (states.float() / scale).to(EIGHT_BIT), scale[..., 0]


def value_layout(values: torch.Tensor, back: bool = False) -> torch.Tensor:
    """8-bit values [blocks, block, kv_heads, head_dim] as an 8-bit cache keeps them, [blocks, kv_heads, head_dim,
    block] (back: the other way). The kernel sums values over tokens, so a matrix-product operand needs a
    token's neighbours in a register: bf16 values get there by a transposing load (ldmatrix.trans), which
    8-bit values lack on sm_90, so they are stored transposed."""
    return values.permute(0, 3, 1, 2) if back else values.permute(0, 2, 3, 1).contiguous()


def dequantize(states: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """What quantize() stored, back in `dtype`; states unchanged (but for the dtype) when scale is None."""
    return states.to(dtype) if scale is None else (states.float() * scale[..., None]).to(dtype)


def available(device: torch.device, dtype: torch.dtype, head_dim: int, eight_bit: bool = False) -> bool:
    """The Triton decode kernel runs here, and right: a CUDA GPU, bf16 or fp16, a power-of-two head size, and
    on a small cache (eight_bit: quantized) it gives what plain attention gives (checked once per process and
    shape)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim < 16 or head_dim & (head_dim - 1) or triton is None:
        return False
    return verified(device, dtype, head_dim, eight_bit)


@functools.cache
def verified(device: torch.device, dtype: torch.dtype, head_dim: int, eight_bit: bool = False) -> bool:
    """The kernel against plain attention on small caches (3 slots of two blocks, scattered: 80-token blocks,
    one ending inside a tile; 256-token ones, in partitions of half a block and of whole blocks; 8-bit, with its
    wide tiles too, over whole blocks and 384-token partitions across 512-token blocks), from the same rounded
    inputs; False, and a warning, if it fails or differs. The cases' kernels are compiled side by side first."""
    cases = (((256, 128, TILE), (256, 512, WIDE_TILE), (512, 384, WIDE_TILE)) if eight_bit
             else ((80, 80, TILE), (256, 128, TILE), (256, 256, TILE)))
    try:
        with compiling(len(cases)) as mode:
            for case in cases if mode else ():
                _error(device, dtype, head_dim, eight_bit, *case, warm=True)
        for block, part, tile in cases:
            error = _error(device, dtype, head_dim, eight_bit, block, part, tile)
            if not error < 2e-2:  # bf16's rounding of the output is below 1e-2 here
                raise ArithmeticError(f"it differs from plain attention by {error:.3g} (blocks of {block}, "
                                      f"partitions of {part})")
        return True
    except Exception as e:  # no Triton, it cannot compile for this GPU, or it is wrong here: the fallbacks serve
        log.warning("decoding without the Triton attention kernel, which does not run right here (%s)", cause(e))
        return False


def _error(device: torch.device, dtype: torch.dtype, head_dim: int, eight_bit: bool, block: int, part: int,
           tile: int, warm: bool = False) -> float:
    """verified()'s case: the kernel's largest difference from plain attention (warm: compile its kernels, 0)."""
    generator = torch.Generator(device=device).manual_seed(0)
    slots, per_slot, kv_heads, heads = 3, 2, 2, 12
    keys, values = (torch.randn(1 + slots * per_slot, block, kv_heads, head_dim, device=device,
                                generator=generator).to(dtype) for _ in range(2))
    query = torch.randn(slots, heads, head_dim, device=device, generator=generator).to(dtype)
    table = (torch.arange(slots * per_slot, device=device) + 1).flip(0).view(slots, per_slot)
    positions = torch.tensor([0, block - 1, 2 * block - 1], device=device)
    scale = head_dim ** -0.5
    (keys, key_scales), (values, value_scales) = (quantize(t) if eight_bit else (t, None) for t in (keys, values))
    stored = value_layout(values) if eight_bit else values
    result = _attend(query, keys, stored, table, positions, scale, key_scales, value_scales, part, tile,
                     longest_first(positions), warm).float()  # the order a decode step gives it
    if warm:
        return 0.0
    cached = [dequantize(tensor, scales, torch.float32)[table].flatten(1, 2).repeat_interleave(
        heads // kv_heads, dim=2) for tensor, scales in ((keys, key_scales), (values, value_scales))]
    # [slots, tokens, heads, head_dim]
    scores = torch.einsum("shd,sthd->sht", query.float(), cached[0]) * scale
    seen = torch.arange(per_slot * block, device=device) <= positions[:, None]
    scores = scores.masked_fill(~seen[:, None, :], float("-inf"))
    return (result - torch.einsum("sht,sthd->shd", scores.softmax(-1), cached[1])).abs().max().item()


def partition_tokens(slots: int, kv_heads: int, per_slot: int, block: int, tile: int = TILE) -> int:
    """Tokens of a slot one program reads: as few as give the GPU about PROGRAMS programs, whole blocks when
    that is a block or more, two at least (H100, 512-token blocks: partitions of one ran 2.6x slower over an
    8-bit cache than of two or more, 1.09x over bf16; bench/results/kernel-partitions-*); else part of a
    block, whole tiles, at least two (a partition's fixed cost, its result written and merged, against the
    tiles it reads), so a few slots still fill the GPU."""
    wanted = slots * kv_heads * per_slot * block // PROGRAMS
    if wanted >= block:
        return min(per_slot, max(2, wanted // block)) * block
    if block % tile or block <= 2 * tile:
        return block
    return min(block, max(2 * tile, -(-wanted // tile) * tile))


def tile_for(part: int, block: int, eight_bit: bool) -> int:
    """Keys a tile for partitions of `part` tokens: an 8-bit cache's WIDE_TILE where a partition holds three or
    more (blocks of a multiple of WIDE_TILE), else TILE."""
    return WIDE_TILE if eight_bit and block % WIDE_TILE == 0 and part >= 3 * WIDE_TILE else TILE


def launch_shape(slots: int, kv_heads: int, per_slot: int, block: int, eight_bit: bool = False) -> tuple[int, int]:
    """(tokens a partition, keys a tile): partitions sized for WIDE_TILE tiles where tile_for takes them, else
    for TILE's."""
    part = partition_tokens(slots, kv_heads, per_slot, block, WIDE_TILE)
    if tile_for(part, block, eight_bit) == WIDE_TILE:
        return part, WIDE_TILE
    return partition_tokens(slots, kv_heads, per_slot, block), TILE


@torch.library.custom_op("r1_math_lora::paged_decode", mutates_args=())
def paged_decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                 positions: torch.Tensor, scale: float, key_scales: torch.Tensor | None = None,
                 value_scales: torch.Tensor | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
    """query [slots, heads, head_dim]; keys, values [blocks, block, kv_heads, head_dim]; table [slots, blocks
    a slot may hold]; positions [slots]: each slot attends to its tokens 0..position -> [slots, heads,
    head_dim]. key_scales, value_scales [blocks, block, kv_heads] (float32) when the keys and values are 8-bit
    (a token's key is its keys row times its scale; values [blocks, kv_heads, head_dim, block]: see
    value_layout; blocks of a multiple of TILE tokens). order [slots]: the slots in the order their programs
    start (longest_first), or None: their own. Opaque to torch.compile: its own kernels."""
    return _decode(query, keys, values, table, positions, scale, key_scales, value_scales, order)


def _decode(query, keys, values, table, positions, scale, key_scales, value_scales, order,
            warm: bool = False) -> torch.Tensor:
    """paged_decode, its partitions and tiles as launch_shape gives them (warm: _attend's)."""
    part, tile = launch_shape(query.shape[0], keys.shape[2], table.shape[1], keys.shape[1], key_scales is not None)
    return _attend(query, keys, values, table, positions, scale, key_scales, value_scales, part, tile, order, warm)


def in_place(per_slot: int, block: int, part: int) -> bool:
    """Whether a slot's partitions (of `part` tokens, over `per_slot` blocks) are merged by its last program,
    which then follow the slots' given order: where it may hold MERGED_PARTS or fewer."""
    return -(-per_slot * block // part) <= MERGED_PARTS


def longest_first(positions: torch.Tensor) -> torch.Tensor:
    """The slots by context, longest first: paged_decode's order."""
    return positions.argsort(descending=True).to(torch.int32)


def _attend(query, keys, values, table, positions, scale, key_scales, value_scales, part: int,
            tile: int, order: torch.Tensor | None = None, warm: bool = False) -> torch.Tensor:
    """paged_decode with `part` tokens a partition (a multiple of the tile, or of the block) and `tile` keys a
    tile (TILE, or for an 8-bit cache WIDE_TILE: a divisor of the block). warm: compile the kernels these
    arguments launch (Triton's warmup: their specialization is the launch's), launch nothing."""
    slots, heads, dim = query.shape
    _, block, kv_heads, _ = keys.shape
    parts = -(-table.shape[1] * block // part)
    out = torch.empty(slots, parts, heads, dim, device=query.device, dtype=torch.float32)
    lse = torch.empty(slots, parts, heads, device=query.device, dtype=torch.float32)
    scaled = key_scales is not None  # and value_scales, laid out alike
    if scaled and block % TILE:
        raise ValueError(f"an 8-bit cache's blocks must hold a multiple of {TILE} tokens, not {block}")
    # in the given order where the partitions are merged in place; where they are many and short (a few slots),
    # the order buys nothing and its lookup delays each program (H100, 8 slots: 0.016 against 0.015 ms a layer)
    merged = in_place(table.shape[1], block, part)
    ordered = order is not None and merged
    result = torch.empty_like(query)
    tickets = torch.zeros(slots * kv_heads if merged else 1, device=query.device, dtype=torch.int32)
    grid = (parts, kv_heads, slots) if ordered else (slots, kv_heads, parts)
    (functools.partial(partials.warmup, grid=grid) if warm else partials[grid])(
        query, keys, values, key_scales if scaled else keys, value_scales if scaled else values, table, positions,
        order if ordered else positions, out, lse, result, tickets, scale * 1.4426950408889634,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        *(values.stride()[:3] if scaled else (0, 0, 0)),
        key_scales.stride(0) if scaled else 0, key_scales.stride(1) if scaled else 0, table.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), result.stride(0),
        result.stride(1), BLOCK=block, PART=part, GROUPS=heads // kv_heads,
        ROWS=triton.next_power_of_2(max(ROWS, heads // kv_heads)), DIM=dim, TILE=tile, SCALED=scaled,
        FLOAT_DOTS=INTERPRETED, ORDERED=ordered, MERGED=merged, KV_HEADS=kv_heads, num_warps=WARPS,
        num_stages=STAGES, **({} if REGISTERS is None else {"maxnreg": REGISTERS}))
    if not merged:
        grid = (slots, heads)
        (functools.partial(merge.warmup, grid=grid) if warm else merge[grid])(
            out, lse, result, parts, out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            result.stride(0), result.stride(1), PARTS=triton.next_power_of_2(parts), DIM=dim,
            CHUNK=min(MERGE_CHUNK, triton.next_power_of_2(parts)), num_warps=4)
    return result


def precompile(sizes: list[int], heads: int, dtype: torch.dtype, keys: torch.Tensor, values: torch.Tensor,
               table: torch.Tensor, positions: torch.Tensor, key_scales: torch.Tensor | None = None,
               value_scales: torch.Tensor | None = None, threads: int = 8) -> int:
    """Compile the kernels paged_decode launches at each of `sizes` slots (a decode step's graph sizes: one
    partition size each, ~0.5-1 s a compile), `threads` at a time, with the cache, table and positions the
    steps pass (their first `size` rows): the launches then find them compiled. Triton's AsyncCompileMode;
    without it (older Triton) or with threads < 1, nothing: the launches compile them one after another.
    Returns how many kernels it compiled."""
    with compiling(threads) as mode:
        for size in sizes if mode else ():  # the arguments as a step passes them: the same specialization
            query = torch.empty(size, heads, keys.shape[-1], dtype=dtype, device=keys.device)
            order = torch.empty(size, dtype=torch.int32, device=keys.device)  # as longest_first gives it
            _decode(query, keys, values, table[:size], positions[:size], 1.0, key_scales, value_scales, order,
                    warm=True)
        return len(getattr(mode, "future_kernels", ()))  # the compiles it asked for (Triton 3.6's name)


@contextlib.contextmanager
def compiling(threads: int):
    """Within it, the kernels a warm launch (_attend's warm) asks for compile `threads` at a time, and all are
    compiled when it ends (Triton's AsyncCompileMode; Triton releases the GIL while it compiles). Yields the
    mode, or None where Triton lacks it (older Triton, none) or threads < 1: then nothing is to be launched
    warm, and each kernel compiles at its first launch."""
    if triton is None or not hasattr(triton, "AsyncCompileMode") or threads < 1:
        yield None
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool, triton.AsyncCompileMode(pool) as mode:
        yield mode


@paged_decode.register_fake
def _(query, keys, values, table, positions, scale, key_scales=None, value_scales=None, order=None):
    return torch.empty_like(query)
