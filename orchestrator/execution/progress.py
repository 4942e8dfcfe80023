"""What a user watching a sweep wants on the console, instead of Tune's tables and Ray's
forwarded worker logs (both still in Ray's logs, and on the console with ``pouta -v``):

    [  0:12] tiles   a1b2c3d4 started   lambda_1=0.515 lambda_2=0.703
    [  1:40] tiles   a1b2c3d4 finished  val_pixel_ap=0.4123 at epoch 20 (best of tiles so far)
    [  2:00] tiles 3/8 finished, 2 running | pills 2/8 finished, 2 running | best val_pixel_ap: tiles 0.4123 ...

Numbers are shown to four significant digits.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from ray.tune import Callback

from orchestrator.spec import CONFIRM_OF, DEFAULT_TRIAL, SAMPLED, decode_sampled, short


class ProgressPrinter(Callback):
    def __init__(self, metric: str, mode: str, categories: list[str], *, interval_s: float = 60.0,
                 out: IO[str] | None = None) -> None:
        self.metric, self.mode = metric, mode
        self.categories = categories
        self.interval_s = interval_s
        self.out = out
        self.start = time.monotonic()
        self.last_status = self.start
        self.best: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:     # Tune pickles callbacks with its state
        return {**self.__dict__, "out": None}

    def _print(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        print(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {text}", file=self.out or sys.stdout, flush=True)

    def _category(self, trial) -> str:
        return (trial.config or {}).get("category", "?")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        values = decode_sampled((trial.config or {}).get(SAMPLED, {}))
        shown = " ".join(f"{k}={short(v)}" for k, v in values.items())
        if (trial.config or {}).get(CONFIRM_OF):
            shown = f"confirms {trial.config[CONFIRM_OF]} on fresh seed {values.get('seed')}"
        elif (trial.config or {}).get(DEFAULT_TRIAL):
            shown = (f"default ({'the space reference ' + shown if shown else 'the base config'}: "
                     "what the sweep's choice is compared with)")
        self._print(f"{self._category(trial):8} {trial.trial_id} started   {shown}".rstrip())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        value = result.get(self.metric)
        category = self._category(trial)
        note = ""
        if isinstance(value, int | float) and value == value and not (trial.config or {}).get(CONFIRM_OF):
            old = self.best.get(category)
            if old is None or (value > old if self.mode == "max" else value < old):
                self.best[category] = float(value)
                note = f" (best of {category} so far)"
        self._print(f"{category:8} {trial.trial_id} finished  {self.metric}={short(value)} "
                    f"at epoch {result.get('epoch', '?')}{note}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._print(f"{self._category(trial):8} {trial.trial_id} FAILED    (details: {trial.error_file or 'Ray logs'})")

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self.last_status < self.interval_s:
            return
        self.last_status = now
        parts = []
        for category in self.categories:
            mine = [t for t in trials if self._category(t) == category]
            done = sum(t.status == "TERMINATED" for t in mine)
            running = sum(t.status == "RUNNING" for t in mine)
            parts.append(f"{category} {done} finished, {running} running")
        best = " ".join(f"{c} {short(v)}" for c, v in self.best.items())
        self._print(" | ".join(parts) + (f" | best {self.metric}: {best}" if best else ""))
