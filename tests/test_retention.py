"""What a finished sweep leaves on the storage path (issue 46): the registered, default,
finalist and confirmation trials keep one checkpoint each, as inference weights; every other
trial keeps none. Real checkpoint files in Tune's layout; the sweeps of test_orchestrator.py
and test_mlflow_outage.py resume and register after it."""

import torch

from orchestrator.execution.retention import kept_trials, prune
from orchestrator.spec import CONFIRM_OF, DEFAULT_TRIAL
from pouta_core.checkpoint import load_state, save_checkpoint


def trial(root, trial_id, *, config=None, epochs=(1, 2)):
    """A trial folder as Tune leaves it: checkpoint_00000N/checkpoint.pt with the Adam state."""
    folder = root / f"run_trial_{trial_id}"
    for epoch in epochs:
        adam = {"exp_avg": torch.ones(64, 64), "exp_avg_sq": torch.ones(64, 64)}
        save_checkpoint(folder / f"checkpoint_{epoch:06d}", {
            "model": {"w": torch.ones(64, 64)}, "optimizer": {"state": {0: adam}},
            "scheduler": {"last_epoch": epoch}, "epoch": epoch})
    return {"trial_id": trial_id, "config": config or {}, "checkpoint": str(folder / f"checkpoint_{epochs[-1]:06d}")}


def test_only_the_trials_a_sweep_still_needs_keep_weights_and_those_without_training_state(tmp_path):
    rows = [trial(tmp_path, "default", config={DEFAULT_TRIAL: True}),
            trial(tmp_path, "finalist"), trial(tmp_path, "stopped", epochs=(1,)), trial(tmp_path, "also-ran"),
            trial(tmp_path, "confirm", config={CONFIRM_OF: "finalist"}),
            {"trial_id": "errored", "config": {}, "checkpoint": None}]
    summary = {"tiles": {"best": {"trial_id": "confirm"}, "trials": rows}}
    keep = kept_trials(summary)
    assert keep == {"default", "finalist", "confirm"}
    before = sum(f.stat().st_size for f in tmp_path.rglob("*.pt"))
    done = prune(rows, keep)
    assert (done.removed_trials, done.kept_trials) == (2, 3)
    assert not list((tmp_path / "run_trial_stopped").glob("checkpoint_*"))
    assert not list((tmp_path / "run_trial_also-ran").glob("checkpoint_*"))
    for name in keep:
        left = sorted(p.name for p in (tmp_path / f"run_trial_{name}").glob("checkpoint_*"))
        assert left == ["checkpoint_000002"], (name, left)        # the one its results name
        state = load_state(tmp_path / f"run_trial_{name}" / "checkpoint_000002")
        assert "optimizer" not in state and "scheduler" not in state and torch.equal(state["model"]["w"],
                                                                                     torch.ones(64, 64))
    after = sum(f.stat().st_size for f in tmp_path.rglob("*.pt"))
    assert done.removed_bytes == before - after and after < before / 5
    assert "2 trial(s) not kept" in done.line
