import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pouta_core.config import VARIANTS, Config
from pouta_core.model import build_model, image_score

TINY = Config.from_preset("tiny", ["rec_width=4", "disc_width=4", "fcm_width=4"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [32, 64, 96])
def test_forward_shapes_for_every_variant_and_size(variant, size, device):
    model = build_model(TINY, variant=variant, image_size=size).to(device).eval()
    x = torch.rand(2, 3, size, size, device=device)
    with torch.inference_mode():
        out = model(x)
    assert out.reconstruction.shape == (2, 3, size, size)
    assert out.logits.shape == (2, 2, size, size)
    assert out.anomaly_map.shape == (2, 1, size, size)
    assert out.score.shape == (2,)
    has_mss = variant in ("pouta-mss", "pouta")
    expected_scales = [(2, 2, size >> i, size >> i) for i in range(4)] if has_mss else []
    assert [tuple(t.shape) for t in out.scale_logits] == expected_scales
    assert 0.0 <= out.anomaly_map.min() and out.anomaly_map.max() <= 1.0


def _grad_norms(model, out):
    loss = out.logits.square().mean() + sum(t.square().mean() for t in out.scale_logits)
    loss.backward()
    return {name: (p.grad.abs().sum().item() if p.grad is not None else 0.0)
            for name, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_discriminative_loss_reaches_every_head_and_the_reconstructive_net(variant, device):
    torch.manual_seed(0)
    model = build_model(TINY, variant=variant, image_size=32).to(device).train()
    grads = _grad_norms(model, model(torch.rand(2, 3, 32, 32, device=device)))
    heads = [n for n in grads if n.split(".")[1] in ("fcm", "hsg", "mss", "fusion", "encoder", "ups")]
    assert heads, "no discriminator parameters found"
    for prefix in {".".join(n.split(".")[:3]) for n in heads}:
        assert any(g > 0 for n, g in grads.items() if n.startswith(prefix)), f"no gradient reaches {prefix}"
    assert any(g > 0 for n, g in grads.items() if n.startswith("reconstructive.encoder"))


@pytest.mark.parametrize("variant", ["vanilla", "pouta"])
def test_detach_features_keeps_discriminative_gradients_out_of_reconstruction(variant, device):
    model = build_model(TINY, variant=variant, image_size=32, detach_features=True).to(device).train()
    grads = _grad_norms(model, model(torch.rand(2, 3, 32, 32, device=device)))
    assert all(g == 0 for n, g in grads.items() if n.startswith("reconstructive."))
    assert any(g > 0 for n, g in grads.items() if n.startswith("discriminative."))


def test_mss_heads_exist_only_in_mss_variants():
    names = {v: {n.split(".")[1] for n, _ in build_model(TINY, variant=v).named_parameters()
                 if n.startswith("discriminative.")} for v in VARIANTS}
    assert names["pouta-base"] == {"fcm", "fusion"}
    assert names["pouta-hsg"] == {"fcm", "fusion", "hsg"}
    assert names["pouta-mss"] == {"fcm", "fusion", "mss"}
    assert names["pouta"] == {"fcm", "fusion", "hsg", "mss"}
    assert names["vanilla"] == {"encoder", "ups", "dbs", "to_logits"}


def test_vanilla_unet_has_six_encoder_blocks_w_to_8w():
    model = build_model(TINY, variant="vanilla", disc_width=8)
    widths = [blk[1][0].out_channels for blk in model.discriminative.encoder]
    assert widths == [8, 16, 32, 64, 64, 64]


def test_image_score_is_max_of_21x21_average_pool_on_hand_made_map():
    amap = torch.zeros(2, 1, 64, 64)
    amap[0, 0, 10:15, 20:25] = 1.0        # 25 hot pixels, well inside the image
    amap[1, 0, 0, 0] = 1.0                # one hot pixel in the corner: padding counts as 0
    score = image_score(amap)
    assert score[0].item() == pytest.approx(25 / 441)
    assert score[1].item() == pytest.approx(1 / 441)
    # A uniform map scores its value only where the window fits inside the image.
    assert image_score(torch.full((1, 1, 64, 64), 0.5)).item() == pytest.approx(0.5)


def test_score_equals_pooled_max_of_the_models_anomaly_map():
    model = build_model(TINY, image_size=64).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 3, 64, 64))
    pooled = F.avg_pool2d(out.anomaly_map, 21, stride=1, padding=10)
    assert out.score.item() == pytest.approx(pooled.max().item())
    assert torch.allclose(out.anomaly_map, torch.softmax(out.logits, 1)[:, 1:])


@pytest.mark.parametrize("variant", ["pouta", "vanilla"])
def test_state_dict_round_trip_with_weights_only_load(variant, tmp_path):
    torch.manual_seed(1)
    a = build_model(TINY, variant=variant).eval()
    torch.save(a.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(2)
    b = build_model(TINY, variant=variant).eval()
    b.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(a(x).anomaly_map, b(x).anomaly_map)


def test_paper_preset_matches_table5_parameter_counts():
    pouta = sum(p.numel() for p in build_model(variant="pouta").parameters()) / 1e6
    vanilla = sum(p.numel() for p in build_model(variant="vanilla").parameters()) / 1e6
    assert pouta == pytest.approx(15.02, abs=0.05)
    assert pouta / vanilla == pytest.approx(15.02 / 28.68, abs=0.02)


def test_draem_init_draws_conv_weights_from_n_0_002():
    model = build_model(Config(), variant="vanilla")
    w = model.discriminative.encoder[3][0][0].weight
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.05)


def test_pouta_core_imports_neither_ray_mlflow_nor_optuna():
    # Every module of pouta_core, found on disk (a new module is checked without being listed).
    code = ("import sys, pkgutil, importlib, pouta_core;"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(pouta_core.__path__, 'pouta_core.')];"
            "bad = [m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fcm_depth_adds_conv_blocks_to_every_fcm():
    one = build_model(TINY, fcm_depth=1)
    two = build_model(TINY, fcm_depth=2)
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in f.block) for f in two.discriminative.fcm]
    assert convs == [2, 2, 2, 2]
    # depth 1 keeps the parameter names checkpoints had before fcm_depth existed
    assert {k for k in one.state_dict() if ".fcm.0." in k} == {
        f"discriminative.fcm.0.block.{k}" for k in
        ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")}
    assert sum(p.numel() for p in two.parameters()) > sum(p.numel() for p in one.parameters())
    with torch.inference_mode():
        assert two.eval()(torch.rand(1, 3, 32, 32)).anomaly_map.shape == (1, 1, 32, 32)


def test_contrast_maps_swap_only_the_reconstruction_side():
    from pouta_core.diagnostics import contrast_maps

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    pouta = build_model(TINY, variant="pouta", image_size=32, init="torch").eval()  # DRAEM init: maps of 0.5
    maps = contrast_maps(pouta, x)
    assert set(maps) == {"map", "head_1", "head_2", "head_3", "head_4", "mean_heads", "D_other", "D_is_E", "E_is_D"}
    with torch.inference_mode():
        out = pouta(x)
    assert torch.allclose(maps["map"], out.anomaly_map[:, 0])
    heads = [maps[f"head_{i}"] for i in range(1, 5)]
    assert torch.allclose(maps["mean_heads"], torch.stack([maps["map"], *heads]).mean(0))
    assert all(m.shape == (2, 32, 32) and 0 <= m.min() and m.max() <= 1 for m in maps.values())
    assert not torch.equal(maps["D_other"], maps["map"])  # other images' decoder features
    single = contrast_maps(pouta, x[:1])
    assert torch.equal(single["D_other"], single["map"])
    with torch.inference_mode():   # both swaps leave no contrast: one side given twice
        _, enc, dec = pouta.reconstructive(x)
        for name, side in (("D_is_E", enc), ("E_is_D", dec)):
            expected = torch.softmax(pouta.discriminative(side, side)[0], dim=1)[:, 1]
            assert torch.allclose(maps[name], expected, atol=1e-6)

    vanilla = build_model(TINY, variant="vanilla", image_size=32, init="torch").eval()
    maps = contrast_maps(vanilla, x)
    assert set(maps) == {"map", "rec_other", "rec_is_input", "input_is_rec"}
    assert not torch.equal(maps["rec_is_input"], maps["map"])
    with torch.inference_mode():
        expected = torch.softmax(vanilla.discriminative(torch.cat([x, x], dim=1)), dim=1)[:, 1]
        rec = vanilla.reconstructive(x)[0]
        swapped = torch.softmax(vanilla.discriminative(torch.cat([rec, rec], dim=1)), dim=1)[:, 1]
    assert torch.allclose(maps["rec_is_input"], expected)
    assert torch.allclose(maps["input_is_rec"], swapped)


def test_contrast_fcm_sees_both_sides_through_one_projection_and_their_difference():
    from pouta_core.model.fcm import FCM

    fcm = FCM(6, 8, mode="contrast")
    assert fcm.block[0].in_channels == 18            # [phi(E), phi(D), |phi(E) - phi(D)|]
    e, d = torch.randn(2, 6, 8, 8), torch.randn(2, 6, 8, 8)
    seen = {}
    fcm.block[0].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    fcm(e, d)
    p_e, p_d = fcm.project(e), fcm.project(d)
    assert torch.allclose(seen["x"], torch.cat([p_e, p_d, (p_e - p_d).abs()], 1))
    model = build_model(TINY, fcm_input="contrast")
    assert model(torch.rand(1, 3, 32, 32)).anomaly_map.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_one_sided_fcm_reads_one_side_only_with_the_papers_parameter_count(side):
    paper, one = build_model(TINY), build_model(TINY, fcm_input=side)
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in paper.parameters())
    fcm = one.discriminative.fcm[0]
    e, d = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    kept = e if side == "encoder" else d
    out = fcm(e, d)
    other = torch.randn_like(kept)        # what the unread side holds does not matter
    assert torch.equal(out, fcm(kept, other) if side == "encoder" else fcm(other, kept))
    assert torch.equal(out, fcm.block(torch.cat([kept, kept], 1)))


def test_detach_encoder_stops_discriminative_gradients_at_the_encoder_features_only():
    model = build_model(TINY, detach_encoder=True).train()
    enc, dec = model(torch.rand(2, 3, 32, 32)).features
    assert not any(f.requires_grad for f in enc) and all(f.requires_grad for f in dec)
    enc, dec = build_model(TINY).train()(torch.rand(2, 3, 32, 32)).features
    assert all(f.requires_grad for f in enc)
