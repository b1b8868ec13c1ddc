"""Lightning's WandbLogger, with one W&B run per training job.

Lightning's logger never finishes its run: in a Hydra multirun, whose jobs share one process, every later job's
logger attaches to the first job's run ("There is a wandb run already in progress ..."), so a sweep's jobs overwrite
each other in one run. This logger finishes its run when training ends (success, failure or preemption), and leaves
a pointer to it in the run folder (the run's config holds `paths.output_dir`, the way back).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

RUN_POINTER = "wandb_run.json"  # in the run folder: which W&B run holds this run's logs


class WandbLogger(LightningWandbLogger):
    """`lightning.pytorch.loggers.WandbLogger` whose run ends with the job that started it.

    Takes the same arguments. `anonymous` is not passed on unless set: W&B 0.31 warns on every run that the
    setting has no effect.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self) -> Any:
        started = self._experiment is not None
        run = super().experiment
        if not started and rank_zero_only.rank == 0 and self.save_dir:
            self._write_pointer(run)
        return run

    def _write_pointer(self, run: Any) -> None:
        record = {"id": run.id, "name": run.name, "group": run.group, "project": run.project,
                  "url": run.url, "offline": bool(run.settings._offline), "dir": str(Path(run.dir).parent)}
        path = Path(self.save_dir) / RUN_POINTER
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status in ("success", "finished") else 1)
