"""Progress bars for long evaluations: one per task and set, with rate and ETA, then the time it took.

    progress = Progress()
    with progress.bar("tuned · mc arc_easy", total=2400, unit="choice") as step:
        ...; step(16)          # 16 more done
    progress.seconds           # {"tuned · mc arc_easy": 183.2}

`Progress(enabled=False)` (the in-training probe) only keeps the times.
"""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def bar(self, label: str, total: int, unit: str = "answer"):
        from tqdm.auto import tqdm

        start = time.time()
        with tqdm(total=total, desc=label, unit=unit, file=sys.stderr, disable=not self.enabled,
                  mininterval=1.0, dynamic_ncols=True) as bar:
            yield bar.update
        self.seconds[label] = round(time.time() - start, 1)
        if self.enabled:
            tqdm.write(f"{label}: {total} {unit}s in {self.seconds[label]} s", file=sys.stderr)
