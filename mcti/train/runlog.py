"""The run log OUT/metrics.jsonl: one JSON object per optimizer step, `{"step": n, ...}`.

Shared by `mcti train`, the DeepSpeed trainer (`training/`) and `mcti pretrain`. A resumed run
redoes the steps after its checkpoint, so it first trims the log to that step: every step is
logged once, and a line cut short by a killed process is dropped.
"""

import json
from pathlib import Path

from mcti.atomic import atomic_write


class RunLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def trim(self, last_step: int) -> None:
        """Keep the lines of steps <= `last_step` (0: none); drop unreadable lines."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))

    def append(self, record: dict) -> None:
        """Add one step's record (it must hold "step")."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
