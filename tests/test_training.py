import json
import math

import pytest
import torch
import yaml
from conftest import small_config

from pouta_core import checkpoint as ckpt
from pouta_core.config import Config, ConfigError
from pouta_core.data.datasets import EvalDataset
from pouta_core.training import fit

CFG = small_config(batch_size=2, epochs=3, lr_milestones="[2]", checkpoint_every=1)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    masks = torch.zeros(4, 1, 32, 32, dtype=torch.uint8)
    masks[2:, :, 8:16, 8:16] = 1
    test = EvalDataset(images[:4], masks, torch.tensor([0, 0, 1, 1]))
    return images, test


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("synthesis", ["batched", "per_sample"])
def test_resume_equals_uninterrupted_training(tmp_path, data, synthesis):
    images, test = data
    cfg = CFG.replace(synthesis=synthesis)
    full = fit(cfg, images, tmp_path / "a", val_set=test, progress=False)

    def stop_after_first(metrics, checkpoint_dir):
        if metrics["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg, images, tmp_path / "b", val_set=test, progress=False, report=stop_after_first)
    assert ckpt.load_state(tmp_path / "b")["epoch"] == 1
    resumed = fit(cfg, images, tmp_path / "b", val_set=test, progress=False)
    a, b = ckpt.load_state(tmp_path / "a"), ckpt.load_state(tmp_path / "b")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert full["loss_total"] == resumed["loss_total"]


def test_loader_workers_change_nothing_but_speed(tmp_path, data):
    # Per-sample synthesis: two persistent worker processes synthesise every epoch's samples
    # with that epoch's seeds (EpochSampler passes the epoch with each index): the same
    # weights as in-process.
    images, test = data
    cfg = CFG.replace(synthesis="per_sample")
    fit(cfg, images, tmp_path / "a", val_set=test, progress=False, num_workers=0)
    fit(cfg, images, tmp_path / "b", val_set=test, progress=False, num_workers=2)
    a, b = ckpt.load_state(tmp_path / "a"), ckpt.load_state(tmp_path / "b")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_run_folder_holds_checkpoint_config_and_metrics(tmp_path, data):
    images, test = data
    fit(CFG, images, tmp_path, val_set=test, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.yaml", "metrics.json"]
    assert not any(k.startswith("test_") for k in json.loads((tmp_path / "metrics.json").read_text()))
    assert Config.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == CFG
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epoch"] == 3 and "val_pixel_auroc" in metrics and "loss_mss" in metrics
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["config"] == CFG.to_dict() and isinstance(state["threshold"], float)


def test_report_is_called_every_evaluation_with_the_checkpoint_dir(tmp_path, data):
    images, test = data
    calls = []
    cfg = CFG.replace(epochs=4, eval_every=2, checkpoint_every=4, lr_milestones=[3])
    fit(cfg, images, tmp_path, val_set=test, progress=False, report=lambda m, d: calls.append((m["epoch"], d)))
    assert calls == [(2, None), (4, tmp_path)]


def test_test_is_scored_with_every_checkpoint_and_validation_at_every_evaluation(tmp_path, data):
    # Test is only reported: scoring it at every evaluation was a pass over every pixel that
    # nothing read. The weights a trial holds (each checkpoint) still come with their figures.
    images, val = data
    test = EvalDataset(val.images, val.masks, val.labels)   # the same images, a separate set
    calls = []
    cfg = CFG.replace(epochs=5, eval_every=1, checkpoint_every=2, lr_milestones=[3])
    fit(cfg, images, tmp_path, val_set=val, test_set=test, progress=False,
        report=lambda m, d: calls.append((m["epoch"], d is not None, "test_pixel_ap" in m, "val_pixel_ap" in m)))
    assert calls == [(1, False, False, True), (2, True, True, True), (3, False, False, True),
                     (4, True, True, True), (5, True, True, True)]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_pixel_ap"] == pytest.approx(saved["val_pixel_ap"], abs=1e-9)


def test_validation_that_is_the_test_set_writes_both_at_every_evaluation(tmp_path, data):
    images, val = data
    seen = []
    cfg = CFG.replace(epochs=2, eval_every=1, checkpoint_every=2, lr_milestones=[])
    fit(cfg, images, tmp_path, val_set=val, test_set=val, progress=False,
        report=lambda m, d: seen.append(m["test_pixel_ap"] == m["val_pixel_ap"]))
    assert seen == [True, True]


def test_a_run_restored_at_its_last_epoch_reports_its_final_metrics_again(tmp_path, data):
    # A driver killed after the final checkpoint but before it recorded the report: the
    # restored trial must report its final metrics, else Tune sees no metric at all.
    images, test = data
    first = []
    fit(CFG, images, tmp_path, val_set=test, progress=False, report=lambda m, d: first.append((m, d)))
    again = []
    fit(CFG, images, tmp_path, val_set=test, progress=False, report=lambda m, d: again.append((m, d)))
    assert len(again) == 1 and again[0][1] == tmp_path
    assert again[0][0]["epoch"] == 3 and again[0][0]["val_pixel_ap"] == first[-1][0]["val_pixel_ap"]


def test_threshold_and_val_metrics_ignore_the_test_set(tmp_path, data):
    images, val = data
    test = EvalDataset(val.images, val.masks, val.labels)
    # Labels swapped, masks on the other images and elsewhere in them.
    scrambled = EvalDataset(val.images, val.masks.flip(0).roll((12, 12), dims=(2, 3)), 1 - val.labels)
    a = fit(CFG, images, tmp_path / "a", val_set=val, test_set=test, progress=False)
    b = fit(CFG, images, tmp_path / "b", val_set=val, test_set=scrambled, progress=False)
    assert a["threshold"] == b["threshold"]
    assert {k: v for k, v in a.items() if k.startswith("val_")} == {k: v for k, v in b.items() if k.startswith("val_")}
    assert a["test_image_auroc"] == pytest.approx(1 - b["test_image_auroc"])
    # Not vacuous when the tiny model scores every image alike (AUROC 0.5 both ways): its maps
    # are not flat, so masks elsewhere give other pixel metrics.
    assert a["test_pixel_auroc"] != pytest.approx(b["test_pixel_auroc"])


def test_resume_with_a_different_config_names_the_keys(tmp_path, data):
    images, _ = data
    fit(CFG.replace(epochs=1, lr_milestones=[]), images, tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"different config \(epochs, lr, lr_milestones\)"):
        fit(CFG.replace(lr=0.01), images, tmp_path, progress=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, {"model": {}, "epoch": 1})

    def crash(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, {"model": {}, "epoch": 2})
    assert ckpt.load_state(tmp_path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_resume_may_change_how_a_run_computes_but_not_what_it_learns(tmp_path, data):
    images, test = data
    cfg = CFG.replace(epochs=2, lr_milestones=[])
    fit(cfg, images, tmp_path / "run", val_set=test, progress=False)
    # channels_last, compile, amp and amp_dtype are how the steps run: a resume may change them
    later = cfg.replace(epochs=3, channels_last=True, amp=False, amp_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"different config \(epochs\)"):
        fit(later, images, tmp_path / "run", val_set=test, progress=False)
    fit(later.replace(epochs=2), images, tmp_path / "run", val_set=test, progress=False)


@pytest.mark.parametrize("saved_with_scaling", [False, True])
def test_a_resume_across_devices_and_precisions_restores_the_loss_scale_only_when_saved_and_wanted(
        tmp_path, saved_with_scaling):
    """A CPU (or bfloat16, or amp=false) checkpoint resumed with float16 loss scaling, and a
    float16 GPU checkpoint resumed without. No CUDA here: the scalers are CPU ones in the state
    CUDA's would be in (``GradScaler("cpu")`` shares ``load_state_dict`` with CUDA's)."""
    from pouta_core.training import new_state, restore, save

    cpu = torch.device("cpu")
    cfg = CFG.replace(epochs=2, lr_milestones=[])
    before = new_state(cfg, cpu)
    if saved_with_scaling:
        before.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    before.epoch = 1
    save(before, tmp_path / "run", cfg, {"epoch": 1})
    saved = ckpt.load_state(tmp_path / "run")["scaler"]
    assert bool(saved) == saved_with_scaling        # {} from a run without loss scaling
    for enabled in (True, False):
        after = new_state(cfg, cpu)
        after.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=enabled)
        restore(after, tmp_path / "run" / ckpt.CHECKPOINT, cfg, cpu)
        assert after.epoch == 1
        if enabled:   # the saved scale when there was one, else the default
            assert after.scaler.get_scale() == (1024.0 if saved_with_scaling else 2.0**16)


def test_amp_dtype_auto_is_bfloat16_where_the_gpu_has_it(monkeypatch):
    """No GPU here: what CUDA says of bfloat16 is stood in for; the choice is ours."""
    from pouta_core.training import autocast_dtype

    cuda, cfg = torch.device("cuda"), CFG.replace(amp=True)
    assert cfg.amp_dtype == "auto"                                           # the default
    for supported, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
        assert autocast_dtype(cfg, cuda) == expected
    assert autocast_dtype(cfg.replace(amp_dtype="float16"), cuda) == torch.float16   # asked for
    assert autocast_dtype(cfg, torch.device("cpu")) is None and autocast_dtype(cfg.replace(amp=False), cuda) is None
    # A Volta or Turing GPU: bfloat16 only emulated (torch's default check says yes): float16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert autocast_dtype(cfg, cuda) == torch.float16


def test_training_on_cuda_turns_on_cudnns_autotuner_for_its_fixed_input_size(monkeypatch):
    from pouta_core.training import use_device

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    use_device(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    use_device(torch.device("cuda"))   # nothing runs on it: the setting is what is checked
    assert torch.backends.cudnn.benchmark is True


def test_workers_say_what_they_do_to_the_recipe(caplog):
    """batch_size is per worker: 8 workers on 60 images (toothbrush) leave one step per epoch."""
    import logging

    from pouta_core.training import _batch_size

    with caplog.at_level(logging.INFO, logger="pouta_core.training"):
        assert _batch_size(CFG.replace(batch_size=8), 60, 8) == 7
    text = caplog.text
    assert "batch_size 7 per worker x 8 workers: global batch 56, 1 optimiser step(s) per epoch over 60 images" in text
    assert "8 worker(s) leave 1 optimiser step(s) per epoch over 60 images (one worker: 7)" in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pouta_core.training"):
        assert _batch_size(CFG.replace(batch_size=8), 60, 1) == 8
    assert caplog.text == ""                              # one worker: the recipe as written


def test_scale_lr_linear_multiplies_the_rate_by_the_workers_and_a_resume_keeps_its_own(tmp_path, data, caplog):
    import logging

    from pouta_core.training import new_state

    cpu = torch.device("cpu")
    lr_of = lambda state: state.optimizer.param_groups[0]["lr"]   # noqa: E731
    assert lr_of(new_state(CFG, cpu, world=4)) == CFG.lr                          # none: the default
    linear = CFG.replace(scale_lr="linear", epochs=2, eval_every=1, checkpoint_every=1, lr_milestones=[])
    assert lr_of(new_state(linear, cpu, world=4)) == 4 * CFG.lr
    assert lr_of(new_state(linear, cpu, world=1)) == CFG.lr
    images, test = data

    def stop(metrics, checkpoint_dir):
        raise Interrupt

    with caplog.at_level(logging.INFO, logger="pouta_core.training"), pytest.raises(Interrupt):
        fit(linear, images, tmp_path / "run", val_set=test, progress=False, shard=(0, 2), report=stop)
    assert f"lr {2 * CFG.lr:g} (scale_lr linear)" in caplog.text
    saved = ckpt.load_state(tmp_path / "run")
    assert saved["epoch"] == 1 and saved["optimizer"]["param_groups"][0]["lr"] == 2 * CFG.lr
    # Resumed by one worker: the rate is the checkpoint's (Adam's and the schedule's state).
    fit(linear, images, tmp_path / "run", val_set=test, progress=False)
    saved = ckpt.load_state(tmp_path / "run")
    assert saved["epoch"] == 2 and saved["optimizer"]["param_groups"][0]["lr"] == 2 * CFG.lr


def test_channels_last_trains_in_that_format(tmp_path, data):
    from pouta_core.training import new_state, train_step, training_net

    images, _ = data
    cfg = CFG.replace(channels_last=True)
    state = new_state(cfg, torch.device("cpu"))
    conv = next(p for p in state.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    batch = {"image": images[:2].float() / 255, "clean": images[:2].float() / 255,
             "mask": torch.zeros(2, 1, 32, 32)}
    terms, finite = train_step(state, training_net(state, cfg), batch, cfg, torch.device("cpu"))
    assert torch.isfinite(terms["total"]) and bool(finite)


def test_compile_wraps_the_model_and_shares_its_parameters():
    from pouta_core.training import new_state, training_net

    state = new_state(CFG.replace(compile=True), torch.device("cpu"))
    net = training_net(state, CFG.replace(compile=True))   # compiled lazily: nothing runs here
    assert net is not state.model and isinstance(net, torch._dynamo.eval_frame.OptimizedModule)
    assert {id(p) for p in net.parameters()} == {id(p) for p in state.model.parameters()}
    assert training_net(state, CFG) is state.model


def test_staged_training_trains_the_reconstructive_network_alone_first(tmp_path, data):
    from pouta_core.training import new_state

    images, test = data
    cfg = CFG.replace(rec_warmup_epochs=1, epochs=2, lr_milestones=())
    model = new_state(cfg, torch.device("cpu")).model   # fit seeds and builds the same
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}   # BN statistics still move
    seen = {}

    def keep(metrics, checkpoint_dir):
        seen[metrics["epoch"]] = ckpt.load_state(checkpoint_dir)["model"]

    fit(cfg, images, tmp_path / "run", val_set=test, progress=False, report=keep)

    def moved(epoch, prefix):
        return [k for k, v in initial.items() if k.startswith(prefix) and not torch.equal(seen[epoch][k], v)]

    assert moved(1, "reconstructive.") and not moved(1, "discriminative.")   # stage 1
    assert moved(2, "discriminative.")                                         # stage 2


def test_rec_warmup_must_leave_epochs_for_the_discriminator():
    with pytest.raises(ConfigError, match="config key 'rec_warmup_epochs': must be < epochs \\(3\\), got 3"):
        CFG.replace(rec_warmup_epochs=3)


class _Batches(list):
    """What train_epoch iterates: batches, and a sampler told the epoch."""

    class sampler:   # noqa: N801
        @staticmethod
        def set_epoch(epoch):
            pass


def _batch(images, nan=False):
    x = images[:2].float() / 255
    if nan:   # one pixel: the forward pass, the loss and every gradient are NaN
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
    return {"image": x, "clean": images[:2].float() / 255, "mask": torch.zeros(2, 1, 32, 32)}


def _adam_steps(state):
    return {int(s["step"]) for s in state.optimizer.state.values()}


def test_a_non_finite_step_is_skipped_and_counted_and_one_that_repeats_stops_the_run(data, device):
    # On CUDA (bench/gpu_check.sh) Adam is fused and skips on the device; on a CPU the flag is read.
    from pouta_core.training import new_state, train_epoch, training_net

    images, _ = data
    cpu = device
    state = new_state(CFG, cpu)
    net = training_net(state, CFG)
    good, nan = _batch(images), _batch(images, nan=True)
    metrics = train_epoch(state, net, _Batches([good, nan, good]), CFG, 1, device=cpu)
    assert metrics["nonfinite_steps"] == 1 and math.isfinite(metrics["loss_total"])   # the mean of the 2 others
    assert _adam_steps(state) == {2}
    weights = [p.detach().clone() for p in state.model.parameters()]
    metrics = train_epoch(state, net, _Batches([nan]), CFG, 2, device=cpu)           # skipped: nothing moves
    assert metrics["nonfinite_steps"] == 1 and _adam_steps(state) == {2}
    assert all(torch.equal(a, b) for a, b in zip(weights, state.model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    train_epoch(state, net, _Batches([nan]), CFG, 3, device=cpu)                      # two epochs in a row: on
    with pytest.raises(FloatingPointError, match=r"epoch 4: 1 of 1 steps .* \(3 epochs in a row"):
        train_epoch(state, net, _Batches([nan]), CFG, 4, device=cpu)
    # Most of one epoch is divergence too.
    with pytest.raises(FloatingPointError, match="epoch 5: 3 of 4 steps had a non-finite loss or gradient"):
        train_epoch(new_state(CFG, cpu), net, _Batches([nan, good, nan, nan]), CFG, 5, device=cpu)


def test_a_fused_adam_skips_a_non_finite_step_on_the_device(data, device):
    # The CUDA path (fused Adam, the flag as found_inf, nothing read on the host), on any device.
    from pouta_core.training import new_state, train_step, training_net

    images, _ = data
    state = new_state(CFG, device)
    state.optimizer = torch.optim.Adam(state.model.parameters(), lr=1e-3, fused=True)
    net = training_net(state, CFG)
    weights = [p.detach().clone() for p in state.model.parameters()]
    _, finite = train_step(state, net, _batch(images, nan=True), CFG, device)
    assert not bool(finite)
    assert all(torch.equal(a, b) for a, b in zip(weights, state.model.parameters(), strict=True))
    assert _adam_steps(state) <= {0}
    _, finite = train_step(state, net, _batch(images), CFG, device)
    assert bool(finite) and _adam_steps(state) == {1}
    assert not all(torch.equal(a, b) for a, b in zip(weights, state.model.parameters(), strict=True))


def test_a_training_step_with_batched_synthesis_reads_nothing_back_on_the_host(data, device):
    # Issue 29: on the CUDA path (fused Adam, batched synthesis on the device) a step, from
    # the loader's batch to the optimizer, has no op that reads a tensor back on the host
    # (the synthesis's draws are CPU tensors: left out).
    from pouta_core.benchmark import SYNC_OPS, top_level_ops
    from pouta_core.synthesis.batched import DRAW_SCOPE
    from pouta_core.training import make_loader, new_state, train_step, training_net

    images, _ = data
    cfg = CFG.replace(synthesis="batched", clean_ratio=0.5)
    state = new_state(cfg, device)
    state.optimizer = torch.optim.Adam(state.model.parameters(), lr=1e-3, fused=True)
    net = training_net(state, cfg)
    loader = make_loader(images, cfg, textures=None, batch_size=2, shard=(0, 1), num_workers=0, device=device)
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    next(batches)   # the first step pays the cached constants
    ops = top_level_ops(lambda: train_step(state, net, next(batches), cfg, device), skip=DRAW_SCOPE)
    assert sum(ops.values()) > 100 and not {name: n for name, n in ops.items() if name in SYNC_OPS}
    # The CPU path reads the step's finiteness to skip it (bool(finite)): the count sees it.
    state.optimizer = torch.optim.Adam(state.model.parameters(), lr=1e-3, fused=False)
    ops = top_level_ops(lambda: train_step(state, net, next(batches), cfg, device), skip=DRAW_SCOPE)
    assert any(name in SYNC_OPS for name in ops)
