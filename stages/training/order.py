"""The order of packed training examples: each optimizer step's sequences (a seeded shuffle per epoch, as
before) are split into its micro-batches so that every micro-batch, on every GPU, costs about the same.

With a fixed count of sequences per micro-batch, lengths of 256 to 4,096 tokens make one GPU's share of a
step often 10-20% more tokens than another's, and every DDP step waits for the slowest GPU. Here a packed
micro-batch's cost is its tokens plus attention's square term, each micro-batch takes the next-longest
sequence while it is the cheapest (longest-processing-time first), and the number of sequences per
micro-batch varies. Each step still trains on the same sequences, and transformers normalizes the loss by the
step's label tokens, so what is learned does not change. The Trainer of these runs (BalancedTrainer) also
counts their tokens on the host, once a step (StepTokenCount), not with a wait for the GPU per micro-batch.

Imports transformers: import it after Unsloth (stages/train.py does).
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import BatchRebalanceSampler


def attention_weight(model_config) -> float:
    """Attention's cost per squared sequence length, in tokens of the layers' cost: causal attention spends
    4 x width FLOPs a layer on each of the L^2 / 2 (query, key) pairs, and every weight 2 FLOPs a token
    (forward; the backward scales both alike). 2.8e-5 for the 1.5B shape: a 4,096-token sequence costs
    4,563 tokens' worth."""
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    head_dim = getattr(model_config, "head_dim", None) or hidden // model_config.num_attention_heads
    query_width = model_config.num_attention_heads * head_dim
    kv_width = model_config.num_key_value_heads * head_dim
    per_layer = 2 * hidden * query_width + 2 * hidden * kv_width + 3 * hidden * model_config.intermediate_size
    weights = layers * per_layer + model_config.vocab_size * hidden  # the output head; embeddings are lookups
    return layers * query_width / weights


class PackedBalanceSampler(BatchRebalanceSampler):
    """transformers' step-wise rebalancing sampler (same shuffle, same sequences per step, every rank computing
    the same split without communication) with packed micro-batches' cost: tokens + weight x length^2 per
    sequence, where the parent prices padded ones (count x longest)."""

    def __init__(self, lengths: list[int], attention_weight: float, **kwargs):
        super().__init__(lengths, **kwargs)
        self.attention_weight = attention_weight

    def cost(self, length: int) -> float:
        return length + self.attention_weight * length * length

    def _assign(self, indices: list[int], lengths: list[int]) -> list[list[list[int]]]:
        """rank -> accumulation slot -> indices. Longest first, each to the cheapest micro-batch so far; then
        the costliest micro-batches go to the first slot, one per rank, the next to the second, and so on."""
        count = self.dp_size * self.grad_accum
        groups: list[list[int]] = [[] for _ in range(count)]
        costs = [0.0] * count
        for index, length in sorted(zip(indices, lengths, strict=True), key=lambda pair: -pair[1]):
            cheapest = min(range(count), key=costs.__getitem__)
            groups[cheapest].append(index)
            costs[cheapest] += self.cost(length)
        ranked = sorted(range(count), key=lambda g: -costs[g])
        return [[groups[ranked[slot * self.dp_size + rank]] for slot in range(self.grad_accum)]
                for rank in range(self.dp_size)]


class StepTokenCount(TrainerCallback):
    """The input tokens of a step's micro-batches, counted on the host (`pending`), added to the Trainer state
    once the step's optimizer has stepped: summed over the processes by one all-reduce a step when there are
    several, by nothing when alone."""

    def __init__(self):
        self.pending = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.add_pending(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.add_pending(args, state)

    def add_pending(self, args, state) -> None:
        count = self.pending
        if args.world_size > 1:
            total = torch.tensor(count, device=args.device, dtype=torch.int64)
            torch.distributed.all_reduce(total)
            count = int(total.item())
        state.num_input_tokens_seen += count
        self.pending = 0


class BalancedTrainer(Trainer):
    """A Trainer whose packed training batches come from PackedBalanceSampler (training arguments with
    train_sampling_strategy 'batch_rebalance', which stages.training.choices sets for packed runs), and whose
    packed runs count their input tokens without waiting for the GPU (StepTokenCount)."""

    def __init__(self, *args, attention_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.attention_weight = attention_weight
        self.token_count = StepTokenCount()
        self.add_callback(self.token_count)

    def _track_num_input_tokens(self, inputs):
        """Packed runs count every token (include_num_input_tokens_seen 'all'), a size this process knows:
        transformers would copy each micro-batch's count to the GPU, gather it over the processes and read the
        sum back, a wait for the GPU in the middle of every step (the next kernels cannot queue behind it)."""
        if self.args.include_num_input_tokens_seen != "all":
            return super()._track_num_input_tokens(inputs)
        self.token_count.pending += inputs[getattr(self.model, "main_input_name", "input_ids")].numel()

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "batch_rebalance" or not hasattr(dataset, "ids"):
            return super()._get_train_sampler(train_dataset)
        world = max(1, self.args.world_size)
        accumulation = self.args.gradient_accumulation_steps
        return PackedBalanceSampler(
            [len(ids) for ids in dataset.ids], self.attention_weight,
            effective_batch_size=self.args.train_batch_size * accumulation * world, dp_size=world,
            grad_accum=accumulation, seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            rank=self.args.process_index if world > 1 else 0, drop_last=self.args.dataloader_drop_last)
