"""What a sweep, launch or retrain found, on its parent MLflow run and beside ``-best.yaml``:

- parent metrics ``best_val_<metric>.<category>`` and ``best_test_<metric>.<category>`` (the
  test values of the trial chosen on validation: reported, never used to choose);
- ``trials.csv`` and ``trials.md``: one row per trial, the searched values, validation and
  test metrics, and which trial was chosen;
- per category, Optuna's own plots (matplotlib): optimisation history, parameter
  importances, parallel coordinates, and the Pareto front of a multi-objective sweep.

Everything is written into a folder first and logged from there as the ``report`` artifact.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

from orchestrator.spec import short
from pouta_core.files import atomic_write

log = logging.getLogger(__name__)


def _cell(v: Any) -> str:
    """A table cell: :func:`~orchestrator.spec.short`, empty when there is no value."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else short(v)


def table(summary: dict[str, dict[str, Any]], keys: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """-> (columns, one row per trial of every category)."""
    from orchestrator.execution.results import SCORING
    from orchestrator.spec import CONFIRM_OF, DEFAULT_TRIAL, SAMPLED

    searched: list[str] = []
    rows = []
    for category, entry in summary.items():
        chosen = (entry.get("best") or {}).get("trial_id")
        for r in entry.get("trials", []):
            # the searched values and, where a trial trained to its end, the scoring it chose after
            values = {**(r.get("config") or {}).get(SAMPLED, {}), **(r.get(SCORING) or {})}
            searched += [k for k in values if k not in searched]
            rows.append({"category": category, "trial_id": r.get("trial_id"),
                         "chosen": "yes" if r.get("trial_id") == chosen and chosen else "",
                         "default": "yes" if (r.get("config") or {}).get(DEFAULT_TRIAL) else "",
                         # a confirmation trial: the trial whose config it trains again, on its seed
                         "confirms": (r.get("config") or {}).get(CONFIRM_OF) or "",
                         "epoch": r.get("epoch"), **values, **{k: r.get(k) for k in keys},
                         "error": (r.get("error") or "").splitlines()[0] if r.get("error") else ""})
    return ["category", "trial_id", "chosen", "default", "confirms", "epoch", *searched, *keys, "error"], rows


def _csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _markdown(title: str, columns: list[str], rows: list[dict[str, Any]], notes: list[str] = ()) -> str:
    lines = [f"# {title}", "", *(f"- {n}" for n in notes), *([""] if notes else []),
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


VERSUS_DEFAULT = ("delta", "low", "high", "p_better")


def best_metrics(summary: dict[str, dict[str, Any]], keys: list[str]) -> dict[str, float]:
    """``best_<split>_<metric>.<category>`` of each category's chosen trial, and
    ``vs_default_<delta|low|high|p_better>.<category>`` where it was compared with the default."""
    out = {}
    for category, entry in summary.items():
        for k, v in (entry.get("best") or {}).items():
            if k in keys and isinstance(v, int | float) and math.isfinite(v):
                out[f"best_{k}.{category}"] = float(v)
        verdict = entry.get("versus_default") or {}
        for k in VERSUS_DEFAULT if verdict.get("compared") else ():
            if math.isfinite(verdict[k]):
                out[f"vs_default_{k}.{category}"] = float(verdict[k])
    return out


def study_plots(storage, study_names: dict[str, str], objectives: list[tuple[str, str]]) -> dict[str, bytes]:
    """Optuna's matplotlib plots of each category's study in ``storage`` (an Optuna storage or
    its URL) -> PNG bytes by file name. A plot a study cannot have yet (importances need two
    finished trials that differ) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    names = [k.removeprefix("val_") for k, _ in objectives]
    multi = len(objectives) > 1
    first = {"target": (lambda t: t.values[0]) if multi else None, "target_name": f"val {names[0]}"}
    plots = {"history": lambda s: ovm.plot_optimization_history(s, **first),
             "importances": lambda s: ovm.plot_param_importances(s, **first),
             "parallel": lambda s: ovm.plot_parallel_coordinate(s, **first)}
    if multi:
        plots["pareto"] = lambda s: ovm.plot_pareto_front(s, target_names=[f"val {n}" for n in names])
    drawn: dict[str, bytes] = {}
    # *Decision*: the console of a sweep shows no library warnings (issue 45): Optuna's
    # ExperimentalWarning for its matplotlib module, its "no complete trials" log lines and
    # matplotlib's layout warnings say nothing a user can act on. A study without a complete
    # trial gets no plots, and the log says why.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for category, study_name in study_names.items():
                study = optuna.load_study(study_name=study_name, storage=storage)
                if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
                    log.info("no plots for %s: its study has no complete trials", category)
                    continue
                for kind, plot in plots.items():
                    try:
                        ax = plot(study)
                        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                        fig.set_size_inches(8, 5)
                        fig.suptitle(f"{category}: {kind}")
                        fig.tight_layout()
                        png = io.BytesIO()
                        fig.savefig(png, format="png", dpi=100)
                        drawn[f"{category}-{kind}.png"] = png.getvalue()
                    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                        log.info("no %s plot for %s yet: %s", kind, category, exc)
                    finally:
                        plt.close("all")
    finally:
        optuna.logging.set_verbosity(verbosity)
    return drawn


def write(folder: Path, title: str, summary: dict[str, dict[str, Any]], keys: list[str], *,
          study_storage: Any = None, study_names: dict[str, str] | None = None,
          objectives: list[tuple[str, str]] | None = None) -> list[Path]:
    """Write the report into ``folder`` -> its files. Everything is made first, then written
    (each file to a temporary name, renamed)."""
    columns, rows = table(summary, keys)
    notes = [e["versus_default"]["line"] for e in summary.values() if "line" in e.get("versus_default", {})]
    contents = {"trials.csv": _csv(columns, rows).encode(),
                "trials.md": _markdown(title, columns, rows, notes).encode()}
    if study_storage is not None and study_names:
        contents.update(study_plots(study_storage, study_names, objectives or []))
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        atomic_write(folder / name, lambda fh, d=data: fh.write(d))
    return [folder / name for name in contents]


def folder(parent: str | Path, run_name: str) -> Path:
    """Where a command's report is written: ``<parent>/<run_name>-report``."""
    return Path(parent) / f"{run_name}-report"


def publish(client, run_id: str, folder: Path, title: str, summary: dict[str, dict[str, Any]], keys: list[str],
            **plots: Any) -> Path:
    """Write the report into ``folder`` and onto the parent run (the best metrics as its
    metrics, the folder as its ``report`` artifact); a failure to draw or log it is a warning,
    never a failed sweep. -> ``folder``."""
    from orchestrator import tracking

    try:
        metrics = best_metrics(summary, keys)
        write(folder, title, summary, keys, **plots)
        tracking.log_metrics(client, run_id, metrics, step=0)
        client.log_artifacts(run_id, str(folder), artifact_path="report")
    except Exception as exc:  # noqa: BLE001 - the trained models matter more than their report
        log.warning("the report in %s is incomplete: %s", folder, exc)
    return folder
