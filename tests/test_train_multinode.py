"""The train stage under a torchrun launch the user starts on each of several nodes: here two "nodes" of one
process each on this machine, joined by a c10d rendezvous on 127.0.0.1 (gloo on CPU), sharing one project folder
as nodes share models/ on a network filesystem."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stages import train as train_stage
from stages.core import params
from stages.training import choices as train_choices
from tests.conftest import ROOT, train_project
from tests.dvc_stages import project_pythonpath, stage_args

SEQUENCES_PER_STEP = 8


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_nodes(project: Path, nodes: int = 2, timeout_seconds: int = 300) -> list[tuple[int, str]]:
    """Start `torchrun ... -m stages.train` once per node, all at once, as a user does on each machine;
    (exit code, log) of each."""
    port = free_port()
    env = os.environ | {"PYTHONPATH": project_pythonpath()}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=train-{port}",
               "--rdzv-conf=join_timeout=120", "-m", "stages.train", *stage_args("train")]
    logs = [project / f"node-{node}.log" for node in range(nodes)]
    launched = []
    for log in logs:
        with open(log, "w") as out:  # a session of its own: a hung launch is killed with its workers
            launched.append(subprocess.Popen(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True))
    try:
        codes = [node.wait(timeout=timeout_seconds) for node in launched]
    finally:
        for node in launched:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    return [(code, log.read_text()) for code, log in zip(codes, logs, strict=True)]


def train_metrics(project: Path) -> dict:
    return json.loads((project / "metrics" / "train.json").read_text())


def under_users_torchrun(monkeypatch, processes: int) -> None:
    """This process as one of `processes` that a user's torchrun started (one a node)."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(processes))


@pytest.mark.slow
def test_two_nodes_keep_sequences_per_step_and_write_one_adapter(tmp_path, tiny_model_dir, monkeypatch):
    project = train_project(tmp_path, tiny_model_dir, monkeypatch, epochs=1, sequences_per_step=SEQUENCES_PER_STEP)
    # one process: the steps to match, and finished checkpoints that rank 0 must clear
    train_stage.main(stage_args("train"))
    alone = train_metrics(project)

    nodes = launch_nodes(project)
    assert [code for code, _ in nodes] == [0, 0], "\n".join(log[-3000:] for _, log in nodes)
    log = "".join(log for _, log in nodes)
    assert log.count("adapter -> models/adapter") == 1  # global rank 0 alone writes it
    assert log.count("train.num_gpus=1 is ignored: torchrun started 2 processes") == 1
    metrics = train_metrics(project)
    assert metrics["processes"] == 2 and alone["processes"] == 1
    assert metrics["micro_batch_size"] * metrics["gradient_accumulation_steps"] * 2 == SEQUENCES_PER_STEP
    assert metrics["steps"] == alone["steps"] == 3  # 24 rows, 8 a step, one epoch
    assert metrics["epochs_run"] == pytest.approx(alone["epochs_run"])
    assert metrics["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-3)  # the same sequences each step
    assert metrics["resumed_from_step"] == 0  # the single process's finished run was cleared, not resumed

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, project / "models" / "adapter")
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in tuned.named_parameters())
    assert not list((project / "models").glob(".adapter.*"))  # no half-written second copy


def test_under_torchrun_the_launchers_world_size_divides_the_sequences_per_step(monkeypatch):
    config = params.load("train", ROOT / "params.yaml")  # num_gpus: 1, sequences_per_step: 16
    under_users_torchrun(monkeypatch, 8)
    assert train_choices.world_size(config) == 8
    assert train_choices.micro_batch_size(config, 80.0, 8) == 2  # 16 / 8 processes: 2 each, accumulation 1
    monkeypatch.delenv("LOCAL_RANK")  # not under torchrun: train.num_gpus processes
    assert train_choices.world_size(config) == config.num_gpus


def test_a_world_size_that_does_not_divide_sequences_per_step_is_refused_before_training(tmp_path, tiny_model_dir,
                                                                                          monkeypatch):
    project = train_project(tmp_path, tiny_model_dir, monkeypatch, sequences_per_step=SEQUENCES_PER_STEP)
    under_users_torchrun(monkeypatch, 3)
    with pytest.raises(train_choices.TrainError, match=r"sequences_per_step=8 must be divisible by the 3 training"):
        train_stage.main(stage_args("train"))
    assert not (project / "models").exists()


def test_nvlink_multicast_stays_off_under_the_users_torchrun(tmp_path, tiny_model_dir, monkeypatch):
    train_project(tmp_path, tiny_model_dir, monkeypatch, sequences_per_step=SEQUENCES_PER_STEP)
    under_users_torchrun(monkeypatch, 3)  # refused before training: this test needs no more than the set-up
    for name in train_stage.NO_NVLINK_MULTICAST:
        monkeypatch.setenv(name, "")
    with pytest.raises(train_choices.TrainError):
        train_stage.main(stage_args("train"))
    assert all(os.environ[name] == value for name, value in train_stage.NO_NVLINK_MULTICAST.items())


RESUME_POINT = """
import os, sys
from pathlib import Path
from accelerate import PartialState
from stages.training import checkpoints as train_checkpoints
from stages.training import choices as train_choices
PartialState(cpu=True)  # joins the other process (gloo), as TrainingArguments does in the stage
rank = int(os.environ["RANK"])
for case in ("stale", "missing"):
    os.chdir(Path(sys.argv[1]) / case / f"node-{rank}")  # each node's own folder, the same relative paths
    try:
        print(case, train_checkpoints.resume_point(Path("checkpoints"), rank), flush=True)
    except train_choices.TrainError as e:
        print(case, e, flush=True)
"""


def test_every_process_resumes_from_rank_0s_checkpoint_or_all_stop_in_one_line(tmp_path):
    """Two nodes with folders of their own: rank 0's newest checkpoint is everyone's, whatever another node holds;
    when a node lacks it, every process stops with one line."""
    for case, folders in {"stale": {0: [2], 1: [2, 4]}, "missing": {0: [2], 1: []}}.items():
        for node, steps in folders.items():
            checkpoints = tmp_path / case / f"node-{node}" / "checkpoints"
            checkpoints.mkdir(parents=True)
            for step in steps:
                (checkpoints / f"checkpoint-{step}").mkdir()
                (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")  # complete
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                        "PYTHONPATH": project_pythonpath()}
    launched = [subprocess.Popen([sys.executable, "-c", RESUME_POINT, str(tmp_path)], text=True,
                                 stdout=subprocess.PIPE, env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)})
                for rank in (0, 1)]
    try:
        outputs = [process.communicate(timeout=120)[0].splitlines() for process in launched]
    finally:
        for process in launched:
            process.kill()  # a no-op for one that ended
    assert [lines[0] for lines in outputs] == ["stale checkpoints/checkpoint-2"] * 2  # rank 1's checkpoint-4: unread
    assert [lines[1] for lines in outputs] == [
        "missing train: checkpoints/checkpoint-2, which global rank 0 resumes from, is missing on the node of "
        "process(es) [1]; put checkpoints on a filesystem every node shares (or delete it on rank 0's node to start "
        "over)"] * 2


def test_the_several_machines_command_in_the_docs_runs_the_train_stage_as_dvc_yaml_does():
    """docs/multi-gpu.md's torchrun line is typed by hand on each machine: its stage arguments are dvc.yaml's."""
    text = (ROOT / "docs" / "multi-gpu.md").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "torchrun" in line and "-m stages.train" in line)
    words = shlex.split(line)
    assert words[words.index("stages.train") + 1:] == stage_args("train")
