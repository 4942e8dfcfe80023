import pytest

import search_spaces
from orchestrator.commands.sweep import parse_objectives
from orchestrator.execution.results import pareto_front
from orchestrator.execution.scheduling import optuna_space
from orchestrator.spec import DataSpec, Resources, TrialSpec, decode_sampled
from pouta_core.config import Config, ConfigError
from search_spaces import SearchSpaceError


@pytest.mark.parametrize("path", search_spaces.bundled(), ids=lambda p: p.name)
def test_every_bundled_space_loads_against_its_preset(path):
    base = Config.from_preset("paper")
    space = search_spaces.load(path, base)
    assert space.keys and all(k in Config.keys() for k in space.keys)


def test_bundled_files_cover_the_documented_spaces():
    names = {p.stem for p in search_spaces.bundled()}
    assert {"mss_lambdas", "focal", "schedule", "full", "ablation", "scoring", "contrast", "texture", "object"} <= names
    # full is the union of object and texture (object holds texture's keys and the foreground mask).
    texture, object_, full = (search_spaces.load(n) for n in ("texture", "object", "full"))
    dims = [{d.key: d for d in s.dimensions} for s in (texture, object_, full)]
    assert all(small.items() < large.items() for small, large in zip(dims, dims[1:], strict=False))
    assert dims[1].keys() - dims[0].keys() == {"foreground_threshold"}
    assert texture.scoring == object_.scoring and texture.scoring.items() <= full.scoring.items()
    ablation = search_spaces.load("ablation")
    assert ablation.has_grid and list(ablation.dimensions[0].values) == [
        "vanilla", "pouta-base", "pouta-hsg", "pouta-mss", "pouta"]


def write(tmp_path, text):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "needle"), [
    ("space:\n  lambda_9: {distribution: uniform, low: 0, high: 1}\n", "key 'lambda_9': is not a config key"),
    ("space:\n  lr: {distribution: uniform, low: 1, high: 0.1}\n", "key 'lr': 'low' (1) must be below 'high' (0.1)"),
    ("space:\n  lr: {distribution: loguniform, low: 0, high: 0.1}\n", "key 'lr': loguniform needs low > 0"),
    ("space:\n  lr: {distribution: normal, low: 0, high: 0.1}\n", "key 'lr': unknown distribution 'normal'"),
    ("space:\n  lr: {low: 0, high: 0.1}\n", "key 'lr': expected a mapping with a 'distribution'"),
    ("space:\n  epochs: {distribution: int, low: 1.5, high: 9}\n", "key 'epochs': 'low' must be an integer"),
    ("space:\n  focal_alpha: {distribution: uniform, low: 0.5, high: 2.0}\n",
     "key 'focal_alpha': value 2.0 is invalid: config key 'focal_alpha': must be in [0.0, 1.0]"),
    ("space:\n  variant: {distribution: grid, values: [pouta, draem]}\n", "key 'variant': value 'draem' is invalid"),
    ("space:\n  epochs: {distribution: int, low: 100, high: 800}\n",
     "key 'epochs': value 100 is invalid: config key 'lr_milestones': every milestone must be <= epochs"),
    ("space:\n  lr: {distribution: choice, values: []}\n", "key 'lr': choice needs a non-empty list of 'values'"),
    ("space:\n  lr: {distribution: uniform, low: 0.1, high: 0.2, step: 1}\n", "unexpected field(s) step"),
    ("lr: {distribution: uniform, low: 0.1, high: 0.2}\n", "expected a mapping with a non-empty 'space'"),
    ("space:\n  lr: !!python/object/apply:os.system [true]\n", "not valid YAML"),
    ("space:\n  lr: {distribution: uniform, low: 0.001, high: 0.01}\nreference: {epochs: 5}\n",
     "key 'epochs': is in 'reference' but not searched"),
    ("space:\n  focal_alpha: {distribution: uniform, low: 0.1, high: 0.9}\nreference: {focal_alpha: 3.0}\n",
     "in 'reference': config key 'focal_alpha': must be in [0.0, 1.0]"),
    ("space:\n  image_score: {distribution: choice, values: [pooled_max, topk_mean]}\n",
     "key 'image_score': changes no weight: list its values under 'scoring:'"),
    ("space:\n  seed: {distribution: int, low: 1, high: 9}\nscoring:\n  lr: [0.1]\n",
     "key 'lr': is in 'scoring' but not a scoring key"),
    ("space:\n  seed: {distribution: int, low: 1, high: 9}\nscoring:\n  image_score_pool: [21, 10]\n",
     "key 'image_score_pool': scoring value 10 is invalid: config key 'image_score_pool': must be odd"),
    ("space:\n  seed: {distribution: int, low: 1, high: 9}\nscoring:\n  score_norm: []\n",
     "key 'score_norm': 'scoring' needs a non-empty list of values"),
    ("space:\n  seed: {distribution: int, low: 1, high: 9}\nscoring: [score_norm]\n",
     "'scoring' must be a mapping of scoring keys to lists of values"),
])
def test_bad_space_names_file_key_and_problem(tmp_path, text, needle):
    with pytest.raises(SearchSpaceError) as exc:
        search_spaces.load(write(tmp_path, text))
    assert str(exc.value).startswith(str(tmp_path / "space.yaml"))
    assert needle in str(exc.value)


def test_a_space_names_its_own_reference_point_for_the_default_trial(tmp_path):
    # Issue 30: the sweep's default is the base config, unless the space names the values its
    # choice must beat; those are the default trial's, on every one of its seeds.
    from orchestrator.execution.scheduling import sweep_search

    p = write(tmp_path, "space:\n  lambda_1: {distribution: uniform, low: 0.0, high: 1.0}\n"
                        "reference: {lambda_1: 0.7}\n")
    space = search_spaces.load(p)
    assert space.reference == {"lambda_1": 0.7}
    sweep = sweep_search(space, {"tiles": Config()}, [("val_pixel_ap", "max")], run_name="r", seed=0, num_samples=1,
                         scheduler="none", storage_url=f"sqlite:///{tmp_path / 'o.db'}", resume=False)
    assert sweep.search_alg.suggest("d") == {"category": "tiles", "sampled": {"lambda_1": 0.7}, "default": True}


def test_fixed_keys_are_validated_and_applied(tmp_path):
    p = write(tmp_path, "space:\n  lr: {distribution: uniform, low: 0.001, high: 0.01}\n"
                        "fixed: {epochs: 20, lr_milestones: [10]}\n")
    space = search_spaces.load(p)
    # The sweep's own path: fixed keys over the base, then the trial's sampled values.
    spec = TrialSpec(data=DataSpec.of("data", "mvtec"), resources=Resources(),
                     base_config=Config().replace(**space.fixed), tune_name="t", storage_path="/tmp")
    cfg = spec.config_for("tiles", {"lr": 0.005})
    assert (cfg.epochs, cfg.lr_milestones, cfg.lr) == (20, (10,), 0.005)
    bad = write(tmp_path, "space:\n  lr: {distribution: uniform, low: 0.001, high: 0.01}\nfixed: {epochs: 0}\n")
    with pytest.raises(SearchSpaceError, match="in 'fixed': config key 'epochs'"):
        search_spaces.load(bad)


def test_optuna_space_carries_list_choices_as_strings_and_back():
    space = search_spaces.load("schedule")
    dists = optuna_space(space)
    assert set(dists) == {f"sampled/{k}" for k in space.keys}
    choices = dists["sampled/lr_milestones"].choices
    assert all(isinstance(c, str) for c in choices)
    assert decode_sampled({"lr_milestones": choices[0], "lr": 0.1}) == {"lr_milestones": [320, 360], "lr": 0.1}
    assert dists["sampled/lr"].log and dists["sampled/epochs"].step == 100


def test_objectives_select_on_validation_and_reject_bad_items():
    assert parse_objectives("pixel_ap:max,latency_ms:min", "x", "max") == [("val_pixel_ap", "max"),
                                                                          ("latency_ms", "min")]
    assert parse_objectives(None, "pixel_ap", "max") == [("val_pixel_ap", "max")]
    with pytest.raises(ConfigError, match="expected metric:max|min items, got 'pixel_ap'"):
        parse_objectives("pixel_ap", "x", "max")
    with pytest.raises(ConfigError, match="metric 'test_pixel_ap': choices are made on validation metrics only"):
        parse_objectives(None, "test_pixel_ap", "max")


def test_a_space_cannot_search_the_validation_split(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("space:\n  val_ratio: {distribution: uniform, low: 0.2, high: 0.5}\n")
    with pytest.raises(ConfigError, match="key 'val_ratio': chooses the validation images"):
        search_spaces.load(str(path), Config())


def test_pareto_front_keeps_only_non_dominated_trials():
    rows = [{"t": 1, "q": 0.9, "lat": 10.0}, {"t": 2, "q": 0.8, "lat": 5.0}, {"t": 3, "q": 0.7, "lat": 8.0},
            {"t": 4, "q": 0.9, "lat": 12.0}]
    front = pareto_front(rows, [("q", "max"), ("lat", "min")])
    assert sorted(r["t"] for r in front) == [1, 2]


def test_asha_runs_to_the_most_epochs_the_space_can_sample():
    """full.yaml searches epochs 400..800 over the paper preset's 600: ASHA's max_t follows the
    space, not the preset (issue 27); a space without epochs keeps the config's own."""
    from orchestrator.execution.schedulers import asha

    paper = Config.from_preset("paper")
    full = asha({"tiles": paper}, search_spaces.load("full", paper), num_samples=8, keep=2).schedulers["tiles"]
    assert (full._max_t, full._brackets[0]._rungs[-1][0]) == (800, 100)   # 8 samples for 2: a quarter of the fewest
    fixed = asha({"tiles": paper}, search_spaces.load("mss_lambdas", paper)).schedulers["tiles"]
    assert fixed._max_t == paper.epochs == 600


def test_searchers_take_one_objective_as_names_and_several_as_lists(tmp_path):
    from orchestrator.execution.scheduling import metric_and_mode, optuna_search

    assert metric_and_mode([("val_pixel_ap", "max")]) == {"metric": "val_pixel_ap", "mode": "max"}
    two = [("val_pixel_ap", "max"), ("latency_ms", "min")]
    assert metric_and_mode(two) == {"metric": ["val_pixel_ap", "latency_ms"], "mode": ["max", "min"]}
    search = optuna_search(search_spaces.load("mss_lambdas"), two, f"sqlite:///{tmp_path / 'o.db'}", "s", 0, False)
    assert (search.metric, search.mode) == (["val_pixel_ap", "latency_ms"], ["max", "min"])
