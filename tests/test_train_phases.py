"""bench/train_phases.py's clock and summary, on the train stage itself (CPU, tiny model, PEFT backend)."""

from bench import train_phases
from stages import train as train_stage
from tests.conftest import train_project
from tests.dvc_stages import stage_args


def test_the_phase_clock_times_every_micro_batch_and_the_phases_add_up_to_the_step(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    train_project(tmp_path, tiny_model_dir, monkeypatch, max_steps=5, eval_every_steps=10)  # 4 a step, 2 x 2
    clock = train_phases.phase_clock()
    train_stage.main(stage_args("train"), extra_callbacks=(clock,))
    summary = train_phases.summarize(clock.marks, skip=1)
    assert summary["steps"] == 3  # steps 2-4: each needs the next one's begin; the first is skipped
    assert len(summary["micro_batch_ms"]) == 2  # sequences_per_step 4 / micro-batch 2 on CPU
    assert all(ms > 0 for ms in summary["micro_batch_ms"])
    parts = sum(summary["micro_batch_ms"]) + summary["optimizer_ms"] + summary["after_optimizer_ms"]
    assert abs(parts - summary["step_ms"]) <= 0.3  # rounding of four means


def test_a_summary_reads_micro_batches_between_the_trainer_events():
    marks = [("on_step_begin", 0, 0.0), ("on_substep_end", 0, 0.4), ("on_pre_optimizer_step", 0, 1.0),
             ("on_optimizer_step", 0, 1.1), ("on_step_end", 1, 1.2),
             ("on_step_begin", 1, 1.5), ("on_substep_end", 1, 1.8), ("on_pre_optimizer_step", 1, 2.5),
             ("on_optimizer_step", 1, 2.55), ("on_step_end", 2, 2.6), ("on_step_begin", 2, 3.0)]
    assert train_phases.summarize(marks, skip=0) == {
        "steps": 2, "step_ms": 1500.0, "micro_batch_ms": [350.0, 650.0], "optimizer_ms": 75.0,
        "after_optimizer_ms": 425.0}
    assert train_phases.summarize(marks, skip=1)["steps"] == 1
