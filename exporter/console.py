"""What a long command tells the person running it: progress lines on stderr, so stdout stays for results."""

from __future__ import annotations

import os
import sys


def say(message: str) -> None:
    """A progress line; in a data-parallel run (torchrun), rank 0's alone."""
    if os.environ.get("RANK", "0") == "0":
        tell(message)


def tell(message: str) -> None:
    """One line on stderr in one write: the processes of a torchrun job share the pipe, and print's two writes (the
    text, then the newline) let another process's line land in the middle of this one."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
