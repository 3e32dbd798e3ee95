"""docs/reference/ is what scripts/gen_reference.py writes from the flag dataclasses: a changed flag, default or
help text without a regenerated reference fails here."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_up_to_date(tmp_path):
    gen = load_generator()
    gen.write_reference(tmp_path)
    committed = ROOT / "docs" / "reference"
    fresh = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.md")}
    old = {p.name: p.read_text(encoding="utf-8") for p in committed.glob("*.md")}
    stale = sorted(name for name in fresh.keys() | old.keys() if fresh.get(name) != old.get(name))
    assert not stale, (f"docs/reference is out of date ({', '.join(stale)}): run `python scripts/gen_reference.py` "
                       "and commit docs/reference")


def test_every_command_has_a_page():
    """Each `keel` command and subcommand with flags is in the generator's table, and each module names CONFIGS."""
    gen = load_generator()
    from keel.cli import COMMANDS, DATA_SUBCOMMANDS

    commands = {command.split(" --")[0] for command, _ in gen.PAGES.values()}
    expected = {f"keel {name}" for name in COMMANDS if name not in ("data", "feedback", "recipe")}
    expected |= {f"keel data {name.split(' --')[0]}" for name in DATA_SUBCOMMANDS}
    expected |= {"keel feedback export", "keel recipe identity"}
    assert commands == expected
    for _, module_path in gen.PAGES.values():
        assert importlib.import_module(module_path).CONFIGS, module_path
