"""--category-set: config values for one category of a launch / sweep / retrain (parsing and
the dry runs; test_orchestrator checks that the trials really train with them)."""

import pytest

from orchestrator import cli
from orchestrator.plan import parse_category_sets
from pouta_core.config import Config, ConfigError
from pouta_core.data.demo import generate

BASE = Config.from_preset("tiny")


def test_values_are_grouped_per_category_and_parsed_as_yaml():
    sets = parse_category_sets(["pills:foreground_threshold=0.3", "pills:epochs=190", "tiles:variant=vanilla"],
                               ["tiles", "pills"], BASE)
    assert sets == {"pills": {"foreground_threshold": 0.3, "epochs": 190}, "tiles": {"variant": "vanilla"}}
    assert parse_category_sets([], ["tiles"], BASE) == {}


@pytest.mark.parametrize("item, needle", [
    ("foreground_threshold=0.3", "expected CATEGORY:KEY=VALUE"),
    ("pills:foreground_threshold", "expected CATEGORY:KEY=VALUE"),
    ("screws:epochs=5", "category 'screws' is not among those to run (tiles, pills)"),
    ("pills:foreground_treshold=0.3", "foreground_treshold"),
    ("pills:foreground_threshold=1.5", "foreground_threshold"),
])
def test_bad_items_name_the_item_and_the_problem(item, needle):
    with pytest.raises(ConfigError) as err:
        parse_category_sets([item], ["tiles", "pills"], BASE)
    assert needle in str(err.value)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    generate(root, categories=2, image_size=32, n_train=2, n_test_good=1, n_test_defect=1)
    return root


def test_dry_runs_show_the_per_category_values(data, tmp_path, capsys):
    common = ["--data-root", str(data), "--dataset", "mvtec", "--preset", "tiny", "--storage-path",
              str(tmp_path / "ray"), "--category-set", "pills:foreground_threshold=0.3", "--dry-run"]
    assert cli.main(["launch", *common]) == 0
    assert capsys.readouterr().out.strip().endswith("; pills: foreground_threshold=0.3")
    assert cli.main(["sweep", "--space", "mss_lambdas", *common]) == 0
    assert "; pills: foreground_threshold=0.3" in capsys.readouterr().out
    assert not (tmp_path / "ray").exists()


def test_a_bad_category_set_fails_in_one_line_before_anything_starts(data, tmp_path, capsys):
    code = cli.main(["launch", "--data-root", str(data), "--dataset", "mvtec", "--storage-path",
                     str(tmp_path / "ray"), "--category-set", "screws:epochs=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "screws" in err
    assert not (tmp_path / "ray").exists()
    code = cli.main(["sweep", "--space", "mss_lambdas", "--data-root", str(data), "--dataset", "mvtec",
                     "--storage-path", str(tmp_path / "ray"), "--category-set", "pills:lambda_1=0.5", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "mss_lambdas.yaml searches this key" in err
    assert not (tmp_path / "ray").exists()


def test_a_val_ratio_one_category_cannot_split_fails_in_one_line_before_anything_starts(data, tmp_path, capsys):
    # pills's 4 test images (1 good) cannot give 0.95 to validation and keep a good and an
    # anomalous image for test: said once, naming the category, before Ray or MLflow start
    # (it was every trial's error, exit 5).
    for command in (["launch"], ["sweep", "--space", "mss_lambdas"]):
        code = cli.main([*command, "--data-root", str(data), "--dataset", "mvtec", "--preset", "tiny",
                         "--storage-path", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                         "--category-set", "pills:val_ratio=0.95"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{data} [pills]: val_ratio=0.95 leaves the test part without a good and an anomalous image" in err
        assert not (tmp_path / "ray").exists() and not (tmp_path / "m.db").exists()
