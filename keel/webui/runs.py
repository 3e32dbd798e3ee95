"""Child processes (`python -m keel sft|eval|export|feedback ...`) and the run list, for `keel web-ui`.

    jobs = Jobs(roots=[Path("output")])
    job = jobs.start("train", ["sft", "--dataset", ...], folder=Path("output/keel"))   # returns at once
    jobs.stop(job["id"]); jobs.list(); list_runs(roots, jobs)

A job runs the same code as the CLI, in its own process group and session with its output in a log
file: closing the browser or restarting the UI does not stop it, and a crashing run takes only
itself down. What the UI knows about a job is a JSON file in ROOT/.webui/jobs/, written atomically,
so a restarted UI lists jobs it started before. A run folder is any folder under the roots holding
args.json and no adapter (`keel sft` writes those, from the UI or the CLI).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from keel.core.errors import KeelError
from keel.core.files import write_json

# A run from the CLI whose log grew within this many seconds and has no final checkpoint is taken as running.
RECENT_SECONDS = 120


def inside(path: str | Path, roots: list[Path]) -> Path:
    """`path` resolved, if it lies inside one of `roots` (symlinks followed); else KeelError."""
    if not str(path).strip() or "\0" in str(path) or len(str(path)) > 4096 or any(
            len(part) > 255 for part in Path(path).parts):  # names the filesystem would refuse with an OSError
        raise KeelError("path: empty, too long or holding a NUL byte")
    try:
        p = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):  # a name too long for the filesystem, a loop of links
        p = None
    if p is None or not any(p == r or p.is_relative_to(r) for r in roots):
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        raise KeelError(f"path '{shown}' is outside the output folders ({', '.join(map(str, roots))})")
    return p


def last_error(log: Path) -> str:
    """The one-line error a failed command printed (`keel: error: ...`), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("keel: error:")]
    return errors[-1] if errors else (lines[-1] if lines else "")


def alive(pid: int) -> bool:
    """Whether `pid` is a live process running keel (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): existence only
            return True
        except OSError:
            return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"keel" in cmd


class Jobs:
    """The child processes this UI started (and those a previous UI started in the same folders)."""

    def __init__(self, roots: list[Path]):
        self.roots = roots
        self.dir = roots[0] / ".webui" / "jobs"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, kind: str, argv: list[str], folder: Path, meta: dict | None = None) -> dict:
        """Start `python -m keel ARGV` in its own session; refuse a second live train job on `folder`."""
        if kind == "train":
            self.check_free(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}"
        log = self.dir / f"{job_id}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "keel", *argv], stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        except (OSError, ValueError) as e:  # argv too long or holding a NUL byte: no job, no log left behind
            log.unlink(missing_ok=True)
            raise KeelError(f"the {kind} job could not start ({e})") from None
        self.procs[job_id] = proc
        job = {"id": job_id, "kind": kind, "argv": argv, "folder": str(folder), "pid": proc.pid, "log": str(log),
               "started": time.time(), "status": "running", **(meta or {})}
        write_json(self.dir / f"{job_id}.json", job)
        return job

    def check_free(self, folder: Path):
        """KeelError when a run (a job of this UI, or a command started anywhere) is writing to `folder`."""
        mine = [j for j in self.list() if j["kind"] == "train" and Path(j["folder"]) == folder]
        ended = [(j["started"], j.get("ended", 0)) for j in mine if j["status"] != "running"]
        if any(j["status"] == "running" for j in mine) or cli_run_active(folder, ended):
            raise KeelError(f"output folder '{folder}' already has a run writing to it; "
                            "wait for it, stop it, or choose another folder")

    def read(self, job_id: str) -> dict:
        path = self.dir / f"{job_id}.json"
        # The length is checked before the name reaches the filesystem, which refuses a long one with its path.
        if not re.fullmatch(r"[\w-]{1,80}", job_id) or not path.is_file():
            raise KeelError(f"no job '{job_id[:80]}'" + ("..." if len(job_id) > 80 else ""))
        return self.refresh(json.loads(path.read_text(encoding="utf-8")))

    def refresh(self, job: dict) -> dict:
        """Update a running job's status from its process: done, failed (with its one-line error), stopped."""
        if job["status"] != "running":
            return job
        proc = self.procs.get(job["id"])
        code = proc.poll() if proc else (None if alive(job["pid"]) else "gone")
        if code is None:
            return job
        if code == "gone":  # started by an earlier UI: no exit status, the log says how it ended
            error = last_error(Path(job["log"]))
            code = 1 if error.startswith(("keel: error:", "Traceback")) or "Error" in error else 0
        job["returncode"] = code
        job["status"] = "stopped" if job.get("stopping") else ("done" if code == 0 else "failed")
        if job["status"] == "failed":
            job["error"] = last_error(Path(job["log"])) or f"exited with status {code}"
        job["ended"] = time.time()
        write_json(self.dir / f"{job['id']}.json", job)
        return job

    def list(self) -> list[dict]:
        if not self.dir.is_dir():
            return []
        jobs = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                jobs.append(self.refresh(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, KeyError):
                continue  # a job file another UI is writing right now
        return jobs

    def stop(self, job_id: str) -> dict:
        """SIGTERM to the job's process group (the command and anything it started)."""
        job = self.read(job_id)
        if job["status"] != "running":
            raise KeelError(f"job '{job_id}' is not running ({job['status']})")
        job["stopping"] = True
        write_json(self.dir / f"{job_id}.json", job)
        try:
            os.killpg(job["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc = self.procs.get(job_id)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(job["pid"], signal.SIGKILL)
                proc.wait()
        else:  # started by an earlier UI: not our child, so watch its pid
            end = time.time() + 10
            while alive(job["pid"]) and time.time() < end:
                time.sleep(0.1)
            if alive(job["pid"]):
                os.killpg(job["pid"], signal.SIGKILL)
        return self.refresh(job)

    def log_tail(self, job_id: str, chars: int = 8000) -> str:
        text = Path(self.read(job_id)["log"]).read_text(encoding="utf-8", errors="replace")
        return text[-chars:]


def run_folders(roots: list[Path], depth: int = 4) -> list[Path]:
    """Folders under the roots holding a run's args.json (a checkpoint holds an adapter too: not a run)."""
    found = []
    for root in roots:
        for d in range(1, depth + 1):
            for args in root.glob("/".join(["*"] * d) + "/args.json"):
                if not (args.parent / "adapter_config.json").exists() and ".webui" not in args.parts:
                    found.append(args.parent)
    return sorted(set(found))


def read_log(run_dir: Path) -> list[dict]:
    """logging.jsonl's lines (a half-written last line, while the run writes it, is skipped)."""
    rows = []
    path = run_dir / "logging.jsonl"
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((p for p in run_dir.glob("checkpoint-*") if (p / "adapter_config.json").is_file()
                   and p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))


def cli_run_active(folder: Path, ended: list[tuple[float, float]] = ()) -> bool:
    """A run under `folder` (started anywhere) that logged recently and has not saved its final checkpoint;
    a run written by one of this UI's jobs that has ended (`ended`: their start and end times) is not active."""
    for run in run_folders([folder], depth=2):
        born = (run / "args.json").stat().st_mtime
        if any(start <= born + 1 and born <= end for start, end in ended):
            continue
        log = run / "logging.jsonl"
        total = _total_steps(run)
        if log.is_file() and time.time() - log.stat().st_mtime < RECENT_SECONDS and \
                not (run / f"checkpoint-{total}").is_dir():
            return True
    return False


def _total_steps(run_dir: Path):
    try:
        return json.loads((run_dir / "args.json").read_text(encoding="utf-8")).get("total_steps")
    except (OSError, ValueError):
        return None


def list_runs(roots: list[Path], jobs: Jobs) -> list[dict]:
    """Every run folder under the roots, newest first, with the UI job that wrote it; UI train jobs that
    failed or were stopped before their run folder existed are listed too, with their error."""
    train_jobs = [j for j in jobs.list() if j["kind"] == "train"]
    matched, runs = set(), []
    for run in run_folders(roots):
        log, total, born = read_log(run), _total_steps(run), (run / "args.json").stat().st_mtime
        # The newest job on a folder holding this run that started before the run's folder was written.
        job = next((j for j in reversed(train_jobs) if run.is_relative_to(Path(j["folder"]))
                    and j["started"] <= born + 1), None)
        if job is not None:
            matched.add(job["id"])
        if job is not None and job["status"] == "running":
            status = "running"
        elif total and (run / f"checkpoint-{total}").is_dir():
            status = "done"
        elif job is not None:
            status = job["status"]
        elif log and time.time() - (run / "logging.jsonl").stat().st_mtime < RECENT_SECONDS:
            status = "running"
        else:
            status = "incomplete"
        last = log[-1] if log else {}
        runs.append({"path": str(run), "name": _name(run, roots), "status": status,
                     "step": last.get("global_step"), "total_steps": total, "loss": last.get("loss"),
                     "checkpoints": [str(c) for c in checkpoints(run)], "job": job["id"] if job else None,
                     "error": job.get("error") if job else None, "time": born})
    for job in train_jobs:
        if job["id"] not in matched:
            runs.append({"path": None, "name": _name(Path(job["folder"]), roots), "status": job["status"],
                         "step": None, "total_steps": None, "loss": None, "checkpoints": [], "job": job["id"],
                         "error": job.get("error"), "time": job["started"]})
    return sorted(runs, key=lambda r: -r["time"])


def _name(path: Path, roots: list[Path]) -> str:
    root = next((r for r in roots if path.is_relative_to(r)), None)
    return str(path.relative_to(root)) if root else str(path)
