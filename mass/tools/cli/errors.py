"""How the ``mass`` command line reports a user's mistake: exactly one ``mass: error: ...`` line on stderr and
exit code 2, never a traceback (``MASS_DEBUG=1`` re-raises, for bug reports). Every subcommand shares this."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from mass.files.checkpoints import CheckpointError
from mass.storage.saved_format import SavedModelError

USER_ERRORS = (CheckpointError, SavedModelError, ValueError, OSError, TypeError, NotImplementedError)


class UserError(Exception):
    """A mistake in the command line itself (a flag's value, a missing path)."""


def one_line(message) -> str:
    return " ".join(str(message).split())


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one error line (``mass: error: ...``) after the usage."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"mass: error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(2)


def run_reporting(command: Callable[[], int]) -> int:
    """``command()``'s exit code; a user error becomes one ``mass: error:`` line and exit code 2."""
    try:
        return command()
    except (UserError, *USER_ERRORS) as exc:
        if os.environ.get("MASS_DEBUG"):
            raise
        print(f"mass: error: {one_line(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mass: interrupted", file=sys.stderr)
        return 130
