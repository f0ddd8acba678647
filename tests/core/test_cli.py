"""What every stage does around its work: params checked first, one line for bad input, one line for a stop."""

import importlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT
from tests.dvc_stages import stage_command

SLEEPER = """
import logging, sys, time
sys.argv = ["stages/sleeper.py"]
from tqdm.auto import tqdm
from stages.core import cli

def main(argv):
    from dvclive import Live  # as train logs: its git objects once printed a trace each at a stop's shutdown

    Live("live", save_dvc_exp=False).log_metric("loss", 1.0)
    bar = tqdm(total=400)  # as train's: a stop once left it to be drawn again at exit, after the stop line
    bar.update(282)
    logging.getLogger("stages.sleeper").info("started")
    time.sleep(60)

cli.run(main, kept="the test's checkpoint; `dvc repro` resumes", check_params=False)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_is_one_line_naming_what_was_kept_with_the_signals_exit_code(signum, tmp_path):
    for command in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                                     "-m", "start"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    # SIGINT as a terminal gives it, even where this test runs in a background job (which ignores SIGINT, and
    # a Python started ignoring it never raises KeyboardInterrupt)
    process = subprocess.Popen([sys.executable, "-c", SLEEPER], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"PYTHONPATH": str(ROOT)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    while not any("started" in line for line in lines):
        lines.append(process.stderr.readline())
        assert process.poll() is None and lines[-1], "".join(lines)
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait(timeout=30) == 128 + signum
    assert "Traceback" not in rest
    lines = [line for line in rest.strip().splitlines() if "282/400" not in line]  # but the bar, as it was
    assert lines == [rest.strip().splitlines()[-1]]  # one line, the last
    assert f"sleeper: stopped by {signal.Signals(signum).name}; kept the test's checkpoint; `dvc repro` resumes" in rest


def run_stage(project, stage: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(stage_command(stage), cwd=project, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_a_typo_in_another_section_stops_any_stage_in_seconds_before_it_touches_anything(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["eval"]["sets"] = ["heldout", "aime24"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    result = run_stage(tmp_path, "stratify")  # stratify reads no eval param, and has no input here either
    assert time.perf_counter() - started < 15
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line or "params:" in line]
    assert len(errors) == 1 and "eval.sets names 'aime24'" in errors[0] and "known sets: heldout" in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_under_dvc_a_failed_stage_says_how_to_get_its_previous_outputs_back(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = run_stage(tmp_path, "stratify", DVC_STAGE="stratify")  # no data/filtered.parquet
    assert result.returncode == 2
    assert "`dvc checkout stratify` brings back the cached ones)" in result.stderr  # no git repo: nothing in git
    assert "dvc checkout" not in run_stage(tmp_path, "stratify").stderr  # not under DVC: nothing was removed
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / ".gitkeep").write_text("")
    for command in (["init", "-q"], ["add", "metrics"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    assert "cached ones)" in run_stage(tmp_path, "stratify", DVC_STAGE="stratify").stderr  # .gitkeep restores nothing
    (tmp_path / "metrics" / "data.json").write_text("{}")
    subprocess.run(["git", "add", "metrics"], cwd=tmp_path, check=True)
    # the folders git holds, only: naming one it does not (reports) would make the whole checkout fail
    assert ("`dvc checkout stratify` brings back the cached ones, `git checkout -- metrics` the metrics kept in git)"
            in run_stage(tmp_path, "stratify", DVC_STAGE="stratify").stderr)


@pytest.mark.parametrize("stage", ["fetch", "fetch_eval", "filter", "stratify", "train", "evaluate", "report",
                                   "release"])
def test_every_stage_option_says_what_it_is_and_its_default(stage, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    module = importlib.import_module(f"stages.{stage}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z-]+) ", text, flags=re.M)
    assert options and len(re.findall(r"\(default: [^)]+\)", text)) == len(options)
    assert all(re.search(rf"^  {option} \S+\s+(in|out|in/out): ", text, flags=re.M) for option in options), text


@pytest.mark.parametrize("has", [("process_cpu_count", "sched_getaffinity"), ("sched_getaffinity",), ()])
def test_usable_cpus_is_this_process_s_share_where_the_system_keeps_one_else_every_core(has, monkeypatch):
    from stages.core import cli

    for name in ("process_cpu_count", "sched_getaffinity"):
        monkeypatch.delattr(os, name, raising=False)
    if "process_cpu_count" in has:
        monkeypatch.setattr(os, "process_cpu_count", lambda: 3, raising=False)
    if "sched_getaffinity" in has:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cli.usable_cpus() == (3 if "process_cpu_count" in has else 2 if has else 64)


def test_the_generation_engine_and_the_filter_import_where_there_is_no_cpu_affinity():
    """macOS has no os.sched_getaffinity: the README's laptop smoke run imports both."""
    code = ("import os; [os.__dict__.pop(name, None) for name in ('sched_getaffinity', 'process_cpu_count')]\n"
            "from stages.generation import continuous; from stages.data import screening\n"
            "print(continuous.COMPILE_THREADS, screening.worker_count('auto', 10**9))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(min(16, os.cpu_count())), str(os.cpu_count())]
