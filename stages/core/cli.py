"""Entry point shared by every stage: logging set-up, and bad input reported as one clear line
(exit code 2) instead of a traceback.
"""

from __future__ import annotations

import logging
import sys


class StageError(Exception):
    """Bad input or environment that the user can fix; the message says what and how."""


def run(main, argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        main(argv)
    except StageError as e:
        logging.getLogger("stages").error("%s", e)
        sys.exit(2)
