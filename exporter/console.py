"""What a long command tells the person running it: progress lines on stderr, so stdout stays for results."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
