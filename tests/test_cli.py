"""The `keel` command itself: help, unknown commands, one-line errors and exit codes."""

from tests.helpers import run_keel


def test_help_lists_subcommands(capsys):
    code, out, _ = run_keel(capsys, "--help")
    assert code == 0
    for name in ("infer", "sft", "eval", "data", "export", "deploy"):
        assert f"  {name} " in out


def test_unknown_command_suggests(capsys):
    code, _, err = run_keel(capsys, "infr")
    assert code == 2
    assert err.strip() == "keel: error: unknown command 'infr'; did you mean 'infer'?"


def test_unknown_flag_is_one_line_and_exit_2(capsys):
    code, _, err = run_keel(capsys, "infer", "--max_new_tokkens", "3")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "did you mean --max_new_tokens?" in err
