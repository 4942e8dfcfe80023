"""What a sweep tells its Optuna studies (no Ray cluster: the searcher Tune would drive)."""

import numpy as np
import optuna
from conftest import small_config
from optuna.trial import TrialState

import search_spaces
from orchestrator.execution.scheduling import default_study_storage, sweep_search
from orchestrator.execution.search import SEED_STEP, Confirmation


def report(search, trial_id: str, values: list[float]) -> dict:
    result = {}
    for epoch, value in enumerate(values, start=1):
        result = {"val_pixel_ap": value, "epoch": epoch, "training_iteration": epoch}
        search.on_trial_result(trial_id, result)
    return result


def test_an_asha_stopped_trial_is_pruned_in_its_study_and_a_full_one_complete(tmp_path):
    """ASHA stops a trial by ending it with a value: Ray's OptunaSearch told it COMPLETE, so its
    early value ranked with finished ones. It is PRUNED, its values per epoch kept."""
    storage = default_study_storage(str(tmp_path), "p")
    configs = {"tiles": small_config(epochs=4)}
    sweep = sweep_search(search_spaces.load("mss_lambdas"), configs, [("val_pixel_ap", "max")], run_name="p", seed=0,
                         num_samples=3, scheduler="asha", storage_url=storage, resume=False,
                         confirmation=Confirmation(0, 0))   # no confirmation round: the next test
    search = sweep.search_alg
    # The category's default first: the base config, outside the study (issue 30).
    assert search.suggest("d") == {"category": "tiles", "sampled": {}, "default": True}
    search.on_trial_complete("d", report(search, "d", [0.5, 0.5, 0.5, 0.5]))
    assert optuna.load_study(study_name="p-tiles", storage=storage).trials == []
    assert search.suggest("a")["category"] == search.suggest("b")["category"] == "tiles"
    search.on_trial_complete("a", report(search, "a", [0.1, 0.2]))             # stopped at epoch 2 of 4
    search.on_trial_complete("b", report(search, "b", [0.1, 0.2, 0.3, 0.4]))   # trained its 4 epochs
    trials = optuna.load_study(study_name="p-tiles", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[0].intermediate_values == {1: 0.1, 2: 0.2} and trials[1].value == 0.4
    # an errored trial stays FAIL, not PRUNED
    assert search.suggest("c")["category"] == "tiles"
    report(search, "c", [0.1])
    search.on_trial_complete("c", None, error=True)
    assert optuna.load_study(study_name="p-tiles", storage=storage).trials[2].state == TrialState.FAIL
    assert search.suggest("e") == "FINISHED" and sweep.num_samples == 4     # 3 searched + the default


def test_after_the_search_its_finalists_and_the_default_train_again_on_fresh_seeds(tmp_path):
    """Issue 30, part 2: once every searched trial has ended, the best full-length ones and the
    default are trained again, each on the same fresh seeds, outside the study; a driver that
    dies mid-round resumes it without training anything twice, and more seeds on --resume add
    trials."""
    storage = default_study_storage(str(tmp_path), "c")
    configs = {"tiles": small_config(epochs=4, seed=7)}
    sweep = sweep_search(search_spaces.load("mss_lambdas"), configs, [("val_pixel_ap", "max")], run_name="c",
                         seed=7, num_samples=4, scheduler="asha", storage_url=storage, resume=False,
                         confirmation=Confirmation(finalists=2, seeds=2))
    search = sweep.search_alg
    assert sweep.num_samples == 5 + 3 * 2          # the most Tune may be asked for
    assert search.suggest("d")["default"]
    params = {t: search.suggest(t) for t in "abcx"}
    for t, values in {"a": [0.2, 0.3, 0.4, 0.5], "b": [0.2, 0.3, 0.4, 0.6], "c": [0.5, 0.9]}.items():
        search.on_trial_complete(t, report(search, t, values))    # c: stopped by ASHA at 2 of 4
    search.on_trial_complete("d", report(search, "d", [0.1, 0.2, 0.3, 0.4]))
    # x still runs: the finalists are not known yet, so nothing starts, and the sweep is not done
    assert search.suggest("e") is None
    search.on_trial_complete("x", report(search, "x", [0.1, 0.1, 0.1, 0.1]))
    assert search.finalists("tiles") == ["b", "a"]          # c never trained to its end
    first = search.suggest("e")
    assert first == {"category": "tiles", "sampled": {"seed": 7 + SEED_STEP}, "default": True, "confirm_of": "d"}
    search.save(str(tmp_path / "searcher.pkl"))              # the driver dies here

    again = sweep_search(search_spaces.load("mss_lambdas"), configs, [("val_pixel_ap", "max")], run_name="c",
                         seed=7, num_samples=4, scheduler="asha", storage_url=storage, resume=True,
                         confirmation=Confirmation(finalists=2, seeds=3)).search_alg   # --resume --confirm-seeds 3
    confirmation, seeds = again.confirmation, dict(again.seeds)
    again.restore(str(tmp_path / "searcher.pkl"))
    again.reconfigure(confirmation, seeds)
    assert again.suggest("e") == first                       # Tune asks again for the trial it had
    started = [again.suggest(f"r{i}") for i in range(8)]
    assert again.suggest("r9") == "FINISHED"      # every seed started: nothing more to propose
    by = {(s["confirm_of"], s["sampled"]["seed"]) for s in started}
    assert by == {(t, 7 + k * SEED_STEP) for t in "dba" for k in (1, 2, 3)} - {("d", 7 + SEED_STEP)}
    assert [s["confirm_of"] for s in started] == list("ddbbbaaa")   # the default's seeds first
    assert started[2]["sampled"] == {**params["b"]["sampled"], "seed": 7 + SEED_STEP}   # b's config, a fresh seed
    for i in range(8):
        again.on_trial_complete(f"r{i}", {"val_pixel_ap": 0.5, "epoch": 4})
    assert again.suggest("z") == "FINISHED"
    # none of them is the study's: it holds the 4 searched trials alone
    assert len(optuna.load_study(study_name="c-tiles", storage=storage).trials) == 4

    # No searched trial trained to its end (stopped by ASHA, or errored): nothing to compare
    # the default with, so no round.
    alone = sweep_search(search_spaces.load("mss_lambdas"), configs, [("val_pixel_ap", "max")], run_name="c2",
                         seed=7, num_samples=2, scheduler="asha", storage_url=storage, resume=False).search_alg
    assert alone.suggest("d2")["default"] and alone.suggest("s1") and alone.suggest("s2")
    search_results = {"d2": [0.1, 0.2, 0.3, 0.4], "s1": [0.9, 0.9]}
    for t, values in search_results.items():
        alone.on_trial_complete(t, report(alone, t, values))
    alone.on_trial_complete("s2", None, error=True)
    assert alone.finalists("tiles") == [] and alone.suggest("e") == "FINISHED"


def test_asha_never_stops_the_default_trial(local_ray, tmp_path):
    # The weakest trial, last in line, is the default: ASHA would stop it at the first rung
    # (as it does the two others below the median); it trains to its end, the reference.
    from ray import tune
    from ray.tune import ExperimentAnalysis
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.execution.schedulers import PerCategoryScheduler

    def scripted(config):
        for epoch in range(1, 5):
            tune.report({"epoch": epoch, "val_pixel_ap": config["value"] * epoch})

    scheduler = PerCategoryScheduler(lambda c: ASHAScheduler(time_attr="epoch", max_t=4, grace_period=1,
                                                             reduction_factor=2), ["tiles"])
    tune.Tuner(scripted, param_space={"category": "tiles", "value": tune.grid_search([0.4, 0.3, 0.2, 0.1]),
                                      "default": tune.sample_from(lambda spec: spec.config.value == 0.1)},
               tune_config=tune.TuneConfig(metric="val_pixel_ap", mode="max", scheduler=scheduler,
                                           max_concurrent_trials=1),
               run_config=tune.RunConfig(name="asha-default", storage_path=str(tmp_path), verbose=0)).fit()
    trials = ExperimentAnalysis(str(tmp_path / "asha-default")).trials
    epochs = {t.config["value"]: t.last_result["epoch"] for t in trials}
    assert epochs == {0.4: 4, 0.3: 1, 0.2: 1, 0.1: 4}


def test_trials_of_several_workers_are_bounded_by_what_the_cluster_holds():
    from orchestrator.execution.tune_parts import trials_at_once
    from orchestrator.spec import Resources

    cluster = {"CPU": 16.0, "GPU": 8.0}
    assert trials_at_once(Resources(workers=2, cpus_per_worker=1, gpus_per_worker=1), cluster) == 4
    assert trials_at_once(Resources(workers=4, cpus_per_worker=2, gpus_per_worker=1), cluster) == 2
    assert trials_at_once(Resources(workers=2, cpus_per_worker=3), cluster) == 2     # CPUs only
    assert trials_at_once(Resources(workers=4, gpus_per_worker=1), {"CPU": 2.0}) == 1   # fits nowhere: the watchdog's


def publish_autoscaler_maximum(groups):
    """What KubeRay's (or the cluster launcher's) autoscaler publishes in the GCS: its node groups
    and their maxima (the key Ray Train v2 reads)."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    key, namespace = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    if groups is None:
        _internal_kv_del(key, namespace=namespace)
        return
    config = autoscaler_pb2.ClusterConfig()
    for resources, most in groups:
        group = config.node_group_configs.add()
        group.resources.update(resources)
        group.max_count = most
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=namespace)


def test_every_search_is_bounded_by_what_the_cluster_holds_at_its_autoscalers_maximum(local_ray):
    """Without a bound Tune keeps one trial pending for a custom searcher, and an autoscaler
    sees demand for one GPU at a time (issue 46): the bound is the autoscaler's maximum."""
    import os

    from orchestrator.execution import cluster
    from orchestrator.execution.tune_parts import trial_slots
    from orchestrator.spec import Resources

    one_cpu = Resources(cpus_per_worker=1)
    gpu = Resources(cpus_per_worker=7, gpus_per_worker=1)
    try:
        publish_autoscaler_maximum(None)
        room, grows = cluster.capacity()
        assert not grows and room["CPU"] == 1.0
        assert trial_slots(one_cpu, 0) == 1            # a fixed cluster: what it holds now (was: no bound)
        assert trial_slots(one_cpu, 3) == 3            # --max-concurrent wins
        # A GPU group of up to 4 nodes of 8 CPUs and 1 GPU, none up yet: 4 GPU trials at once.
        publish_autoscaler_maximum([({"CPU": 8, "GPU": 1}, 4), ({"CPU": 4}, 0)])
        room, grows = cluster.capacity()
        assert grows and room["GPU"] == 4 and room["CPU"] == 32
        assert trial_slots(gpu, 0) == 4
        # ... and a worker group may wait as long as the pending timeout for its nodes.
        saved = os.environ.pop(cluster.WORKER_GROUP_START_TIMEOUT_ENV, None)
        from orchestrator.plan import Plan
        from orchestrator.spec import DataSpec
        from pouta_core.config import Config

        plan = Plan(data=DataSpec.of("/data", "mvtec"), categories=("tiles",), base=Config(), run_name="x",
                    resources=gpu, pending_timeout=900)
        cluster.init_ray(plan)
        assert os.environ.pop(cluster.WORKER_GROUP_START_TIMEOUT_ENV) == "900"
        if saved is not None:
            os.environ[cluster.WORKER_GROUP_START_TIMEOUT_ENV] = saved
        # No maximum at all (-1): a bounded multiple of what is there now, never "every trial".
        publish_autoscaler_maximum([({"CPU": 8, "GPU": 1}, -1)])
        assert trial_slots(one_cpu, 0) == cluster.UNBOUNDED_SLOTS
    finally:
        publish_autoscaler_maximum(None)


def test_asha_rungs_are_rebuilt_from_a_restored_experiment(local_ray, tmp_path):
    """Tune saves the searcher, not the scheduler: a resumed sweep's ASHA started with empty
    rungs and let the next weak trial through. Rebuilt from the restored trials' results, a
    weak new trial is stopped at the first rung, as it would have been without the restart."""
    from ray import tune
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from orchestrator.execution.schedulers import PerCategoryScheduler

    def make(category):
        return ASHAScheduler(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2)

    def scripted(config):
        for epoch in range(1, 5):
            tune.report({"epoch": epoch, "val_pixel_ap": config["value"] * epoch})

    live = PerCategoryScheduler(make, ["tiles"])
    tune.Tuner(scripted, param_space={"category": "tiles", "value": tune.grid_search([0.4, 0.3, 0.2, 0.1])},
               tune_config=tune.TuneConfig(metric="val_pixel_ap", mode="max", scheduler=live, max_concurrent_trials=1),
               run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path), verbose=0)).fit()
    trials = ExperimentAnalysis(str(tmp_path / "asha")).trials
    assert sorted(t.last_result["epoch"] for t in trials) == [1, 1, 1, 4]   # ASHA stopped three

    def rungs(scheduler):
        return [(m, sorted(r.values())) for m, r in scheduler.schedulers["tiles"]._brackets[0]._rungs]

    def first_rung_decision(scheduler):
        new = Trial("scripted", config={"category": "tiles", "value": 0.05}, trial_id="new", stub=True)
        scheduler.on_trial_add(None, new)
        return scheduler.on_trial_result(None, new, {"epoch": 1, "val_pixel_ap": 0.05})

    restored, empty = PerCategoryScheduler(make, ["tiles"]), PerCategoryScheduler(make, ["tiles"])
    for scheduler in (restored, empty):
        scheduler.set_search_properties("val_pixel_ap", "max")
    for t in trials:
        restored.on_trial_add(None, t)
    assert rungs(restored)[-1] == (1, [0.1, 0.2, 0.3, 0.4])   # every trial's epoch-1 value
    assert first_rung_decision(restored) == TrialScheduler.STOP
    assert first_rung_decision(empty) == TrialScheduler.CONTINUE   # what a resume did before


def test_a_restored_trial_whose_checkpoint_is_gone_continues_from_the_newest_on_disk(local_ray, tmp_path, capsys):
    """The kill window: the saved experiment names a checkpoint that Tune deleted since
    (num_to_keep). Tune refused to restore the trial and it ended ERROR; it now continues from
    the newest checkpoint left in its folder, and says so."""
    import shutil
    from pathlib import Path

    from ray import tune

    from orchestrator.execution.schedulers import ResumingScheduler

    def counting(config):
        """Reports epochs 1-4 with a checkpoint each, from its checkpoint's epoch; fails at epoch 3
        while ``config["fail"]`` exists (a driver killed there, as far as Tune can tell)."""
        import tempfile
        from pathlib import Path

        from ray import tune

        start, checkpoint = 0, tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                start = int(Path(d, "epoch").read_text())
        for epoch in range(start + 1, 5):
            if epoch == 3 and Path(config["fail"]).exists():
                raise RuntimeError("interrupted")
            with tempfile.TemporaryDirectory() as d:
                Path(d, "epoch").write_text(str(epoch))
                tune.report({"epoch": epoch, "start": start}, checkpoint=tune.Checkpoint.from_directory(d))

    fail = tmp_path / "fail"
    fail.touch()
    first = tune.Tuner(counting, param_space={"fail": str(fail)},
                       tune_config=tune.TuneConfig(scheduler=ResumingScheduler()),
                       run_config=tune.RunConfig(name="gone", storage_path=str(tmp_path), verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(num_to_keep=2))).fit()
    recorded = Path(first[0].checkpoint.path)
    assert first[0].error is not None and recorded.name == "checkpoint_000001"
    # The window: the state names checkpoint_000001, which Tune removed since, and the trial
    # had persisted a newer one (its epoch 2) that the state never heard of.
    shutil.copytree(recorded.parent / "checkpoint_000000", recorded.parent / "checkpoint_000002")
    (recorded.parent / "checkpoint_000002" / "epoch").write_text("2")
    shutil.rmtree(recorded)
    fail.unlink()
    again = tune.Tuner.restore(str(tmp_path / "gone"), trainable=counting, resume_errored=True).fit()
    assert again[0].error is None
    assert again[0].metrics["epoch"] == 4 and again[0].metrics["start"] == 2   # from checkpoint_000002
    assert "its recorded checkpoint checkpoint_000001 is gone; continuing from checkpoint_000002" in \
        capsys.readouterr().out
    # Its next checkpoints are numbered after the newest on disk (before: it wrote into
    # checkpoint_000002 again, and Tune deleted it as an old one).
    assert Path(again[0].checkpoint.path).name == "checkpoint_000004" and Path(again[0].checkpoint.path).is_dir()


def test_a_trial_restores_the_newest_checkpoint_that_loads(tmp_path):
    """The worker's side of the same window (and Ray Train's checkpoints of a DDP trial): the
    recorded folder lacks checkpoint.pt, the newest other one was cut by the kill."""
    import ray.train
    import torch

    from orchestrator.execution.worker import restore_into
    from pouta_core import checkpoint as ckpt
    from pouta_core.training import new_state, save

    trial = tmp_path / "trial"
    config = small_config(epochs=1)
    state = new_state(config, torch.device("cpu"))
    state.epoch = 1
    save(state, trial / "checkpoint_000001", config, {"epoch": 1})
    (trial / "checkpoint_000002").mkdir()
    (trial / "checkpoint_000002" / ckpt.CHECKPOINT).write_bytes(b"cut")   # torn by the kill
    (trial / "checkpoint_000003").mkdir()                                    # recorded; its file is gone
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    note = restore_into(run_dir, ray.train.Checkpoint(str(trial / "checkpoint_000003")))
    assert note == "its checkpoint checkpoint_000003 is gone; continuing from checkpoint_000001, the newest on disk"
    assert ckpt.load_state(run_dir)["epoch"] == 1
    for name in ("checkpoint_000001", "checkpoint_000002"):
        (trial / name / ckpt.CHECKPOINT).unlink()
    note = restore_into(run_dir, ray.train.Checkpoint(str(trial / "checkpoint_000003")))
    assert note == "its checkpoint checkpoint_000003 is gone and no other loads; starting over"
    assert not any(run_dir.iterdir())


def test_a_trial_stopped_between_checkpoints_is_shown_by_the_epoch_its_checkpoint_holds(local_ray, tmp_path):
    """checkpoint_every is its own key (issue 28): a trial evaluated every epoch and checkpointed
    every second one, stopped after epoch 3, holds the weights of epoch 2. Its row (what the
    choice, the registry and the summary read) is that epoch's, never epoch 3's."""
    import json
    from pathlib import Path

    from ray import tune

    from orchestrator.execution.results import trial_rows
    from orchestrator.execution.trial import run_trial
    from orchestrator.spec import CHECKPOINT_EPOCH, DataSpec, Resources, TrialSpec
    from pouta_core.data.demo import generate

    (category,) = generate(tmp_path / "data", categories=1, image_size=32, n_train=4, n_test_good=2,
                           n_test_defect=2)
    spec = TrialSpec(DataSpec.of(str(tmp_path / "data"), "mvtec"), Resources(), small_config(
        epochs=4, checkpoint_every=2), "cadence", str(tmp_path / "ray"))
    assert spec.config_for(category).checkpoint_every == 2
    assert spec.config_for(category, {"eval_every": 3}).checkpoint_every == 3   # rounded up to an evaluation
    results = tune.Tuner(tune.with_parameters(run_trial, spec=spec), param_space={"category": category},
                         run_config=tune.RunConfig(name="cadence", storage_path=str(tmp_path / "ray"), verbose=0,
                                                   stop={"epoch": 3})).fit()
    last = results[0].metrics
    assert last["epoch"] == 3 and last[CHECKPOINT_EPOCH] == 2
    (row,) = trial_rows(results, ["val_pixel_ap", "val_image_auroc"])
    history = results[0].metrics_dataframe.set_index("epoch")
    assert row["epoch"] == 2 and row["val_pixel_ap"] == history.loc[2, "val_pixel_ap"]
    assert type(row["epoch"]) is int and type(row["val_pixel_ap"]) is float   # not numpy's: rows become YAML
    held = json.loads((Path(row["checkpoint"]) / "metrics.json").read_text())
    assert held["val_pixel_ap"] == row["val_pixel_ap"]
    # A metric no choice reads reached Tune packed (issue 28), and comes back from that epoch's report.
    assert "val_image_auroc" not in history and held["val_image_auroc"] == row["val_image_auroc"]
    # Epochs 1 and 3 were evaluated and reported, without a checkpoint.
    assert sorted(p.name for p in Path(results[0].path).glob("checkpoint_*")) == ["checkpoint_000000"]


def test_a_report_gives_tune_numbers_to_schedule_on_and_the_rest_packed():
    """Issue 28: Tune keeps statistics of every number a report holds, per trial, in each
    snapshot of its state. A report gives it the epoch, the checkpoint's epoch and the metrics
    the sweep chooses on as numbers; the rest travel as one string and come back intact."""
    import math

    from orchestrator.execution.results import FIGURES, packed, unpacked
    from orchestrator.spec import CHECKPOINT_EPOCH

    metrics = {"epoch": 3, CHECKPOINT_EPOCH: 2, "val_pixel_ap": 0.5, "val_image_auroc": np.float32(0.25),
               "loss_total": float("nan"), "nonfinite_steps": 1}
    report = packed(metrics, ("val_pixel_ap",))
    assert {k for k, v in report.items() if isinstance(v, int | float)} == {"epoch", CHECKPOINT_EPOCH, "val_pixel_ap"}
    assert isinstance(report[FIGURES], str)
    back = unpacked(report)
    assert set(back) == set(metrics) and back["val_image_auroc"] == 0.25 and math.isnan(back["loss_total"])
    assert FIGURES not in packed({"epoch": 1, "val_pixel_ap": 0.5}, ("val_pixel_ap",))   # nothing else: no string
    # A history row from before a report held figures: pandas fills NaN.
    assert unpacked({"epoch": 1, FIGURES: float("nan")}) == {"epoch": 1}
    assert unpacked(None) == {}


def test_studies_on_a_network_filesystem_are_a_journal_and_sqlite_there_is_refused(tmp_path):
    """Issue 28: SQLite's locks do not hold over NFS. A network filesystem cannot be mounted
    here, so the mount table is a file naming the test's folder as NFS (the only stand-in);
    the journal storage, its studies and their resume are real."""
    import re

    import pytest

    from orchestrator.execution.scheduling import (
        check_study_storage,
        fail_dangling_optuna_trials,
        open_study_storage,
        shared_filesystem,
    )
    from pouta_core.config import ConfigError

    shared, local = tmp_path / "shared", tmp_path / "local"
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {shared} nfs4 rw 0 0\n"
                      f"fuse-overlayfs {local} fuse.fuse-overlayfs rw 0 0\n")
    assert shared_filesystem(shared / "ray" / "exp", str(mounts)) == "nfs4"
    assert shared_filesystem(local / "ray", str(mounts)) is None
    assert shared_filesystem(tmp_path, str(mounts)) is None

    db = shared / "ray" / "optuna.db"
    journal = str(db.with_suffix(".journal"))[1:]
    with pytest.raises(ConfigError, match=re.escape(f"--study-storage sqlite:///{db}: {db} is on a network filesystem "
                       f"(nfs4), where SQLite's locks do not hold; use journal:///{journal} or a postgresql:// URL")):
        check_study_storage(f"sqlite:///{db}", str(mounts))
    assert check_study_storage(f"sqlite:///{local / 'optuna.db'}", str(mounts))
    assert check_study_storage(f"journal:///{db}", str(mounts))
    with pytest.raises(ConfigError, match="expected a database URL"):
        check_study_storage(str(db), str(mounts))

    url = default_study_storage(str(shared / "ray"), "exp", str(mounts))
    assert url == f"journal:///{str(shared / 'ray' / 'exp' / 'optuna.journal')[1:]}"
    assert default_study_storage(str(local / "ray"), "exp", str(mounts)).startswith("sqlite:///")
    configs = {"tiles": small_config(epochs=2)}
    space = search_spaces.load("mss_lambdas")
    first = sweep_search(space, configs, [("val_pixel_ap", "max")], run_name="exp", seed=0, num_samples=2,
                         scheduler="none", storage_url=url, resume=False)
    assert first.search_alg.suggest("default")["default"]      # the default first, outside the study
    first.search_alg.suggest("a")
    first.search_alg.on_trial_complete("a", report(first.search_alg, "a", [0.3, 0.5]))
    first.search_alg.suggest("b")   # asked, never told: its driver died
    # The experiment's journal is found again without the mount table saying NFS (a resume
    # from a machine that mounts it otherwise keeps the studies where they are).
    assert default_study_storage(str(shared / "ray"), "exp", str(tmp_path / "no-mounts")) == url
    again = sweep_search(space, configs, [("val_pixel_ap", "max")], run_name="exp", seed=0, num_samples=2,
                         scheduler="none", storage_url=url, resume=True)
    fail_dangling_optuna_trials(again)
    trials = optuna.load_study(study_name="exp-tiles", storage=open_study_storage(url)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL] and trials[0].value == 0.5
    from orchestrator.tracking.report import study_plots

    plots = study_plots(open_study_storage(url), {"tiles": "exp-tiles"}, [("val_pixel_ap", "max")])
    assert plots["tiles-history.png"].startswith(b"\x89PNG")


def test_an_experiment_started_before_a_config_key_existed_resumes_as_the_same_one(tmp_path):
    """Upgrading POUTA adds config keys (scale_lr, issue 29): the experiment's recorded
    definition lacks them, and had their defaults. A resume on the new code is the same
    experiment; a value other than the default is a change, and is refused."""
    import json

    import pytest

    from orchestrator.plan import DEFINITION_FILE, Plan
    from orchestrator.spec import DataSpec
    from pouta_core.config import ConfigError

    def plan(**changes):
        return Plan(data=DataSpec.of(str(tmp_path), "mvtec"), categories=["tiles"], base=small_config(**changes),
                    run_name="old", storage_path=str(tmp_path / "ray"), tracking_uri="sqlite:///x.db",
                    mlflow_experiment="x")

    new = plan()
    definition = new.definition({"tiles": "f"})
    new.record_definition(definition, "abc")
    path = new.experiment_path / DEFINITION_FILE
    recorded = json.loads(path.read_text())
    del recorded["definition"]["config"]["scale_lr"]   # written by a version without the key
    path.write_text(json.dumps(recorded))
    new.check_new_or_resumed(True, definition)
    changed = plan(scale_lr="linear")
    with pytest.raises(ConfigError, match="it differs in config.scale_lr"):
        changed.check_new_or_resumed(True, changed.definition({"tiles": "f"}))


def test_tunes_snapshot_period_grows_with_the_trials_and_a_users_own_wins(monkeypatch):
    """Issue 28: each of Tune's snapshots rewrites every trial's state. Up to 200 trials Tune's
    own "auto" period; beyond, one that grows with the trials (48 s at 960), set for the fit
    only; a TUNE_GLOBAL_CHECKPOINT_S the user set is left as it is."""
    import os

    from ray import tune

    from orchestrator.execution import tuner

    assert tuner.snapshot_period(120) == "auto" and tuner.snapshot_period(960) == "48"
    assert tuner.snapshot_period(10**6) == "300"
    seen = []
    monkeypatch.setattr(tuner, "make_tuner", lambda *a: None)
    monkeypatch.setattr(tuner, "fit", lambda _: seen.append(os.environ.get(tuner.SNAPSHOT_PERIOD_ENV)))
    monkeypatch.delenv(tuner.SNAPSHOT_PERIOD_ENV, raising=False)
    grid = {"category": tune.grid_search([f"c{i}" for i in range(15)]),
            "sampled": {"seed": tune.grid_search(list(range(16)))}}
    tuner.run(None, None, grid, tune.TuneConfig(num_samples=4), None, False)        # 15 x 16 x 4 = 960
    tuner.run(None, None, {}, tune.TuneConfig(num_samples=100), None, False)
    assert seen == ["48", "auto"] and tuner.SNAPSHOT_PERIOD_ENV not in os.environ
    monkeypatch.setenv(tuner.SNAPSHOT_PERIOD_ENV, "7")
    tuner.run(None, None, grid, tune.TuneConfig(num_samples=4), None, False)
    assert seen[-1] == "7"


def test_asha_keeps_the_finalists_best_searched_trials_to_the_end_and_its_rungs_follow_the_budget(tmp_path):
    # The default reports first and best: ASHA alone stops every searched trial below it at
    # the rung (what the demo's sweeps did); the floor lets the 2 best searched ones go on.
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from orchestrator.execution.schedulers import asha, rungs_for

    assert [rungs_for(n, 2) for n in (1, 2, 3, 4, 7, 8, 64)] == [0, 0, 0, 1, 1, 2, 2]
    assert rungs_for(4, 1) == 2
    space = tmp_path / "lr.yaml"
    space.write_text("space:\n  lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-2}\n")
    configs = {"tiles": small_config(epochs=8, eval_every=1)}

    def run(scheduler, values):
        decisions = {}
        for name, value in values:
            trial = Trial("t", config={"category": "tiles", "default": name == "default"}, trial_id=name, stub=True)
            scheduler.on_trial_add(None, trial)
            for epoch in range(1, 5):   # the one rung: epoch 4, a half of 8
                decision = scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_pixel_ap": value})
            decisions[name] = decision
        return decisions

    values = [("default", 0.9), ("a", 0.3), ("b", 0.5), ("c", 0.2), ("d", 0.6)]
    scheduler = asha(configs, search_spaces.load(space), num_samples=4, keep=2)
    scheduler.set_search_properties("val_pixel_ap", "max")
    assert scheduler.floors["tiles"].milestones == [4]
    assert run(scheduler, values) == {"default": TrialScheduler.CONTINUE, "a": TrialScheduler.CONTINUE,
                                      "b": TrialScheduler.CONTINUE, "c": TrialScheduler.STOP,
                                      "d": TrialScheduler.CONTINUE}   # c: 2 searched better at the rung
    alone = asha(configs, search_spaces.load(space), num_samples=4, keep=2)
    alone.set_search_properties("val_pixel_ap", "max")
    alone.floors.clear()
    assert run(alone, values) == {"default": TrialScheduler.CONTINUE, "a": TrialScheduler.STOP,
                                  "b": TrialScheduler.STOP, "c": TrialScheduler.STOP, "d": TrialScheduler.CONTINUE}
    # Two rungs (4 samples for 1) at a quarter and a half, on evaluations: 30 epochs every 5
    # gives 10 and 20 (7.5 rounded down, ASHA's doubling fitted a third rung at 28).
    thirty = asha({"tiles": small_config(epochs=30, eval_every=5)}, search_spaces.load(space), num_samples=4, keep=1)
    assert sorted(thirty.floors["tiles"].milestones) == [10, 20]
    assert [m for m, _ in thirty.schedulers["tiles"]._brackets[0]._rungs] == [20, 10]
    # A budget of 2 samples for 2 finalists affords no rung below the end: nothing is stopped.
    none = asha(configs, search_spaces.load(space), num_samples=2, keep=2)
    none.set_search_properties("val_pixel_ap", "max")
    assert none.floors["tiles"].milestones == []
    assert set(run(none, values[:3]).values()) == {TrialScheduler.CONTINUE}


def test_cpus_per_gpu_worker_come_from_the_tightest_gpu_node_less_one_for_ray():
    from orchestrator.execution.cluster import cpus_per_gpu_worker, size_cpus
    from orchestrator.plan import Plan
    from orchestrator.spec import DataSpec, Resources
    from pouta_core.config import Config

    def node(cpus, gpus, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    g5_2xlarge, p4d = node(8, 1), node(96, 8)
    assert cpus_per_gpu_worker([g5_2xlarge], 1) == 7          # 6 loader workers feed the GPU
    assert cpus_per_gpu_worker([p4d], 1) == 11
    assert cpus_per_gpu_worker([g5_2xlarge], 0.5) == 3         # two trials share the GPU and its CPUs
    assert cpus_per_gpu_worker([node(2, 0), node(0, 0), g5_2xlarge, p4d], 1) == 7   # CPU-only nodes do not count
    assert cpus_per_gpu_worker([node(2, 2)], 1) == 1           # never below one
    assert cpus_per_gpu_worker([node(8, 1, alive=False), node(4, 0)], 1) is None   # none up yet

    plan = Plan(data=DataSpec.of("/data", "mvtec"), categories=("tiles",), base=Config(), run_name="x",
                resources=Resources(gpus_per_worker=1, size_cpus=True))
    sized = size_cpus(plan, [g5_2xlarge])
    assert (sized.resources.cpus_per_worker, sized.resources.loader_workers, sized.resources.size_cpus) == (7, 6, False)
    given = Plan(data=plan.data, categories=plan.categories, base=plan.base, run_name="x",
                 resources=Resources(cpus_per_worker=2, gpus_per_worker=1))
    assert size_cpus(given, [g5_2xlarge]) is given              # --cpus-per-worker wins
    cpu_only = Plan(data=plan.data, categories=plan.categories, base=plan.base, run_name="x",
                    resources=Resources(size_cpus=True))
    assert size_cpus(cpu_only, [g5_2xlarge]).resources.cpus_per_worker == 1
