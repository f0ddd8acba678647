"""The decode step's Triton kernels (stages.generation.paged_attention, stages.generation.top_p), checked in
Triton's interpreter on a CPU (tests/conftest.py sets TRITON_INTERPRET=1 there): small cases, each kernel
program run as NumPy. The GPU's own runs are in tests/generation/test_batched_gpu.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from stages.generation import continuous, paged_attention, top_p  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# (block, programs): (tokens a partition, keys a tile) in bf16, in 8-bit. 48: a block ends inside a tile (8-bit:
# 64, a tile's tokens past the slot's read unmasked, weighed 0); 4096 programs, the smallest partitions (of
# 256-token blocks: half a block); 20, two blocks merged by log-sum-exps (8-bit: 128-key tiles where a block
# holds them); 512-token blocks at 64 programs, partitions across blocks (8-bit: three 128-key tiles); at 32,
# where one block would give the programs wanted, two
SHAPES = {(48, 4096): ((48, 64), (64, 64)), (48, 20): ((96, 64), (128, 64)), (256, 4096): ((128, 64), (128, 64)),
          (256, 20): ((512, 64), (512, 128)), (512, 64): ((320, 64), (384, 128)),
          (512, 32): ((1024, 64), (1024, 128))}


# the decode step's order (longest first) or the slots' own; a slot's partitions merged by its last program (the
# stage's) or by the merge kernel
@pytest.mark.parametrize(("ordered", "merged"), [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("eight_bit", [False, True])  # eval.kv_cache: model, fp8
@pytest.mark.parametrize(("block", "programs"), SHAPES)
def test_the_decode_kernel_attends_over_each_slots_scattered_blocks_up_to_its_position(programs, block, eight_bit,
                                                                                      ordered, merged, monkeypatch):
    """Against masked SDPA over the cache as it holds keys and values (8-bit: times their scales, the values
    transposed, blocks of a multiple of the kernel's tile); its programs in the slots' order or longest first."""
    monkeypatch.setattr(paged_attention, "PROGRAMS", programs)
    monkeypatch.setattr(paged_attention, "MERGED_PARTS", 1000 if merged else 0)
    monkeypatch.setattr(paged_attention, "MERGE_CHUNK", 2)  # the merge sums partitions' results in chunks
    torch.manual_seed(0)
    shape = SHAPES[block, programs][eight_bit]
    block = 64 if eight_bit and block % paged_attention.TILE else block
    slots, per_slot, kv_heads, heads, head_dim = 5, 4, 2, 12, 16
    # each row of its own magnitude: an 8-bit row's scale must be its own
    keys, values = (torch.randn(1 + slots * per_slot, block, kv_heads, head_dim, device=DEVICE).bfloat16()
                    * torch.rand(1 + slots * per_slot, block, kv_heads, 1, device=DEVICE).bfloat16() * 4
                    for _ in range(2))
    scales = None
    if eight_bit:
        (keys, key_scales), (values, value_scales) = paged_attention.quantize(keys), paged_attention.quantize(values)
        values, scales = paged_attention.value_layout(values), (key_scales, value_scales)
    table = (torch.randperm(slots * per_slot, device=DEVICE) + 1).view(slots, per_slot)
    query = torch.randn(slots, heads, 1, head_dim, device=DEVICE).bfloat16()
    # the first token, a block's last, the next one's first, all, one inside a tile
    positions = torch.tensor([0, block - 1, block, block * per_slot - 1, 100], device=DEVICE)
    assert paged_attention.launch_shape(slots, kv_heads, per_slot, block, eight_bit) == shape
    order = paged_attention.longest_first(positions) if ordered else None
    if ordered:  # a permutation other than the slots' own
        assert sorted(order.tolist()) == list(range(slots)) != order.tolist()
        assert (positions[order].diff() <= 0).all()
    kernel = continuous.DecodeStep(positions, table, "triton", scales, order).attend(query, keys, values,
                                                                                     head_dim ** -0.5)
    masked = continuous.DecodeStep(positions, table, "sdpa", scales).attend(query.float(), keys, values,
                                                                            head_dim ** -0.5)
    torch.testing.assert_close(kernel.float(), masked, atol=2e-2, rtol=2e-2)  # bf16's rounding of the output


def test_eight_bit_keeps_each_row_to_its_own_scale_within_e4m3s_rounding():
    rows = torch.randn(64, 128, dtype=torch.float64) * torch.logspace(-6, 6, 64, dtype=torch.float64)[:, None]
    stored, scale = paged_attention.quantize(rows.bfloat16())
    assert stored.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = paged_attention.dequantize(stored, scale, torch.float64)
    largest = rows.abs().amax(1, keepdim=True)
    # e4m3: 3 mantissa bits (a relative step of 1/8, so half of it), bf16's rounding before; the smallest
    # magnitudes of a row fall to e4m3's subnormals, steps of 2^-9 of its unit, 448 units to the row's largest
    assert ((back - rows).abs() <= rows.abs() / 16 + rows.abs() / 128 + largest / 448 * 2 ** -10).all()


def cases() -> torch.Tensor:
    """Rows of logits: a group of ties straddling the cut, distinct peaked values, and rows spanning several
    of the kernels' chunks of the vocabulary (flat: most tokens kept; peaked: a few); the last, ties
    straddling the cut in tiles whose highest key is theirs (tiles the later passes must not skip)."""
    generator = torch.Generator().manual_seed(0)
    vocab = 2 * top_p.CHUNK + 300  # the last chunk partly filled
    rows = torch.full((5, vocab), -30.0)
    rows[0, :11] = torch.tensor([5.0, 5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 0.5])
    rows[1, -50:] = torch.randn(50, generator=generator) * 3
    rows[2] = torch.randn(vocab, generator=generator) * 0.5
    rows[3] = torch.randn(vocab, generator=generator) * 4
    tile = top_p.TILE
    rows[4, [0, 1, tile + 5, tile + 6, 2 * tile + 7, 3 * tile]] = 4.0
    rows[4, 3 * tile + 1] = 5.0
    return rows.bfloat16()


def test_the_top_p_cut_keeps_what_the_sort_keeps_and_splits_a_tied_group_by_its_share(monkeypatch):
    monkeypatch.setattr(top_p, "CHUNK", 2 * top_p.TILE)  # chunks of 512 (8,192 on a GPU): a faster interpreter
    logits = cases()
    temperature, p = 0.6, 0.8
    scale = 1.4426950408889634 / temperature
    maxes, bounds, shares, _ = top_p._cut(logits.to(DEVICE), scale, p)
    expected = top_p.kept_shares(logits.float(), temperature, p)
    assert 0 < shares[0] < 1 and 0 < shares[4] < 1  # the tied 4.0s are cut in part
    torch.testing.assert_close(top_p.cut_shares(logits, temperature, bounds, shares), expected, atol=1e-6, rtol=1e-4)
    # the draw reads the tiles whose highest key is the cut's too: the last row's ties there are drawn (each ~7%)
    rows = logits[4:].expand(24, -1).contiguous().to(DEVICE)
    drawn = top_p.top_p_sample(rows, torch.arange(24, device=DEVICE) * 2654435761 % 2**32, temperature, p).cpu()
    assert (expected[4, drawn] > 0).all() and (drawn < 3 * top_p.TILE).any()


def test_top_p_draws_only_kept_tokens_and_a_row_draws_the_same_in_any_batch():
    logits = torch.tensor([[5.0, 5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 0.5]]).bfloat16().expand(24, -1)
    logits = logits.contiguous().to(DEVICE)
    hashes = continuous.sampling_hashes(torch.arange(24), torch.full((24,), 3)).to(DEVICE)
    drawn = top_p.top_p_sample(logits, hashes, 0.6, 0.95).cpu()
    kept = top_p.kept_shares(logits[:1].float().cpu(), 0.6, 0.95)[0] > 0
    assert kept[:8].all() and not kept[8:].any() and kept[drawn].all()
    assert set(drawn.tolist()) >= {0, 1}  # each ~32%, so in 24 draws (fixed hashes: not flaky)
    assert torch.equal(top_p.top_p_sample(logits[5:9], hashes[5:9], 0.6, 0.95).cpu(), drawn[5:9])


def test_the_kernels_are_used_only_where_they_match_their_references_on_a_small_case(monkeypatch, caplog):
    """available() runs each kernel once against its reference (plain attention; the sorted top-p) and
    refuses it, saying why, where it differs: a Triton build or GPU that computes wrong falls back, not on."""
    monkeypatch.setattr(top_p, "CHUNK", 2 * top_p.TILE)
    device = torch.device(DEVICE)
    assert paged_attention.verified.__wrapped__(device, torch.bfloat16, 16)
    assert paged_attention.verified.__wrapped__(device, torch.bfloat16, 16, eight_bit=True)
    assert top_p.verified.__wrapped__(device, 2 * top_p.CHUNK + 300)  # over three chunks
    monkeypatch.setattr(paged_attention, "_attend", lambda query, *args: torch.zeros_like(query))
    assert not paged_attention.verified.__wrapped__(device, torch.bfloat16, 16)
    assert "differs from plain attention" in caplog.text
    cut = top_p._cut

    def ties_all_kept(*args):
        maxes, bounds, _, tiles = cut(*args)
        return maxes, bounds, torch.ones(2, device=device), tiles

    monkeypatch.setattr(top_p, "_cut", ties_all_kept)
    assert not top_p.verified.__wrapped__(device, 2 * top_p.CHUNK + 300)
    assert "differ from the sorted reference" in caplog.text


def test_the_kernel_code_benchmark_compiles_the_decode_steps_attention_kernel():
    """bench.kernel_code compiles the stage's attention kernel for an H100 (sm_90) as the step launches it, its
    arguments kept in step with the kernel's, and counts the loop with the tensor-core products (not the
    in-place merge's). In a process of its own: here the kernels are interpreted (TRITON_INTERPRET=1)."""
    code = "import json, bench.kernel_code as k; print(json.dumps(k.measure_attention(True, 128)))"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.splitlines()[-1])
    assert row["sass_loop_per_tile"]["tensor_core"] > 0 and row["byte_loads_per_tile"] == 0
    assert row["loop_instructions_per_tile"] > 2 * row["tile"]  # the main loop (hundreds), not the merge's (dozens)
