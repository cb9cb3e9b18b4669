"""The `streamseg` command's entry point, kept to what a Ctrl-C during start-up needs.

streamseg's own signal handling starts inside cli.main(); a SIGINT while the CLI module itself
loads (about 0.1 s after the interpreter starts) would otherwise end in Python's traceback.
Nothing has been opened or written by then, so the run just stops, with the usual status."""
from __future__ import annotations

import sys


def main() -> int:
    try:
        from .cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:  # before cli.main() took over the signals
        print("streamseg: interrupted", file=sys.stderr)
        return 130
