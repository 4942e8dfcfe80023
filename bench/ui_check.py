"""The demo's MLflow store seen in a real browser: ``make ui-check`` (after ``make demo``).

Starts ``pouta ui`` on the store (127.0.0.1, a free port), drives Debian's chromium through
Playwright, opens the sweep's parent run (its best metrics), its ``report`` artifacts (the
trials table and Optuna's plots), a trial's heat-map grid and the registered model's version
page (its description and metrics), saves a screenshot of each in ``bench-out/ui/`` and
fails, naming what is missing, when the page does not show it. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ui-check: pouta ui exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2).close()
            return
        time.sleep(0.5)
    raise SystemExit(f"ui-check: {url} did not answer within {timeout:.0f} s")


def artifact_size(uri: str, run_id: str, path: str) -> tuple[int, int]:
    """(width, height) of a PNG artifact, read through MLflow like the UI reads it."""
    import tempfile

    import mlflow
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=uri)
        with Image.open(local) as img:
            return img.size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'mlflow-data' / 'mlflow.db'}",
                    help="default: the store make demo writes, ./mlflow-data")
    ap.add_argument("--sweep", default="demo", help="the sweep's --name (default: demo)")
    ap.add_argument("--model", default="pouta-mvtec-tiles")
    ap.add_argument("--out", default=str(REPO / "bench-out" / "ui"))
    ap.add_argument("--browser", default="/usr/bin/chromium")
    args = ap.parse_args()
    uri, out = args.tracking_uri, Path(args.out)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise SystemExit(f"ui-check: {uri}: no such MLflow store (run `make demo` first)")
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pouta")
    if exp is None:
        raise SystemExit(f"ui-check: no experiment 'pouta' in {uri}")
    parents = client.search_runs([exp.experiment_id], f"tags.`pouta.kind` = 'sweep' and attributes.run_name = "
                                 f"'{args.sweep}'", order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise SystemExit(f"ui-check: no sweep named '{args.sweep}' in {uri}")
    parent = parents[0]
    version = client.get_model_version_by_alias(args.model, "challenger")
    trial = version.run_id

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = out / "mlflow-ui.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "pouta"), "ui", "--tracking-uri", uri, "--port",
                             str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    failures = []
    try:
        wait_up(f"{base}/health", proc)
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright

        run_url = f"{base}/#/experiments/{exp.experiment_id}/runs"
        # (screenshot, URL, tree items to click first, texts that must show, artifact image that must
        # show: the browser's image must have the artifact's own width and height)
        pid = parent.info.run_id
        pages = [
            ("1-parent-run", f"{run_url}/{pid}", [], ["best_val_pixel_ap.tiles", "best_test_pixel_ap.tiles"], None),
            ("2-parent-report-table", f"{run_url}/{pid}/artifacts", ["report", "trials.md"],
             ["tiles-history.png", "val_pixel_ap", "chosen"], None),
            ("3-parent-report-plot", f"{run_url}/{pid}/artifacts", ["report", "tiles-history.png"], [],
             (pid, "report/tiles-history.png")),
            ("4-trial-heatmaps", f"{run_url}/{trial}/artifacts", ["heatmaps.png"], [], (trial, "heatmaps.png")),
            ("5-model-version", f"{base}/#/models/{args.model}/versions/{version.version}", [],
             ["validation (chosen on)", "test (reported)", "val_pixel_ap"], None),
        ]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.browser, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            for name, url, clicks, expected, image in pages:
                page.goto("about:blank")      # a full load per page, not a hash change
                page.goto(url)
                missing = []
                for item in clicks:
                    try:
                        page.get_by_text(item, exact=True).first.click(timeout=30_000)
                    except PlaywrightTimeout:
                        missing.append(f"tree item {item}")
                for text in expected:
                    try:
                        page.get_by_text(text).first.wait_for(timeout=30_000)
                    except PlaywrightTimeout:
                        missing.append(text)
                if image:
                    w, h = artifact_size(uri, *image)
                    try:
                        page.wait_for_function(
                            "([w, h]) => Array.from(document.images).some(i => i.complete && "
                            "i.naturalWidth === w && i.naturalHeight === h && i.getBoundingClientRect().width > 0)",
                            arg=[w, h], timeout=30_000)
                    except PlaywrightTimeout:
                        missing.append(f"the image {image[1]} ({w}x{h})")
                page.wait_for_timeout(1500)     # images and charts finish drawing
                page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                status = "ok" if not missing else f"MISSING {missing}"
                print(f"{name:24} {status:40} {out / (name + '.png')}")
                if missing:
                    failures.append(f"{name}: {', '.join(missing)} not shown at {url}")
            browser.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    for f in failures:
        print(f"ui-check: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
