"""The train stage's checkpoints in models/checkpoints/: a fingerprint stamp that decides whether a run that
died is resumed or cleared, and the checkpoint that every training process resumes from.

Imports no transformers (accelerate inside a function), so stages/train.py can import Unsloth first.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from stages.core.artifacts import atomic_file
from stages.training.choices import TrainError

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"


def prepare_checkpoints(checkpoints: Path, current: str) -> None:
    """Keep the checkpoints of a run that died with the same fingerprint (minus any checkpoint left
    half-written by the kill); clear them when anything the run depends on changed, or when that run
    finished (a new run starts from scratch, never from a finished run's last step). Runs once, in global
    rank 0, while every other process waits in resume_point."""
    stamp = checkpoints / FINGERPRINT
    previous = json.loads(stamp.read_text()) if stamp.exists() else {}
    if previous.get("fingerprint") == current and not previous.get("finished"):
        for partial in checkpoints.glob("checkpoint-*"):
            if not (partial / "trainer_state.json").exists():
                shutil.rmtree(partial)
        return
    if checkpoints.exists():
        why = ("the run that wrote them had finished" if previous.get("fingerprint") == current
               else "params, data, base model or code changed since they were written")
        log.info("checkpoints in %s: %s; starting over", checkpoints, why)
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    _write_stamp(stamp, {"fingerprint": current})


def mark_finished(checkpoints: Path) -> None:
    """Record that the run of these checkpoints completed, so no later run resumes from them."""
    stamp = checkpoints / FINGERPRINT
    _write_stamp(stamp, json.loads(stamp.read_text()) | {"finished": True})


def _write_stamp(stamp: Path, content: dict) -> None:
    with atomic_file(stamp) as tmp:  # never write into a file that may be a link into the DVC cache
        tmp.write_text(json.dumps(content, sort_keys=True) + "\n")


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step of a Trainer checkpoint folder (checkpoint-<step>)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1])


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last), if any."""
    complete = [d for d in checkpoints.glob("checkpoint-*") if (d / "trainer_state.json").exists()]
    return max(complete, key=checkpoint_step) if complete else None


def resume_point(checkpoints: Path, process_index: int) -> Path | None:
    """The checkpoint the run resumes from, the same for every process: global rank 0's newest complete one, sent
    to the others, which wait here until rank 0 has prepared the folder (prepare_checkpoints); no other process
    reads it first. Every process loads that checkpoint, so each node must see it (models/ on a filesystem all
    nodes share); when a node lacks it, every process stops with one line. Call it after TrainingArguments are
    built: they connect the processes (one process alone: no waiting)."""
    from accelerate.utils import broadcast_object_list, gather_object

    latest = latest_checkpoint(checkpoints) if process_index == 0 else None
    (chosen,) = broadcast_object_list([str(latest) if latest else None])
    resume = Path(chosen) if chosen else None
    missing = gather_object([process_index] if resume and not (resume / "trainer_state.json").is_file() else [])
    if missing:
        raise TrainError(f"train: {resume}, which global rank 0 resumes from, is missing on the node of process(es) "
                         f"{missing}; put {checkpoints} on a filesystem every node shares (or delete it on rank 0's "
                         "node to start over)")
    return resume
