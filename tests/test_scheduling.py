"""What a sweep tells its Optuna studies (no Ray cluster: the searcher Tune would drive)."""

import optuna
from conftest import small_config
from optuna.trial import TrialState

import search_spaces
from orchestrator.execution.scheduling import default_study_storage, sweep_search


def report(search, trial_id: str, values: list[float]) -> dict:
    result = {}
    for epoch, value in enumerate(values, start=1):
        result = {"val_pixel_ap": value, "epoch": epoch, "training_iteration": epoch}
        search.on_trial_result(trial_id, result)
    return result


def test_an_asha_stopped_trial_is_pruned_in_its_study_and_a_full_one_complete(tmp_path):
    """ASHA stops a trial by ending it with a value: Ray's OptunaSearch told it COMPLETE, so its
    early value ranked with finished ones. It is PRUNED, its values per epoch kept."""
    storage = default_study_storage(str(tmp_path))
    configs = {"tiles": small_config(epochs=4)}
    sweep = sweep_search(search_spaces.load("mss_lambdas"), configs, [("val_pixel_ap", "max")], run_name="p", seed=0,
                         num_samples=3, scheduler="asha", storage_url=storage, resume=False)
    search = sweep.search_alg
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


def test_trials_of_several_workers_are_bounded_by_what_the_cluster_holds():
    from orchestrator.execution.scheduling import trials_at_once
    from orchestrator.spec import Resources

    cluster = {"CPU": 16.0, "GPU": 8.0}
    assert trials_at_once(Resources(workers=2, cpus_per_worker=1, gpus_per_worker=1), cluster) == 4
    assert trials_at_once(Resources(workers=4, cpus_per_worker=2, gpus_per_worker=1), cluster) == 2
    assert trials_at_once(Resources(workers=2, cpus_per_worker=3), cluster) == 2     # CPUs only
    assert trials_at_once(Resources(workers=4, gpus_per_worker=1), {"CPU": 2.0}) == 1   # fits nowhere: the watchdog's
