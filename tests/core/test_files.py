"""Output permissions: files and folders Keel writes follow the umask (644/755 under 022) while staying atomic;
what holds a key, and the feedback store of users' conversations, stays private (600)."""

from __future__ import annotations

import contextlib
import os
import stat

from keel.core.files import atomic_write, current_umask, temp_dir, write_json


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_follow_the_umask_and_private_ones_do_not(tmp_path):
    with umask(0o022):
        assert current_umask() == 0o022
        atomic_write(tmp_path / "a.txt", "x")
        write_json(tmp_path / "key.json", {"api_key": "sekret"}, private=True)
        folder = temp_dir(tmp_path, ".build-")
    with umask(0o027):
        atomic_write(tmp_path / "b.txt", "y")
        atomic_write(tmp_path / "a.txt", "z")  # replacing a file gives it the umask's mode again
    assert (mode(tmp_path / "a.txt"), mode(tmp_path / "b.txt"), mode(tmp_path / "key.json")) == (0o640, 0o640, 0o600)
    assert mode(folder) == 0o755 and (tmp_path / "a.txt").read_text() == "z"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, "a.txt", "b.txt", "key.json"])  # no temp


def test_feedback_store_is_private_under_any_umask(tmp_path):
    from keel.serve.feedback import FeedbackStore

    with umask(0o022):
        store = FeedbackStore(tmp_path / "run" / "feedback.sqlite")
        store.record_completion("c1", "m", None, [{"role": "user", "content": "my address is ..."}], "ok")
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "feedback.sqlite-wal" in files  # WAL: the answers are in the -wal file until a checkpoint
    assert {p: mode(tmp_path / "run" / p) for p in files} == {p: 0o600 for p in files}
