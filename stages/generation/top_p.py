"""Top-p sampling on a GPU without sorting the vocabulary: Triton kernels that find where the kept tokens
begin by their probability mass, then draw among them in one pass.

The kept set is transformers' TopPLogitsWarper's: the tokens in ascending order of probability are cut
while their cumulative probability stays at or below 1 - top_p. It is found as a 16-bit threshold on the
logits' order-preserving bf16 keys, four bits a pass: each pass sums the probability below 16 candidate
thresholds in every chunk of the vocabulary. The first pass also keeps each tile's highest key; later passes
and the draw skip the tiles wholly below the range they look at. A language model's logits are peaked: at
temperature 0.6 and top-p 0.95 the kept tokens are a few, and nearly every tile lies below the cut, so past
the first pass nearly nothing is read. Tokens of equal logits have equal probability; where such a
group straddles the cut, the sort would keep an unspecified part of it (torch.sort does not order ties).
Here each of its n tokens keeps the share (n - c) / n of its probability, c being the number the cut takes:
the probability of each token that a sort with its ties in random order gives, and the same kept mass.

The draw is an exponential race (argmax of weight / E, E exponential: exact sampling in proportion to the
weights), one E per token hashed from the row's sampling number and the token id, so a token
depends on the row's key and position only, not on the batch.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from stages.core.cli import cause

log = logging.getLogger(__name__)

CHUNK = 8192  # vocabulary entries a program reads (a multiple of TILE)
TILE = 256
THRESHOLDS = 16  # candidate thresholds a pass: 4 bits of the 16-bit key


try:  # CUDA builds of torch bring Triton; CPU tests run these kernels in its interpreter (TRITON_INTERPRET=1)
    import triton
    import triton.language as tl
except ImportError:
    triton = None
else:
    @triton.jit
    def order_key(x):
        """bf16 -> its 16-bit key, ascending as the values are."""
        bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return tl.where((bits & 0x8000) != 0, (~bits) & 0xFFFF, bits | 0x8000)

    @triton.jit(do_not_specialize=["row_stride"])  # a load of one token per thread, as the thresholds take it
    def masses(logits, row_stride, vocab, lows, step, maxes, part_mass, part_count, tile_keys, scale,
               CHUNKS: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr, COUNT: tl.constexpr,
               FIRST: tl.constexpr, GROUPS: tl.constexpr):
        """Per (row, chunk): the probability mass (relative to the row's max) of the tokens whose key is at or
        above low and below each of COUNT thresholds low + (i + 1) * step; GROUPS (the last pass, step 1):
        also how many tokens have each key low + i. FIRST (low 0): writes each tile's highest key to
        tile_keys; later passes skip the tiles whose highest key is below low. Each thread meets all
        thresholds with its own tokens, in registers, and the threads are summed once, at the end."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        offsets = tl.arange(0, COUNT)
        low = tl.load(lows + row)
        thresholds = low + (offsets + 1) * step
        best = tl.load(maxes + row)
        source = logits + row.to(tl.int64) * row_stride  # rows x vocab can pass 2**31
        tiles = tile_keys + row * (CHUNKS * CHUNK // TILE)
        mass = tl.zeros([COUNT, TILE], tl.float32)  # thresholds down, tokens across
        count = tl.zeros([COUNT, TILE], tl.int32)
        for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, vocab), TILE):
            if FIRST or tl.load(tiles + start // TILE) >= low:
                index = start + tl.arange(0, TILE)
                valid = index < vocab
                x = tl.load(source + index, mask=valid, other=float("-inf"))
                weight = tl.exp2((x.to(tl.float32) - best) * scale)  # 0 where not valid
                key = tl.where(valid, order_key(x), -1)
                if FIRST:
                    tl.store(tiles + start // TILE, tl.max(key, 0))
                else:
                    weight = tl.where(key >= low, weight, 0.0)
                mass += tl.where(thresholds[:, None] > key[None, :], weight[None, :], 0.0)
                if GROUPS:
                    count += ((low + offsets)[:, None] == key[None, :]).to(tl.int32)
        at = (row * CHUNKS + chunk) * COUNT + offsets
        tl.store(part_mass + at, tl.sum(mass, 1))
        if GROUPS:
            tl.store(part_count + at, tl.sum(count, 1))

    @triton.jit
    def lowbias32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def draw(logits, row_stride, vocab, maxes, bounds, shares, seeds, part_score, part_index, tile_keys, scale,
             CHUNKS: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr, SKIP: tl.constexpr):
        """Per (row, chunk): the token that wins the exponential race among the kept tokens, and its score.
        SKIP: tile_keys holds each tile's highest key; the tiles wholly below the kept ones are not read."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        best = tl.load(maxes + row)
        bound = tl.load(bounds + row)
        share = tl.load(shares + row)
        seed = tl.load(seeds + row).to(tl.uint32)
        source = logits + row.to(tl.int64) * row_stride
        top = tl.zeros([TILE], tl.float32)  # each lane's best score so far, and its token
        winner = tl.zeros([TILE], tl.int32)
        tiles = tile_keys + row * (CHUNKS * CHUNK // TILE)
        for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, vocab), TILE):
            if not SKIP or tl.load(tiles + start // TILE) >= bound:
                index = start + tl.arange(0, TILE)
                x = tl.load(source + index, mask=index < vocab, other=float("-inf"))
                key = order_key(x)
                weight = tl.exp2((x.to(tl.float32) - best) * scale)  # 0 where not valid
                weight = tl.where(key > bound, weight, tl.where(key == bound, weight * share, 0.0))
                hashed = lowbias32(seed ^ lowbias32(index.to(tl.uint32) * 0x9E3779B9 + 0x85EBCA6B))
                # in (0, 1], exact near 0 where exponential = -log(1 - uniform) is small and decides the race
                uniform = hashed.to(tl.float32) * (1.0 / 4294967296.0) + (0.5 / 4294967296.0)
                # -log(1 - u): its series where 1 - u would lose u's digits (error below 2e-11 of it)
                series = uniform * (1.0 + uniform * (0.5 + uniform * (1.0 / 3.0 + uniform * (0.25 + uniform * 0.2))))
                exponential = tl.where(uniform < 0.01, series, -tl.log(1.0 - uniform))
                score = tl.fdiv(weight, exponential)  # > 0 for the kept tokens, 0 for the others
                better = score > top
                winner = tl.where(better, index, winner)
                top = tl.where(better, score, top)
        lane = tl.argmax(top, 0)
        tl.store(part_score + row * CHUNKS + chunk, tl.max(top, 0))
        tl.store(part_index + row * CHUNKS + chunk, tl.sum(tl.where(tl.arange(0, TILE) == lane, winner, 0), 0))


def available(device: torch.device, dtype: torch.dtype, vocab: int) -> bool:
    """The kernels run here, and right: a CUDA GPU, a bf16 model (their keys are bf16 logits), and on a few
    rows of `vocab` logits (the model's) they keep and draw what the sorted reference keeps (checked once per
    process and vocabulary)."""
    if device.type != "cuda" or dtype != torch.bfloat16 or triton is None:
        return False
    return verified(device, vocab)


@functools.cache
def verified(device: torch.device, vocab: int) -> bool:
    """The kernels against the sorted reference (kept_shares) on two rows of `vocab` logits, one of ties that
    straddle the cut, one random: the same share of each token kept, and draws only of kept tokens; False, and
    a warning, if they fail or differ. At the model's vocabulary the kernels it compiles are the ones its
    decode steps launch (their chunk count is compiled in), so a fresh machine compiles them once, not twice."""
    try:
        temperature, top_p = 0.6, 0.8
        logits = torch.full((2, max(vocab, 11)), -30.0)
        logits[0, :11] = torch.tensor([5.0, 5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 0.5])
        logits[1] = torch.randn(logits.shape[1], generator=torch.Generator().manual_seed(0))
        logits = logits.bfloat16()
        expected = kept_shares(logits.float(), temperature, top_p)
        _, bounds, shares, _ = _cut(logits.to(device), math.log2(math.e) / temperature, top_p)
        error = (cut_shares(logits, temperature, bounds, shares) - expected).abs().max().item()
        if not error < 1e-4:
            raise ArithmeticError(f"they differ from the sorted reference: the shares kept, by {error:.3g}")
        rows = logits[[0] * 8 + [1] * 8].to(device)
        drawn = top_p_sample(rows, torch.arange(16, device=device) * 2654435761 % 2**32, temperature, top_p)
        outside = (expected[[0] * 8 + [1] * 8].gather(1, drawn.cpu()[:, None]) == 0).sum().item()
        if outside:
            raise ArithmeticError(f"they differ from the sorted reference: {outside} of 16 draws outside the kept "
                                  "tokens")
        return True
    except Exception as e:  # no Triton, they cannot compile for this GPU, or they are wrong here: the sort serves
        log.warning("sampling by sorting the vocabulary: the Triton top-p kernels do not run right here (%s)", cause(e))
        return False


def _cut(logits: torch.Tensor, scale: float, top_p: float) -> tuple[torch.Tensor, ...]:
    """Per row: the max logit, the key of the group where the kept tokens begin, the share of its tokens'
    probability that group keeps, and each tile's highest key [rows, tiles] (for the draw)."""
    rows, vocab = logits.shape
    chunks = -(-vocab // CHUNK)
    device = logits.device
    tile_keys = torch.empty(rows, chunks * CHUNK // TILE, dtype=torch.int32, device=device)
    lows = torch.zeros(rows, dtype=torch.int32, device=device)
    part_mass = torch.empty(rows, chunks, THRESHOLDS, dtype=torch.float32, device=device)
    part_count = torch.empty(rows, chunks, THRESHOLDS, dtype=torch.int32, device=device)
    maxes = logits.amax(1).float()
    below_mass = torch.zeros(rows, dtype=torch.float32, device=device)  # the mass of the keys below lows
    target = None
    for step in (4096, 256, 16, 1):
        masses[(rows, chunks)](logits, logits.stride(0), vocab, lows, step, maxes, part_mass, part_count, tile_keys,
                               scale, CHUNKS=chunks, CHUNK=CHUNK, TILE=TILE, COUNT=THRESHOLDS, FIRST=step == 4096,
                               GROUPS=step == 1, num_warps=4)
        mass = below_mass[:, None] + part_mass.sum(1)  # below each threshold
        if target is None:  # the first pass's last threshold is above every key: its mass is the total
            target = (1 - top_p) * mass[:, -1]  # the mass the cut may take
        # the first threshold whose mass below exceeds the target ends the range the cut ends in
        at = (mass <= target[:, None]).sum(1).clamp(max=THRESHOLDS - 1)
        below_mass = torch.where(at > 0, mass.gather(1, (at - 1).clamp(min=0)[:, None])[:, 0], below_mass)
        lows = lows + at.to(torch.int32) * step
    # the last pass's thresholds were one key apart: the group of key `lows` is the one the cut ends in
    members = part_count.sum(1).gather(1, at[:, None])[:, 0].clamp(min=1).float()
    each = (mass.gather(1, at[:, None])[:, 0] - below_mass) / members  # one token's weight in the group
    cut = ((target - below_mass) / each).floor().clamp(min=0).minimum(members - 1)
    return maxes, lows, (members - cut) / members, tile_keys


@torch.library.custom_op("r1_math_lora::top_p_sample", mutates_args=())
def top_p_sample(logits: torch.Tensor, seeds: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits [rows, vocab] (bf16) and one 32-bit number per row -> one token per row, drawn from
    softmax(logits / temperature) cut to top_p."""
    rows, vocab = logits.shape
    logits = logits.to(torch.bfloat16)
    scale = math.log2(math.e) / temperature
    if top_p < 1:
        maxes, bounds, shares, tile_keys = _cut(logits, scale, top_p)
    else:  # every token kept: no tile to skip
        maxes = logits.amax(1).float()
        bounds = torch.zeros(rows, dtype=torch.int32, device=logits.device)
        shares = torch.ones(rows, dtype=torch.float32, device=logits.device)
        tile_keys = bounds
    chunks = -(-vocab // CHUNK)
    part_score = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    part_index = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    draw[(rows, chunks)](logits, logits.stride(0), vocab, maxes, bounds, shares, seeds, part_score, part_index,
                         tile_keys, scale, CHUNKS=chunks, CHUNK=CHUNK, TILE=TILE, SKIP=top_p < 1, num_warps=4)
    return part_index.gather(1, part_score.argmax(1, keepdim=True))[:, 0].long()


@top_p_sample.register_fake
def _(logits, seeds, temperature, top_p):
    return logits.new_empty(logits.shape[0], dtype=torch.long)


def cut_shares(logits: torch.Tensor, temperature: float, bounds: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """What a cut found by the kernels (_cut's bounds and shares) gives each token: its probability of being
    drawn [rows, vocab], in float64 on the CPU, to compare with kept_shares."""
    bits = logits.cpu().view(torch.int16).int() & 0xFFFF
    keys = torch.where(bits & 0x8000 != 0, ~bits & 0xFFFF, bits | 0x8000)  # as the kernels' order_key
    bounds, shares = bounds.cpu()[:, None], shares.cpu()[:, None].double()
    weights = (logits.cpu().double() / temperature).softmax(-1) * torch.where(
        keys > bounds, 1.0, torch.where(keys == bounds, shares, 0.0))
    return weights / weights.sum(-1, keepdim=True)


def kept_shares(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The reference the kernels are tested against, by sorting (float64): each token's probability of being
    drawn [rows, vocab], ties at the cut sharing the mass the cut leaves them."""
    probs = (logits.double() / temperature).softmax(-1)
    ascending, order = probs.sort(-1)
    cumulative = ascending.cumsum(-1)
    result = torch.zeros_like(probs)
    for row in range(probs.shape[0]):
        values = ascending[row]
        kept = cumulative[row] > 1 - top_p  # transformers: cut while the cumulative stays <= 1 - top_p
        kept[-1] = True
        first = int(kept.nonzero()[0])
        weights = torch.where(kept, values, 0.0)
        group = logits[row, order[row]] == logits[row, order[row, first]]  # the tied tokens around the cut
        if group.sum() > 1:
            share = kept[group].double().mean()
            weights[group] = values[group] * share
        result[row, order[row]] = weights / weights.sum()
    return result
