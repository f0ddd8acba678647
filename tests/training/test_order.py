"""Packed training batches: each step's sequences split into micro-batches of equal cost, on every rank."""

import math
import random

import numpy as np
import pytest
import torch

from stages.core import params
from stages.training import choices as train_choices
from stages.training import data as train_data
from stages.training import model as train_model
from stages.training.order import BalancedTrainer, PackedBalanceSampler, attention_weight
from tests.conftest import ROOT


def lengths(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(256, 4096) for _ in range(count)]


def sampler(sizes: list[int], processes: int, accumulation: int, rank: int = 0, epoch: int = 0, weight=0.0):
    balanced = PackedBalanceSampler(sizes, weight, effective_batch_size=16, dp_size=processes,
                                    grad_accum=accumulation, seed=7, rank=rank, drop_last=False)
    balanced.set_epoch(epoch)
    return balanced


@pytest.mark.parametrize(("processes", "accumulation"), [(1, 2), (2, 1), (2, 2), (4, 2)])
def test_every_step_trains_on_the_same_shuffled_sequences_split_into_micro_batches_of_equal_tokens(
        processes, accumulation):
    sizes = lengths(160)
    per_rank = [list(sampler(sizes, processes, accumulation, rank)) for rank in range(processes)]
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(7)).tolist()  # epoch 0's shuffle
    steps = len(sizes) // 16
    assert all(len(batches) == steps * accumulation for batches in per_rank)
    for step in range(steps):
        micro_batches = [batches[step * accumulation + slot] for batches in per_rank for slot in range(accumulation)]
        assert sorted(i for batch in micro_batches for i in batch) == sorted(order[step * 16:(step + 1) * 16])
        tokens = [sum(sizes[i] for i in batch) for batch in micro_batches]
        # longest first, each to the lightest micro-batch: no two differ by more than the longest sequence
        assert max(tokens) - min(tokens) <= max(sizes[i] for batch in micro_batches for i in batch)
        # and each rank's share of the step is within that of every other's
        shares = [sum(tokens[r * accumulation:(r + 1) * accumulation]) for r in range(processes)]
        assert max(shares) - min(shares) <= 4096


def test_balanced_micro_batches_are_far_closer_than_a_count_split():
    sizes = lengths(1600, seed=1)
    balanced = list(sampler(sizes, 2, 1, rank=0))
    other = list(sampler(sizes, 2, 1, rank=1))
    gaps = [abs(sum(sizes[i] for i in a) - sum(sizes[i] for i in b)) for a, b in zip(balanced, other, strict=True)]
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(7)).tolist()
    counted = [abs(sum(sizes[i] for i in order[s:s + 8]) - sum(sizes[i] for i in order[s + 8:s + 16]))
               for s in range(0, len(sizes), 16)]
    assert sum(gaps) / len(gaps) < sum(counted) / len(counted) / 5  # typically 3,000+ tokens apart by count


def test_each_epoch_reshuffles_and_attention_prices_long_sequences_higher():
    sizes = lengths(64)
    assert list(sampler(sizes, 1, 2, epoch=0)) != list(sampler(sizes, 1, 2, epoch=1))
    # one 4,096-token sequence against four of 1,024: equal tokens, four times the attention
    priced = PackedBalanceSampler([4096, 1024, 1024, 1024, 1024, 256], 1e-4, effective_batch_size=6, dp_size=2,
                                  grad_accum=1, seed=0, shuffle=False)
    tokens_only = PackedBalanceSampler([4096, 1024, 1024, 1024, 1024, 256], 0.0, effective_batch_size=6, dp_size=2,
                                       grad_accum=1, seed=0, shuffle=False)
    def groups(balanced):
        return sorted(sorted(group) for rank in balanced._assign(list(range(6)), balanced.lengths) for group in rank)

    assert groups(priced) == [[0], [1, 2, 3, 4, 5]]
    assert groups(tokens_only) == [[0, 5], [1, 2, 3, 4]]


def test_attention_weight_of_the_real_shape():
    from tests import random_model

    weight = attention_weight(random_model.config())
    assert weight == pytest.approx(28 * 1536 / 1_543_569_408)  # 28 layers x 1,536 wide / 1.54 B weights
    assert round(4096 + weight * 4096 ** 2) == 4563


def test_the_trainer_feeds_packed_micro_batches_of_equal_tokens(tokenizer, tiny_model_dir, tmp_path):
    config = params.load("train", ROOT / "params.yaml")
    model_params = params.ModelParams(name=str(tiny_model_dir), revision="main", max_seq_length=1024, directive="")
    model = train_model.load_peft(model_params, config, True)
    # a quarter long, the rest short: split by count, a step's two halves rarely get two long ones each
    rng = np.random.default_rng(0)
    sizes = [1024] * 24 + [32] * 72
    examples = train_data.Examples([rng.integers(10, 300, size, dtype=np.int32) for size in sizes], [8] * 96)
    args = train_choices.training_arguments(config, tmp_path / "unused", micro=8, seed=3, validate=False)
    trainer = BalancedTrainer(model=model, args=args, train_dataset=examples,
                              data_collator=train_data.collator(tokenizer, True), attention_weight=0.0)
    batches = [batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()]
    assert len(batches) == 12 and sum(batches) == sum(sizes)  # 96 rows, 16 a step, 2 micro-batches a step
    # longest first, each to the lighter half: never more than one sequence apart (a count split: up to 2,976)
    assert all(abs(first - second) <= 1024 for first, second in zip(batches[::2], batches[1::2], strict=True))


def test_a_balanced_step_learns_what_a_count_split_step_learns(tokenizer, tiny_model_dir, tmp_path):
    """The loss is normalized by the step's label tokens, not per micro-batch, so regrouping a step's sequences
    changes neither the loss nor the gradient."""
    from transformers import set_seed

    config = params.load("train", ROOT / "params.yaml")
    model_params = params.ModelParams(name=str(tiny_model_dir), revision="main", max_seq_length=1024, directive="")
    rng = np.random.default_rng(1)
    sizes = [900, 700, 600, 800, 25, 40, 35, 50, 20, 45, 20, 30, 30, 60, 25, 35]  # in order: the long ones first
    examples = train_data.Examples([rng.integers(10, 300, size, dtype=np.int32) for size in sizes], [8] * 16)
    logged = {}
    for strategy in ("sequential", "batch_rebalance"):
        set_seed(3)
        model = train_model.load_peft(model_params, config, True)
        args = train_choices.training_arguments(config, tmp_path / strategy, micro=8, seed=3, validate=False)
        args.max_steps, args.save_strategy, args.train_sampling_strategy = 1, "no", strategy
        trainer = BalancedTrainer(model=model, args=args, train_dataset=examples, attention_weight=0.0,
                                  data_collator=train_data.collator(tokenizer, True))
        batches = [batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()]
        trainer.train()
        logged[strategy] = batches, trainer.state.log_history[0]
    (count_split, counted), (balanced_split, balanced) = logged["sequential"], logged["batch_rebalance"]
    assert count_split == [3150, 265] and max(balanced_split) - min(balanced_split) < 900
    assert balanced["loss"] == pytest.approx(counted["loss"], rel=1e-5)
    assert balanced["grad_norm"] == pytest.approx(counted["grad_norm"], rel=1e-4)


def two_step_trainer(tokenizer, model_dir, out) -> BalancedTrainer:
    """The stage's Trainer on 48 random packed rows of 20-400 tokens: 2 steps of 4 micro-batches of 4."""
    config = params.load("train", ROOT / "params.yaml")
    model_params = params.ModelParams(name=str(model_dir), revision="main", max_seq_length=1024, directive="")
    rng = np.random.default_rng(2)
    sizes = [int(n) for n in rng.integers(20, 400, 48)]
    examples = train_data.Examples([rng.integers(10, 300, size, dtype=np.int32) for size in sizes], [8] * 48)
    args = train_choices.training_arguments(config, out, micro=4, seed=3, validate=False)
    args.max_steps, args.save_strategy = 2, "no"
    return BalancedTrainer(model=train_model.load_peft(model_params, config, True), args=args,
                           train_dataset=examples, data_collator=train_data.collator(tokenizer, True),
                           attention_weight=0.0)


def test_packed_runs_count_their_tokens_without_a_trip_to_the_device_per_micro_batch(tokenizer, tiny_model_dir,
                                                                                     tmp_path, monkeypatch):
    trainer = two_step_trainer(tokenizer, tiny_model_dir, tmp_path)
    trained = [batch["input_ids"].numel() for batch in trainer.get_train_dataloader()][:8]  # 2 steps of 4 x 4
    gathers = []
    monkeypatch.setattr(trainer.accelerator, "gather", lambda tensor: gathers.append(tensor) or tensor)
    trainer.train()
    assert trainer.state.num_input_tokens_seen == sum(trained)
    assert [entry["num_input_tokens_seen"] for entry in trainer.state.log_history if "loss" in entry] == [
        sum(trained[:4]), sum(trained)]  # each step's count is in before it is logged
    assert not gathers


def test_a_nan_loss_is_logged_as_nan_not_hidden(tokenizer, tiny_model_dir, tmp_path):
    """transformers' default replaces a NaN or infinite loss in the logs by the mean of the last ones, and to
    check for it waits for the GPU after every micro-batch; the stage logs what the loss was."""
    trainer = two_step_trainer(tokenizer, tiny_model_dir, tmp_path)
    compute_loss, calls = trainer.compute_loss, []

    def nan_in_the_second_step(*args, **kwargs):
        calls.append(1)
        loss = compute_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    trainer.compute_loss = nan_in_the_second_step
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and not math.isnan(losses[0]) and math.isnan(losses[1])
