import pytest
import yaml

from pouta_core.config import PRESETS, Config, ConfigError, parse_overrides


def test_defaults_are_the_papers_hyperparameters():
    cfg = Config()
    assert (cfg.lambda_1, cfg.lambda_2, cfg.lambda_3, cfg.lambda_4) == (0.4, 0.3, 0.2, 0.1)
    assert (cfg.focal_alpha, cfg.focal_gamma) == (None, 2.0)
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (2e-4, 8, 600)
    assert cfg.lr_milestones == (480, 540) and cfg.lr_factor == 0.2
    assert cfg.image_size == 224 and cfg.variant == "pouta"


def test_paper_preset_equals_defaults_and_tiny_is_small():
    # The paper preset adds nothing to the defaults (which test_defaults pins to the paper),
    # and a preset is applied: tiny differs from the defaults in the keys it sets.
    assert PRESETS["paper"] == {} and Config.from_preset("paper") == Config()
    tiny = Config.from_preset("tiny")
    assert all(getattr(tiny, k) == (tuple(v) if isinstance(v, list) else v) for k, v in PRESETS["tiny"].items())
    assert tiny.image_size <= 64 and tiny.rec_width < Config().rec_width


def test_yaml_round_trip_preserves_every_key(tmp_path):
    cfg = Config.from_preset("tiny", ["variant=pouta-hsg", "lr_milestones=[5, 9]", "lambda_3=0.7"])
    path = tmp_path / "sub" / "config.yaml"
    cfg.to_yaml(path)
    assert Config.from_yaml(path) == cfg
    assert yaml.safe_load(path.read_text())["lr_milestones"] == [5, 9]
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left


def test_yaml_preset_key_is_applied_under_file_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nlr: 0.005\n")
    cfg = Config.from_yaml(path, ["seed=3"])
    assert cfg.image_size == PRESETS["tiny"]["image_size"] and cfg.lr == 0.005 and cfg.seed == 3


def test_overrides_parse_yaml_scalars_and_lists():
    assert parse_overrides(["lr=0.5", "detach_features=true", "lr_milestones=[1,2]"]) == {
        "lr": 0.5, "detach_features": True, "lr_milestones": [1, 2]}


def test_exponent_without_dot_is_read_as_float():
    # YAML 1.1 loads "1e-3" as a string; users write it anyway.
    assert Config.from_preset("paper", ["lr=1e-3"]).lr == 1e-3


def test_integer_valued_float_is_accepted_for_int_key():
    assert Config(epochs=10.0, lr_milestones=(5,)).epochs == 10


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["lrr=0.1"], "unknown config key 'lrr' (did you mean 'lr'?)"),
        (["lr=0"], "config key 'lr': must be in (0.0, 1.0]"),
        (["lr=abc"], "config key 'lr': expected float"),
        (["batch_size=2.5"], "config key 'batch_size': expected int"),
        (["variant=draem"], "config key 'variant': must be one of vanilla, pouta-base"),
        (["image_size=100"], "config key 'image_size': must be a multiple of 32"),
        (["focal_alpha=1.5"], "config key 'focal_alpha': must be in [0.0, 1.0]"),
        (["detach_features=1"], "config key 'detach_features': expected bool"),
        (["lr_milestones=[9, 5]"], "config key 'lr_milestones': must be strictly increasing"),
        (["epochs=100"], "config key 'lr_milestones': every milestone must be <= epochs (100)"),
        (["lr_milestones=7"], "config key 'lr_milestones': expected a list of integers"),
        (["novalue"], "--set novalue: expected key=value"),
        (["lr=nan"], "--set lr=nan: config key 'lr': must be finite"),
    ],
)
def test_bad_values_are_rejected_with_key_and_range(overrides, needle):
    with pytest.raises(ConfigError) as exc:
        Config.from_preset("paper", overrides)
    assert needle in str(exc.value)


def test_error_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lambda_1: -1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config key 'lambda_1': must be in \[0\.0"):
        Config.from_yaml(path)


def test_non_mapping_yaml_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        Config.from_yaml(path)


def test_unknown_preset_is_rejected():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        Config.from_preset("huge")


def test_yaml_with_python_tags_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("lr: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="evil.yaml: not valid YAML"):
        Config.from_yaml(path)
