"""Entry point shared by every stage: logging set-up, the whole params.yaml checked before anything runs, bad
input reported as one clear line (exit code 2) instead of a traceback, and a stop (Ctrl-C, SIGTERM) as one line
that names what was kept.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

IN_GIT = ("metrics", "reports")  # the stages' outputs kept in git, not in DVC's cache
RESTARTS = "nothing: its outputs are written whole when it finishes, so `dvc repro` runs it again"


class StageError(Exception):
    """Bad input or environment that the user can fix; the message says what and how."""


class Stopped(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs."""


def cause(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def usable_cpus() -> int:
    """The cores this process may run on: its CPU affinity where the system keeps one (Linux: a cpuset, taskset or
    a scheduler's binding; not a CPU quota), else every core (macOS has no os.sched_getaffinity)."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+: the affinity, or PYTHON_CPU_COUNT where set
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _stop(signum, frame):
    raise Stopped


def restore_hint() -> str:
    """Under `dvc repro`, how to get back the outputs DVC removed before it ran the failed stage."""
    stage = os.environ.get("DVC_STAGE")  # set by DVC for every stage command it runs
    if not stage:
        return ""
    try:  # the folders of those kept in git: a checkout naming a folder git does not track restores nothing
        listed = subprocess.run(["git", "ls-files", "-z", "--", *IN_GIT], capture_output=True, text=True,
                                timeout=10).stdout.split("\0")
    except (OSError, subprocess.SubprocessError):
        listed = []
    folders = [folder for folder in IN_GIT  # a placeholder (.gitkeep) restores nothing
               if any(path.startswith(f"{folder}/") and not path.endswith("/.gitkeep") for path in listed)]
    in_git = f", `git checkout -- {' '.join(folders)}` the {' and '.join(folders)} kept in git" if folders else ""
    return f" (DVC removed {stage}'s previous outputs before running it: `dvc checkout {stage}` brings back the " \
           f"cached ones{in_git})"


def _close_progress_bars() -> int:
    """Close the progress bars a stop left open (train's, evaluate's), as they stand: else each is drawn again
    as the process exits, after the stop line. How many it closed."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))
    for bar in bars:
        bar.close()
    return len(bars)


def run(main, argv: list[str] | None = None, kept: str = RESTARTS, check_params: bool = True) -> None:
    """Run a stage's main: params checked first (unless check_params is off: processes a stage starts), errors
    and stops as one line. kept: what a stop leaves for the next run (train's checkpoints, evaluate's sets)."""
    from stages.core import params  # params imports this module for StageError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("stages")
    stage = Path(sys.argv[0]).stem  # python -m stages.<stage>: argv[0] is the module's file
    signal.signal(signal.SIGTERM, _stop)
    try:
        if check_params:
            params.check_all()
        main(argv)
    except StageError as e:
        log.error("%s%s", e, restore_hint())
        sys.exit(2)
    except (KeyboardInterrupt, Stopped) as e:
        signum = signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT
        if not _close_progress_bars():  # a closed bar ends its line
            sys.stderr.write("\n")  # off the line a stop interrupts
        log.error("%s: stopped by %s; kept %s", stage, signal.Signals(signum).name, kept)
        sys.exit(128 + signum)  # the shell's code for a process ended by that signal, which DVC reports as such
