"""How eval.num_gpus splits generation: the shares, their merge, and the processes and GPUs it resolves to.
The stage run with several worker processes is in tests/test_evaluate.py."""

import json
import subprocess
import sys

import pytest
import torch

from stages.generation import workers as eval_workers


@pytest.mark.parametrize(("items", "processes"), [(7, 3), (8, 2), (1, 2), (0, 4), (5, 1)])
def test_shares_differ_by_one_item_at_most_and_merge_back_in_order(items, processes):
    prompts = [f"prompt {i}" for i in range(items)]
    shares = [eval_workers.share(prompts, k, processes) for k in range(processes)]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert sorted(p for part in shares for p in part) == sorted(prompts)
    assert eval_workers.merge(shares) == prompts


@pytest.mark.parametrize(("quantization", "kept"), [(None, []), ("bitsandbytes", ["bitsandbytes"]),
                                                      ("torchao", ["torchao"]), ("fp8", [])])
def test_a_worker_goes_without_sklearn_and_the_quantization_libraries_its_model_does_not_use(tmp_path, quantization,
                                                                                              kept):
    config = {"model_type": "qwen2"} | ({"quantization_config": {"quant_method": quantization}} if quantization else {})
    (tmp_path / "config.json").write_text(json.dumps(config))
    skipped = eval_workers.unused_imports(tmp_path)
    assert "sklearn" in skipped
    assert sorted(set(eval_workers.UNUSED_IMPORTS) - set(skipped)) == kept


def test_skipped_imports_look_absent_to_the_process():
    # wave: installed (the standard library), and nothing here imports it; a fresh interpreter, so this one's
    # modules stay as they are
    probe = ("import importlib.util\nfrom stages.generation.workers import skip_imports\nskip_imports(['wave'])\n"
             "print(importlib.util.find_spec('wave'))\ntry:\n    import wave\nexcept ImportError:\n"
             "    print('ImportError')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "ImportError"]


@pytest.fixture
def cuda_gpus(monkeypatch):
    """Fake a CUDA machine with this many visible GPUs."""
    def fake(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    return fake


def test_auto_is_every_visible_gpu_and_one_process_without_cuda(cuda_gpus):
    cuda_gpus(4)
    assert eval_workers.process_count("auto") == 4
    cuda_gpus(0)
    assert eval_workers.process_count("auto") == 1


def test_more_gpus_than_visible_is_one_line_naming_the_param_and_the_count(cuda_gpus):
    cuda_gpus(2)
    assert eval_workers.process_count(2) == 2
    with pytest.raises(eval_workers.WorkerError, match=r"^evaluate: eval\.num_gpus is 3, but 2 CUDA GPU\(s\) are "
                                                       r"visible here; [^\n]*$"):
        eval_workers.process_count(3)


def test_an_explicit_count_without_cuda_is_that_many_cpu_processes(cuda_gpus):
    cuda_gpus(0)
    assert eval_workers.process_count(3) == 3
    assert eval_workers.worker_gpus(3) == [None, None, None]


def test_each_worker_sees_its_own_gpu_of_those_this_process_sees(cuda_gpus, monkeypatch):
    cuda_gpus(4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert eval_workers.worker_gpus(2) == ["0", "1"]
    cuda_gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert eval_workers.worker_gpus(2) == ["3", "5"]


def test_two_workers_sample_what_one_process_samples_and_forced_ends_reach_every_worker(tiny_model_dir, tokenizer,
                                                                                       tmp_path):
    import dataclasses
    from pathlib import Path

    from stages.core import params
    from stages.generation import batched as generation

    config = dataclasses.replace(params.load("eval", Path(__file__).parents[2] / "params.yaml"), temperature=0.6,
                                 top_p=0.95, max_new_tokens=12, batch_size=4, batching="continuous")
    model_params = params.ModelParams(str(tiny_model_dir), "main", 1024, "")
    prompts = [f"What is {i} times {i + 1}?" for i in range(5)] * 3  # three samples of each: odd counts per worker
    end_at = [1 + (3 * i) % 13 for i in range(len(prompts))]  # 13: some beyond the budget, never forced
    job = eval_workers.Job("sampled", prompts, tmp_path / "out.parquet", end_at)
    eval_workers.generate_sharded([eval_workers.Phase("base", None, [job])], model_params, config, 4, processes=2)
    model = generation.load_model(model_params, None)
    sharded = eval_workers.read_generations(job.out)
    assert sharded == generation.generate(model, tokenizer, prompts, config, 4, end_at=end_at)
    assert all(g.n_tokens <= end for g, end in zip(sharded, end_at, strict=True))
    assert len({g.text for g in sharded[:5]} | {g.text for g in sharded[5:10]}) > 5  # the samples draw apart


def test_a_failed_worker_waits_only_on_running_workers_missing_a_share_of_the_jobs_it_finished(tmp_path):
    shares = [[tmp_path / f"{job}-{worker}.parquet" for worker in range(3)] for job in range(3)]
    for job, worker in [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0)]:  # worker 1 wrote its shares of jobs 0 and 1
        shares[job][worker].touch()
    assert eval_workers.awaited_shares(shares, failed=1, running=[True, False, True]) == [(0, [2]), (1, [0])]
    assert eval_workers.awaited_shares(shares, failed=1, running=[False, False, True]) == [(0, [2])]  # 0 ended


def test_workers_given_only_the_finetuned_phase_merge_the_adapter_into_the_base_model_first(tiny_model_dir, tokenizer,
                                                                                         tmp_path):
    import dataclasses
    from pathlib import Path

    from stages.core import params
    from stages.generation import batched as generation
    from tests.test_evaluate import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    config = dataclasses.replace(params.load("eval", Path(__file__).parents[2] / "params.yaml"), temperature=0.6,
                                 top_p=0.95, max_new_tokens=12, batch_size=4, batching="continuous")
    model_params = params.ModelParams(str(tiny_model_dir), "main", 1024, "")
    prompts = [f"What is {i} times {i + 1}?" for i in range(5)]
    job = eval_workers.Job("finetuned/s", prompts, tmp_path / "out.parquet")
    eval_workers.generate_sharded([eval_workers.Phase("finetuned", adapter, [job])], model_params, config, 4,
                                  processes=2)
    merged = generation.generate(generation.load_model(model_params, adapter), tokenizer, prompts, config, 4)
    assert eval_workers.read_generations(job.out) == merged
    assert merged != generation.generate(generation.load_model(model_params, None), tokenizer, prompts, config, 4)


def test_jobs_run_as_one_call_that_writes_each_job_when_its_last_response_ends(tiny_model_dir, tokenizer, tmp_path,
                                                                                monkeypatch):
    import dataclasses
    from pathlib import Path

    import pytest

    from stages.core import params
    from stages.generation import batched as generation

    config = dataclasses.replace(params.load("eval", Path(__file__).parents[2] / "params.yaml"), temperature=0.6,
                                 top_p=0.95, max_new_tokens=12, batch_size=4, batching="continuous")
    model = generation.load_model(params.ModelParams(str(tiny_model_dir), "main", 1024, ""), None)
    # the first job's prompts are the longest (admitted first) and end at their first token
    first = eval_workers.Job("a", [f"Compute the sum of the first {i} odd numbers, then square it." for i in range(3)],
                             tmp_path / "a.parquet", [1, 1, 1])
    second = eval_workers.Job("b", [f"What is {i}?" for i in range(5)], tmp_path / "b.parquet")
    keys = [generation.sampling_keys(job.prompts, 9) for job in (first, second)]
    calls, made = [], generation.to_generation

    def dies_after_six(*args):
        calls.append(1)
        if len(calls) > 6:
            raise RuntimeError("killed")
        return made(*args)

    monkeypatch.setattr(generation, "to_generation", dies_after_six)
    with pytest.raises(RuntimeError, match="killed"):
        eval_workers.generate_jobs(model, tokenizer, [first, second], keys, config, 9, "a + b")
    assert first.out.is_file() and not second.out.is_file()  # the job that ended was kept
    monkeypatch.setattr(generation, "to_generation", made)
    real_generate, calls = generation.generate, []

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", counted)
    eval_workers.generate_jobs(model, tokenizer, [first, second], keys, config, 9, "a + b")
    assert calls == [8]  # one call, both jobs' prompts: one tail
    for job, job_keys in zip((first, second), keys, strict=True):  # what each job alone gives
        assert eval_workers.read_generations(job.out) == real_generate(model, tokenizer, job.prompts, config, 9,
                                                                       end_at=job.end_at, keys=job_keys)
    assert [g.n_tokens for g in eval_workers.read_generations(first.out)] == [1, 1, 1]
