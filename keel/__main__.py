"""Run as `python -m keel ...` (same as the `keel` command)."""

from keel.cli import main

main()
