"""The feedback store (SQLite, WAL) and `keel feedback export`: bad cases back into training.

    keel feedback export --db feedback.sqlite -o bad_cases.jsonl            # corrected 👎 answers
    keel feedback export --db feedback.sqlite --since 2026-11-01 --include_good true -o rounds/r2.jsonl
    keel sft --dataset self_cognition.json bad_cases.jsonl#10% ...          # the next round
    keel feedback export --db feedback.sqlite --kind pairs -o pairs.jsonl    # 👎 + correction: chosen vs rejected
    keel rlhf --rlhf_type dpo --dataset pairs.jsonl --adapters output/v0-.../checkpoint-N
    keel feedback export --db feedback.sqlite --kind kto -o kto.jsonl        # every rating: answer + label

Kinds: sft (default) writes corrections (and 👍 answers with --include_good) as conversations; pairs
writes each 👎 with a correction as ms-swift's `messages` (ending in the correction) + `rejected_response`
(the answer given); kto writes every rated answer as `messages` + `label` (👍 true, 👎 false), and a
correction as a true row. Duplicate rows and pairs whose correction equals the answer are dropped
and counted.

Every answer the server gives is recorded with its conversation; a rating (👍/👎, optional
correction) refers to it by id. Each write is committed before the server replies.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.files import write_jsonl
from keel.core.flags import parse_flags

SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (id TEXT PRIMARY KEY, created TEXT, model TEXT, system TEXT,
                                        messages TEXT, answer TEXT);
CREATE TABLE IF NOT EXISTS feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, completion_id TEXT, rating TEXT,
                                     correction TEXT, created TEXT);
"""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class FeedbackStore:
    """The store, opened for writing (the server; checked writable at once) or `readonly` (export)."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.lock = threading.Lock()
        if readonly:
            self.db = self.open_readonly()
            return
        existed = self.path.is_file() and self.path.stat().st_size > 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not existed:  # users' conversations: private (600) whatever the umask; SQLite gives -wal/-shm the same
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            if existed:
                report = [row[0] for row in self.db.execute("PRAGMA quick_check")]
                if report != ["ok"]:
                    raise sqlite3.DatabaseError(damage_summary(report))
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            # A real write now: a read-only mount or a full disk stops the server here, not after an answer.
            self.db.execute("PRAGMA user_version = 1")
            self.db.commit()
        except (sqlite3.OperationalError, OSError) as e:
            raise KeelError(f"--feedback_db {self.path}: cannot write there ({e}); every answer is recorded in it: "
                            "free some space or pass a writable --feedback_db") from None
        except sqlite3.DatabaseError as e:
            raise KeelError(f"--feedback_db {self.path}: not a readable feedback database ({e}); "
                            "it was left untouched: move it away or pass another --feedback_db") from None

    def open_readonly(self) -> sqlite3.Connection:
        """Read without writing anything: no tables created, not even in an empty file."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            try:
                db = sqlite3.connect(uri, uri=True, check_same_thread=False)
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            except sqlite3.OperationalError:  # WAL on a read-only folder: no -shm can be made, and no writer can be there
                db = sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False)
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise KeelError(f"--db {self.path}: not a readable feedback database ({e})") from None
        if not {"completions", "feedback"} <= tables:
            raise KeelError(f"--db {self.path}: not a feedback database written by keel deploy (no completions/feedback tables)")
        return db

    def write(self, sql: str, params: tuple):
        """One committed write; on failure (disk full, read-only) roll back so the next write can try again."""
        try:
            self.db.execute(sql, params)
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise

    def record_completion(self, cid: str, model: str, system: str | None, messages: list[dict], answer: str):
        with self.lock:
            self.write("INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?)",
                       (cid, now(), model, system, json.dumps(messages, ensure_ascii=False), answer))

    def add_feedback(self, cid: str, rating: str, correction: str | None) -> bool:
        """Store a rating; False if the completion id is unknown."""
        with self.lock:
            if self.db.execute("SELECT 1 FROM completions WHERE id = ?", (cid,)).fetchone() is None:
                return False
            self.write("INSERT INTO feedback (completion_id, rating, correction, created) VALUES (?, ?, ?, ?)",
                       (cid, rating, correction or None, now()))
        return True

    def ratings(self, since: str | None = None) -> list[dict]:
        query = ("SELECT f.completion_id, f.rating, f.correction, f.created, c.model, c.system, c.messages, c.answer "
                 "FROM feedback f JOIN completions c ON c.id = f.completion_id")
        params: tuple = ()
        if since:
            query += " WHERE f.created >= ?"
            params = (since,)
        keys = ("id", "rating", "correction", "created", "model", "system", "messages", "answer")
        try:
            with self.lock:
                rows = [dict(zip(keys, r)) for r in self.db.execute(query + " ORDER BY f.id", params)]
            for r in rows:
                r["messages"] = json.loads(r["messages"])
        except (sqlite3.Error, ValueError, TypeError) as e:  # a damaged file: pages, text or JSON
            raise KeelError(f"--db {self.path}: the feedback database is damaged and cannot be read whole "
                            f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
        return rows


def damage_summary(report: list[str]) -> str:
    """SQLite's integrity report (many lines, thousands of characters on a badly damaged file) as one short line:
    its first problem and how many there are."""
    problems = [line for row in report for line in row.splitlines() if line.strip() and not line.startswith("***")]
    more = f" and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
    return f"{problems[0][:160] if problems else 'damaged'}{more}"


def training_rows(ratings: list[dict], only: str | None, include_good: bool) -> tuple[list[dict], list[dict]]:
    """(rows in the messages format, bad ratings without a correction)."""
    rows, missing = [], []
    for r in ratings:
        convo = list(r["messages"])
        if r["system"] and not (convo and convo[0]["role"] == "system"):
            convo = [{"role": "system", "content": r["system"]}] + convo
        if r["rating"] == "down" and only != "good":
            if r["correction"]:
                rows.append({"messages": convo + [{"role": "assistant", "content": r["correction"]}]})
            else:
                missing.append(r)
        elif r["rating"] == "up" and (include_good or only == "good") and only != "bad":
            rows.append({"messages": convo + [{"role": "assistant", "content": r["answer"]}]})
    return rows, missing


def conversation(r: dict) -> list[dict]:
    """The rated turn's conversation, with the system prompt it was answered under."""
    convo = list(r["messages"])
    if r["system"] and not (convo and convo[0]["role"] == "system"):
        convo = [{"role": "system", "content": r["system"]}] + convo
    return convo


def preference_rows(ratings: list[dict], kind: str, only: str | None = None) -> tuple[list[dict], dict]:
    """(rows, counts) for --kind pairs or kto; counts: written, duplicates, same_answer, no_correction."""
    rows, seen = [], set()
    counts = {"duplicates": 0, "same_answer": 0, "no_correction": 0}
    for r in ratings:
        if only is not None and r["rating"] != {"bad": "down", "good": "up"}[only]:
            continue
        convo = conversation(r)
        correction = (r["correction"] or "").strip()
        if kind == "pairs":
            if r["rating"] != "down":
                continue
            if not correction:
                counts["no_correction"] += 1
                continue
            if correction == r["answer"].strip():
                counts["same_answer"] += 1
                continue
            new = [{"messages": convo + [{"role": "assistant", "content": r["correction"]}],
                    "rejected_response": r["answer"]}]
        else:
            new = [{"messages": convo + [{"role": "assistant", "content": r["answer"]}], "label": r["rating"] == "up"}]
            if r["rating"] == "down" and correction == r["answer"].strip():
                counts["same_answer"] += 1  # the "correction" repeats the answer: it cannot also be desirable
            elif r["rating"] == "down" and correction:
                new.append({"messages": convo + [{"role": "assistant", "content": r["correction"]}], "label": True})
        for row in new:
            key = json.dumps(row, sort_keys=True, ensure_ascii=False)
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            rows.append(row)
    return rows, counts


@dataclass
class FeedbackExportArgs:
    db: str = ""
    """The feedback database written by keel deploy."""
    since: str | None = None
    """Only ratings from this date on (YYYY-MM-DD)."""
    only: str | None = None
    """bad or good: only that kind of rating."""
    include_good: bool = False
    """Also turn 👍 answers into training rows."""
    output: str = field(default="bad_cases.jsonl", metadata={"aliases": ["-o"]})
    """Where to write the rows (messages JSONL)."""
    kind: str = "sft"
    """sft (corrections as conversations), pairs (👎 + correction: chosen vs rejected, for keel rlhf dpo/orpo) or kto (rated answers + true/false labels)."""

    def __post_init__(self):
        if not self.db or not Path(self.db).is_file():
            raise KeelError(f"--db: feedback database '{self.db}' does not exist")
        if not Path(self.output).resolve().parent.is_dir():
            raise KeelError(f"--output: folder '{Path(self.output).parent}' does not exist")
        if self.kind not in ("sft", "pairs", "kto"):
            raise KeelError(f"--kind must be sft, pairs or kto, got '{self.kind}'")
        if self.only not in (None, "bad", "good"):
            raise KeelError(f"--only must be bad or good, got '{self.only}'")
        if self.since:
            try:
                datetime.date.fromisoformat(self.since)
            except ValueError:
                raise KeelError(f"--since must be a date like 2026-11-01, got '{self.since}'") from None


CONFIGS = (FeedbackExportArgs,)


def main(argv: list[str]):
    """keel feedback export --db FILE [--kind sft|pairs|kto] [--since DATE] [--only bad] [--include_good true] -o FILE"""
    if not argv or argv[0] != "export":
        raise KeelError("usage: keel feedback export --db FILE [-o bad_cases.jsonl]")
    (args,) = parse_flags(argv[1:], CONFIGS, prog="keel feedback export").configs
    ratings = FeedbackStore(args.db, readonly=True).ratings(args.since)
    if args.kind != "sft":
        rows, counts = preference_rows(ratings, args.kind, args.only)
        try:
            write_jsonl(args.output, rows)
        except OSError as e:
            raise KeelError(f"--output {args.output}: cannot write there ({e.strerror})") from None
        what = "preference pairs" if args.kind == "pairs" else "KTO rows"
        print(f"wrote {len(rows)} {what} to {args.output} from {len(ratings)} ratings; dropped "
              f"{counts['duplicates']} duplicate(s), {counts['same_answer']} correction(s) equal to the answer"
              + (f", {counts['no_correction']} 👎 without a correction" if args.kind == "pairs" else ""))
        return
    rows, missing = training_rows(ratings, args.only, args.include_good)
    try:
        write_jsonl(args.output, rows)
    except OSError as e:
        raise KeelError(f"--output {args.output}: cannot write there ({e.strerror})") from None
    print(f"wrote {len(rows)} training rows to {args.output} from {len(ratings)} ratings; "
          f"{len(missing)} bad rating(s) have no correction:")
    for r in missing:
        question = next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
        print(f"  {r['id']}  Q: {' '.join(question.split())[:80]}  A: {' '.join(r['answer'].split())[:80]}")
