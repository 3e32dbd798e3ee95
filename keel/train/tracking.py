"""Experiment tracking for `keel sft --report_to tensorboard|wandb|swanlab|none` (ms-swift's spelling).

    keel sft --dataset self_cognition.json --report_to tensorboard     # RUN_DIR/runs/ (tensorboard --logdir RUN_DIR)
    keel sft ... --report_to wandb swanlab                             # each installed tracker gets the same scalars

The scalars are exactly the numbers of each logging.jsonl line (loss, token_acc, learning_rate,
eval_loss, identity_hit, leakage, drift_kl, ...) at its global step, so a tracker shows what
`keel web-ui` and images/ plot. Trackers are optional packages: a missing one is a one-line error
naming the pip command, raised when the flags are read, before any model loads.
"""

from __future__ import annotations

import atexit
import importlib.util
from pathlib import Path

from keel.core.errors import KeelError

TRACKERS = ("tensorboard", "wandb", "swanlab")
PIP = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb", "swanlab": "pip install swanlab"}
_open: dict[tuple[str, str], object] = {}  # (tracker, run folder) -> its writer, opened at the first line


def check_report_to(names: list[str]) -> list[str]:
    """The trackers to write to ('none' and an empty list mean none); KeelError for an unknown or missing one."""
    names = [n.strip().lower() for n in names if n.strip()]
    if names in ([], ["none"]):
        return []
    for name in names:
        if name not in TRACKERS:
            raise KeelError(f"--report_to must be tensorboard, wandb, swanlab or none, got '{name}'")
        if importlib.util.find_spec(name) is None:
            raise KeelError(f"--report_to {name}: the {name} package is not installed ({PIP[name]})")
    return names


def scalars(record: dict) -> dict[str, float]:
    """The numeric values of one logging.jsonl line ("global_step/max_steps" is text, so it is left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "global_step"}


def _open_writer(name: str, run_dir: Path, config: dict):
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(run_dir / "runs"))
    module = __import__(name)
    if name == "wandb":
        module.init(project="keel", name=run_dir.name, dir=str(run_dir), config=config)
    else:
        (run_dir / "swanlog").mkdir(exist_ok=True)  # swanlab wants its logdir to exist
        module.init(project="keel", experiment_name=run_dir.name, logdir=str(run_dir / "swanlog"), config=config)
    return module


def _close_all():
    for (name, _), writer in list(_open.items()):
        if name == "tensorboard":
            writer.close()
        else:
            writer.finish()
    _open.clear()


atexit.register(_close_all)


def report(report_to: list[str], run_dir: Path, record: dict, step: int, config: dict | None = None):
    """Write one logging.jsonl line's scalars to every tracker in `report_to` (opened on first use)."""
    for name in check_report_to(report_to):
        key = (name, str(run_dir))
        if key not in _open:
            _open[key] = _open_writer(name, Path(run_dir), config or {})
        writer = _open[key]
        # train/loss, eval/eval_loss, eval/identity_hit: every tracker groups the curves as the web UI does
        values = {f"{'eval' if k.startswith('eval_') or k in PROBES else 'train'}/{k}": v for k, v in scalars(record).items()}
        if name == "tensorboard":
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
            writer.flush()  # a step's curve is visible at once, as the web UI's is
        else:
            writer.log(values, step=step)


PROBES = ("identity_hit", "identity_robustness", "leakage", "drift_kl")
