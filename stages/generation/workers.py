"""Evaluation generation split over several processes, one per GPU (eval.num_gpus): each worker loads the
base model once and answers its share of every set's prompts, base model first, then with the adapter merged
into it in place; the parent merges the shares back in prompt order.

    python -m stages.generation.workers JOB_FILE WORKER   # started by generate_sharded, not by hand
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.core import cli, params
from stages.core.artifacts import PROJECT_ROOT, atomic_file

log = logging.getLogger("stages.generation.workers")  # not __name__: workers run it with `python -m`


class WorkerError(cli.StageError):
    """eval.num_gpus cannot be met here, or a generation worker failed."""


@dataclasses.dataclass(frozen=True)
class Job:
    desc: str  # model/set, in logs and progress bars
    prompts: list[str]  # every prompt (times samples), in the order the generations are written
    out: Path  # the cache file the merged generations go to
    end_at: list[int] | None = None  # benchmarks: each response's forced end (generation.generate's end_at)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One model's jobs in a session that loads the base model once."""
    model: str  # 'base' or 'finetuned', in logs
    adapter: Path | None  # merged into the loaded model before this phase's jobs (None: the base model as loaded)
    jobs: list[Job]


def process_count(num_gpus: int | str) -> int:
    """eval.num_gpus resolved: 'auto' is every visible CUDA GPU (1 without CUDA); N is N processes, at most
    the visible GPUs on a CUDA machine (on a machine without CUDA, N CPU processes)."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus == "auto":
        return max(visible, 1)
    if visible and num_gpus > visible:
        raise WorkerError(f"evaluate: eval.num_gpus is {num_gpus}, but {visible} CUDA GPU(s) are visible here; "
                          "lower it, use 'auto', or check CUDA_VISIBLE_DEVICES")
    return num_gpus


def worker_gpus(processes: int) -> list[str | None]:
    """Each worker's CUDA_VISIBLE_DEVICES: the k-th GPU this process sees (so the worker's cuda:0 is it);
    None on a machine without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return [None] * processes
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",")] if visible else [str(i) for i in range(torch.cuda.device_count())]
    return gpus[:processes]


# Installed libraries that transformers and PEFT import when present and a worker's generation never uses:
# scikit-learn serves only assisted decoding; torchao and bitsandbytes only models quantized with them (the
# config's quantization_config.quant_method names them). Without them a worker's imports took 10-11 s instead
# of 14.4 s (2x H200), but a warm compile took 3.3-5.5 s against 2.2-2.8 s in earlier runs (other calls):
# torch.compile seems to import part of what torchao brought in.
UNUSED_IMPORTS = ("sklearn", "torchao", "bitsandbytes")


def unused_imports(model_dir: Path) -> list[str]:
    """The UNUSED_IMPORTS a worker that loads the model in model_dir goes without."""
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    method = (config.get("quantization_config") or {}).get("quant_method")
    return [name for name in UNUSED_IMPORTS if name != method]


def skip_imports(names: list[str]) -> None:
    """Make these (not yet imported) packages look absent to this process: importlib's find_spec answers None
    and `import` fails, so libraries that check first (transformers, PEFT) leave them out."""
    for name in names:
        sys.modules.setdefault(name, None)


def share(items: list, worker: int, processes: int) -> list:
    """The worker's share: item i goes to worker i % processes, so shares differ by one item at most."""
    return items[worker::processes]


def merge(shares: list[list]) -> list:
    """The items of every worker's share back in their original order (the inverse of share)."""
    merged = [None] * sum(map(len, shares))
    for worker, part in enumerate(shares):
        merged[worker::len(shares)] = part
    return merged


def write_generations(path: Path, outputs: list) -> None:
    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist([dataclasses.asdict(o) for o in outputs]), tmp)


def read_generations(path: Path) -> list:
    from stages.generation import batched as generation

    return [generation.Generation(**row) for row in pq.read_table(path).to_pylist()]


def generate_jobs(model, tokenizer, jobs: list[Job], keys: list[list[int]], config: params.EvalParams, seed: int,
                  desc: str) -> None:
    """Every job's prompts in one generate call, so the batch runs down to one tail (its last, longest
    responses at small batch) rather than one per job; each job's generations are written to job.out as
    soon as its last response ends, so a run that dies keeps the jobs it finished. keys: each job's
    sampling keys (generation.sampling_keys); seed: the padded route's."""
    from stages.generation import batched as generation

    prompts = [prompt for job in jobs for prompt in job.prompts]
    owner = [(j, i) for j, job in enumerate(jobs) for i in range(len(job.prompts))]
    outputs: list[list] = [[None] * len(job.prompts) for job in jobs]
    left = [len(job.prompts) for job in jobs]
    for job in jobs:
        if not job.prompts:
            write_generations(job.out, [])
    forced = any(job.end_at for job in jobs)  # benchmarks; jobs without forced ends are never forced
    end_at = [end for job in jobs for end in job.end_at or [config.max_new_tokens + 1] * len(job.prompts)]

    def on_generation(k: int, generation) -> None:
        j, i = owner[k]
        outputs[j][i] = generation
        left[j] -= 1
        if not left[j]:
            write_generations(jobs[j].out, outputs[j])

    generation.generate(model, tokenizer, prompts, config, seed, desc=desc, end_at=end_at if forced else None,
                        keys=[key for job_keys in keys for key in job_keys], on_generation=on_generation)


def generate_phases(model_params: params.ModelParams, tokenizer, phases: list[Phase], keys: list[list[list[int]]],
                    config: params.EvalParams, seed: int, label: str = "") -> None:
    """Every phase's jobs with one loaded model: the base model, loaded once, then for each phase with an
    adapter that adapter merged into it in place (so torch.compile's decode step is reused, not compiled
    again), and the phase's jobs as one generate_jobs call. keys: each phase's jobs' sampling keys; label
    ends each phase's progress description. Loads no model when no job has a prompt."""
    import torch

    from stages.generation import batched as generation

    assert all(phase.adapter for phase in phases[1:]), "a merge cannot be undone: the base model's phase comes first"
    model = None
    if any(job.prompts for phase in phases for job in phase.jobs):
        start = time.perf_counter()
        model = generation.load_model(model_params, None)
        log.info("loaded the base model in %.1f s (importing transformers' model code included)",
                 time.perf_counter() - start)
    for phase, phase_keys in zip(phases, keys, strict=True):
        if phase.adapter and model is not None:
            # The last phase's batcher (it refers to itself) holds its KV cache until collected, and
            # batch_size 'auto' sizes this phase's cache by the memory the GPU has free.
            gc.collect()
            torch.cuda.empty_cache()
            log.info("%s: merging the adapter into the loaded model", phase.model)
            start = time.perf_counter()
            model = generation.merge_adapter(model, phase.adapter)
            log.info("%s: merged the adapter in %.1f s (importing PEFT included)", phase.model,
                     time.perf_counter() - start)
        generate_jobs(model, tokenizer, phase.jobs, phase_keys, config, seed,
                      " + ".join(job.desc for job in phase.jobs) + label)


def share_file(job_file: Path, phase: int, job: int, worker: int) -> Path:
    """Where a worker writes its share of a phase's job: beside the job file."""
    return job_file.with_name(f"{phase}-{job}-{worker}.parquet")


def generate_sharded(phases: list[Phase], model_params: params.ModelParams, config: params.EvalParams, seed: int,
                     processes: int) -> None:
    """Every phase's jobs answered by one set of `processes` workers, each running the phases in order with
    one loaded model (generate_phases; sampling keys from the whole job's prompts, so a response draws what it
    would in one process); each job's generations are written to job.out as soon as every worker has its
    share. When a worker fails, the others are stopped once each job it finished its share of has theirs
    (run_workers), jobs every worker finished are written, and WorkerError."""
    from stages.core.base_model import local_model_dir

    # Downloaded (if need be) once, here: the workers load this folder and never touch the hub.
    local_model = dataclasses.replace(model_params, name=str(local_model_dir(model_params)))
    gpus = worker_gpus(processes)
    with tempfile.TemporaryDirectory(prefix="eval-shares-") as folder:
        job_file = Path(folder) / "job.json"
        job_file.write_text(json.dumps({
            "model": dataclasses.asdict(local_model), "eval": dataclasses.asdict(config), "seed": seed,
            "processes": processes,
            "phases": [{"model": phase.model, "adapter": str(phase.adapter.absolute()) if phase.adapter else None,
                        "jobs": [{"desc": job.desc, "prompts": job.prompts, "end_at": job.end_at}
                                 for job in phase.jobs]} for phase in phases]}))
        log.info("%s: %d worker(s) (%s)", ", ".join(job.desc for phase in phases for job in phase.jobs), processes,
                 ", ".join(f"worker {k}: {'GPU ' + gpu if gpu else 'CPU'}" for k, gpu in enumerate(gpus)))
        jobs = [job for phase in phases for job in phase.jobs]
        shares = [[share_file(job_file, p, j, k) for k in range(processes)]
                  for p, phase in enumerate(phases) for j in range(len(phase.jobs))]
        written: set[int] = set()

        def write_finished() -> None:
            """Each job whose shares are all there, merged into job.out, once: a parent that dies later keeps it."""
            for index, (job, paths) in enumerate(zip(jobs, shares, strict=True)):
                if index not in written and all(path.is_file() for path in paths):
                    write_generations(job.out, merge([read_generations(path) for path in paths]))
                    written.add(index)

        failure = run_workers(job_file, gpus, [job.desc for job in jobs], shares, write_finished)
        write_finished()
    if failure:
        raise WorkerError(f"evaluate: {failure}; its log above says why (sets that every worker finished are "
                          "kept and not generated again)")


def awaited_shares(shares: list[list[Path]], failed: int, running: list[bool]) -> list[tuple[int, list[int]]]:
    """The jobs whose share the failed worker wrote but a running worker has not yet: (job, those workers)."""
    return [(index, waiting) for index, paths in enumerate(shares) if paths[failed].is_file()
            and (waiting := [k for k, path in enumerate(paths) if running[k] and not path.is_file()])]


def run_workers(job_file: Path, gpus: list[str | None], descs: list[str], shares: list[list[Path]],
                on_poll: Callable[[], None]) -> str | None:
    """Start one worker per entry of gpus and wait for all, calling on_poll every 0.2 s. shares: each job's
    share file of each worker (descs: the jobs' names). At the first failure, wait for the others only until
    every job whose share the failed worker wrote has all its shares (or the workers it waits for end): the
    workers may be in different phases, and such a job is kept. Then stop them and return the failure in
    words (None when all succeed)."""
    import torch

    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    # CPU workers share the cores: each taking all of them makes every one several times slower.
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, torch.get_num_threads() // len(gpus))))}
    workers = [subprocess.Popen([sys.executable, "-m", "stages.generation.workers", str(job_file), str(k)],
                                env=env | ({"CUDA_VISIBLE_DEVICES": gpu} if gpu else threads))
               for k, gpu in enumerate(gpus)]
    try:
        while (failed := next((k for k, worker in enumerate(workers) if worker.poll()), None)) is None:  # exit != 0
            on_poll()
            if all(worker.returncode == 0 for worker in workers):
                return None
            time.sleep(0.2)

        def awaited() -> list[tuple[int, list[int]]]:
            return awaited_shares(shares, failed, [worker.poll() is None for worker in workers])

        if waits := awaited():
            log.info("generation worker %d failed; waiting for worker(s) %s to write their shares of %s (worker %d "
                     "wrote its own), then stopping the others", failed,
                     ", ".join(map(str, sorted({k for _, ks in waits for k in ks}))),
                     ", ".join(descs[index] for index, _ in waits), failed)
        while awaited():
            on_poll()
            time.sleep(0.2)
        code, gpu = workers[failed].returncode, gpus[failed]
        return (f"generation worker {failed} of {len(workers)} ({f'GPU {gpu}' if gpu else 'CPU'}) failed "
                f"with exit code {code}{f' (killed by signal {-code})' if code < 0 else ''}")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("job", type=Path, help="the JSON job file written by generate_sharded")
    parser.add_argument("worker", type=int, help="this worker's index: its share and its seed offset")
    args = parser.parse_args(argv)
    # Timestamps to the millisecond: a worker's start (load, merge, compile) takes a few seconds a part.
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s.%(msecs)03d worker {args.worker} %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S", force=True)
    job = json.loads(args.job.read_text())
    model_params, config = params.ModelParams(**job["model"]), params.EvalParams(**job["eval"])
    skip_imports(unused_imports(Path(model_params.name)))  # before transformers is imported
    from stages.core.base_model import load_tokenizer
    from stages.generation import batched as generation

    tokenizer = load_tokenizer(model_params)
    processes, worker = job["processes"], args.worker
    phases = [Phase(phase["model"], phase["adapter"] and Path(phase["adapter"]),
                    [Job(item["desc"], share(item["prompts"], worker, processes), share_file(args.job, p, j, worker),
                         item["end_at"] and share(item["end_at"], worker, processes))
                     for j, item in enumerate(phase["jobs"])])
              for p, phase in enumerate(job["phases"])]
    # Continuous batching keys each response's random numbers by the whole list's keys: the samples equal
    # one process's. The padded route samples by the seed, offset per worker so no two draw alike.
    keys = [[share(generation.sampling_keys(item["prompts"], job["seed"]), worker, processes)
             for item in phase["jobs"]] for phase in job["phases"]]
    generate_phases(model_params, tokenizer, phases, keys, config, job["seed"] + worker, f" [worker {worker}]")


if __name__ == "__main__":
    cli.run(main, kept="the shares this worker finished (the parent keeps whole sets)", check_params=False)
    # Its shares are written: skip the interpreter's teardown (freeing the KV cache, the CUDA graphs and
    # torch.compile's worker pool), which took ~5 s of an H200 worker's exit while the parent waited.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
