"""Run the `keel` CLI in-process and capture its exit code and output."""

from __future__ import annotations

import pytest

from keel.cli import main


def run_keel(capsys, *argv) -> tuple[int, str, str]:
    """Return (exit_code, stdout, stderr) of `keel ARGV...` run in this process."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err
