"""What a long command tells the person running it: progress lines on stderr, so stdout stays for results."""

from __future__ import annotations

import os
import sys


def say(message: str) -> None:
    """A progress line; in a data-parallel run (torchrun), rank 0's alone."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
