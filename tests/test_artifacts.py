"""What MLflow gets per trial at the paper's size (issue 28): a few hundred kB for every trial,
weights (without the optimizer state) for the registered version only, once (issue 32). Built at the paper
preset with one optimizer step, not trained: sizes depend on the architecture, not the epoch."""

from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from orchestrator import tracking
from orchestrator.execution.worker import write_heatmaps
from orchestrator.tracking.callback import trial_artifacts
from orchestrator.tracking.models import resolved
from orchestrator.tracking.registry import log_image_model
from pouta_core import checkpoint as ckpt
from pouta_core.config import Config
from pouta_core.data.datasets import EvalDataset
from pouta_core.training import new_state, save

MB = 1024 * 1024


def test_a_paper_sized_trial_logs_under_2_mb_and_the_registered_weights_carry_no_optimizer(tmp_path):
    config = Config.from_preset("paper")
    state = new_state(config, torch.device("cpu"))
    state.epoch = config.epochs
    # One Adam step: its two moments per parameter are what made a checkpoint three times the weights.
    loss = sum(p.float().square().sum() for p in state.model.parameters() if p.requires_grad)
    loss.backward()
    state.optimizer.step()
    folder = tmp_path / "checkpoint_000059"
    save(state, folder, config, {"epoch": config.epochs, "val_pixel_ap": 0.5},
         sidecars={ckpt.VAL_FILES: {"files": [f"test/crack/{i:03d}.png" for i in range(40)]}})
    # The grid of the final checkpoint, at the most examples it shows (8), of noise images: real
    # photographs compress better than noise.
    g = torch.Generator().manual_seed(0)
    size = config.image_size
    shown = EvalDataset(torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=g),
                        (torch.rand(8, 1, size, size, generator=g) > 0.9).float(), torch.tensor([0, 1] * 4))
    write_heatmaps(folder, shown, torch.device("cpu"))

    logged = trial_artifacts(folder)
    assert {p.name for p in logged} == {"config.yaml", "metrics.json", "heatmaps.png", "val_files.json"}
    assert sum(p.stat().st_size for p in logged) <= 2 * MB

    weights = sum(t.numel() * t.element_size() for t in state.model.state_dict().values())
    full = (folder / ckpt.CHECKPOINT).stat().st_size
    # The registered version: the image pyfunc over the model-only checkpoint, in a real store.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = MlflowClient(uri).create_experiment("paper", artifact_location=tracking.artifact_root(uri))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment):
        log_image_model(ckpt.load_state(folder), registered_model_name="pouta-paper")
    version = Path(mlflow.artifacts.download_artifacts("models:/pouta-paper/1", dst_path=str(tmp_path / "version")))
    registered = sum(p.stat().st_size for p in version.rglob("*") if p.is_file())
    assert registered <= weights + 2 * MB < full
    with resolved("models:/pouta-paper/1", uri) as path:      # what --model models:/... loads
        model, _, _ = ckpt.load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.model.state_dict().values(),
                                                 strict=True))
    per_trial = sum(p.stat().st_size for p in logged)
    print(f"paper preset: weights {weights / MB:.1f} MB, full checkpoint {full / MB:.1f} MB, "
          f"registered version {registered / MB:.1f} MB, per trial {per_trial / MB:.2f} MB")
