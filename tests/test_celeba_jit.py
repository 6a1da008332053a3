"""Tests of celeba_jit.py: the JiT pieces against their equations and the official code, the x/v/eps
conversions, a learning test, the CLI end to end, --quick, resume, precisions, compile, DDP, sampling over
ranks and bad input."""
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import celeba_jit as jit
import common
from helpers import (REPO, assert_user_error, make_cifar_root, make_fashion_root, make_image_folder,
                     make_mnist_root, run_script, shapes)

TINY = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup-epochs", "0"]


def run_main(*argv):
    """main() in this process (no interpreter start-up); bad input surfaces as common.UserError. The lock on
    --out is released afterwards, as the end of a process releases it."""
    try:
        jit.main([str(a) for a in argv])
    finally:
        while common.LOCKS:
            common.LOCKS.pop().close()


def refusal(capsys, *argv):
    """The one-line message of a refused run (exit 2)."""
    with pytest.raises(SystemExit) as e:
        common.run(lambda: run_main(*argv))
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def tiny(pred="x", res=16, channels=1, classes=10, **arch):
    return jit.JiT(res, channels, classes, **dict(jit.PRESETS["tiny"], **arch), pred=pred, noise_scale=1.0,
                   t_eps=0.05)


def mnist_run(tmp_path, *extra, n=32, out="run"):
    """A tiny one-epoch class-conditional run; returns its checkpoint path."""
    root = make_mnist_root(tmp_path / "mnist", n=n)
    run_main("--dataset", "mnist", "--data-dir", root, "--batch-size", 16, "--epochs", 1,
             "--out", tmp_path / out, *TINY, *extra)
    return tmp_path / out / "last.pt"


# -------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("res,p,s", [(16, 4, 4), (16, 4, 3), (28, 7, 7), (28, 4, 2), (40, 16, 12),
                                     (64, 16, 12)])
def test_patchify_roundtrip_covers_every_pixel(res, p, s):
    x = torch.randn(2, 3, res, res)
    tokens = jit.patchify(x, p, s)
    n = jit.check_grid(res, p, s)
    unfolded = torch.nn.functional.unfold(x, p, stride=s).transpose(1, 2)
    torch.testing.assert_close(tokens, unfolded, atol=0, rtol=0)
    assert tokens.shape == (2, n * n, 3 * p * p)
    torch.testing.assert_close(jit.unpatchify(tokens, res, p, s), x, atol=1e-5, rtol=0)
    coverage = torch.nn.functional.fold(torch.ones(1, p * p, n * n), res, p, stride=s)
    assert coverage.min() >= 1  # no pixel lost, including the outer frame
    # tokens that agree where they overlap give a seamless image: a constant stays exactly constant
    constant = jit.unpatchify(torch.full_like(tokens, 0.3), res, p, s)
    torch.testing.assert_close(constant, torch.full_like(x, 0.3))


@pytest.mark.parametrize("res,p,s", [(17, 4, 3), (30, 16, 12), (16, 4, 5), (8, 16, 16)])
def test_uncoverable_resolution_is_rejected(res, p, s):
    with pytest.raises(common.UserError, match="can't be tiled"):
        jit.check_grid(res, p, s)


def test_rope_keeps_norms_and_depends_only_on_the_offset():
    n, head_dim = 5, 16
    cos, sin = jit.rope_2d(n, head_dim)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    rq = jit.apply_rope(q.expand(1, 1, n * n, head_dim), cos, sin)[0, 0]
    rk = jit.apply_rope(k.expand(1, 1, n * n, head_dim), cos, sin)[0, 0]
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(n * n))
    scores = rq @ rk.T  # scores[i, j]: q at position i, k at position j
    at = lambda r, c: r * n + c
    for (r1, c1), (r2, c2), (dr, dc) in [((0, 0), (1, 2), (2, 1)), ((3, 1), (0, 4), (1, 0)),
                                         ((2, 2), (2, 2), (-2, 2))]:
        shifted = scores[at(r1 + dr, c1 + dc), at(r2 + dr, c2 + dc)]
        torch.testing.assert_close(scores[at(r1, c1), at(r2, c2)], shifted)
    # both axes rotate, differently: a row offset and a column offset give different scores
    assert not torch.isclose(scores[at(0, 0), at(1, 0)], scores[at(0, 0), at(0, 1)])
    assert not torch.isclose(scores[at(0, 0), at(0, 0)], scores[at(0, 0), at(0, 1)])


def test_initialisation_as_the_official_code():
    torch.manual_seed(0)
    model = jit.JiT(28, 1, 10, **jit.PRESETS["mnist"], pred="x", noise_scale=1.0, t_eps=0.05)
    # N(0, 0.02) label and time embeddings: at init the time, not the class, dominates the conditioning vector
    for weight in (model.y_embed.weight, model.t_embed[0].weight, model.t_embed[2].weight):
        assert abs(weight.std().item() - 0.02) < 0.002 and abs(weight.mean().item()) < 0.002
    for layer in (model.blocks[0].qkv, model.embed[0], model.embed[1], model.blocks[1].w3):  # xavier
        bound = math.sqrt(6 / (layer.in_features + layer.out_features))
        assert 0.97 * bound < layer.weight.abs().max() <= bound
    assert all(p.abs().max() == 0 for name, p in model.named_parameters() if name.endswith("bias"))
    # adaLN-Zero: every block starts as the identity, and the model's output at 0
    x, c = torch.randn(3, 16, 128), torch.randn(3, 128)
    torch.testing.assert_close(model.blocks[0](x, c, model.cos, model.sin), x, atol=0, rtol=0)
    assert model(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([0, 10])).abs().max() == 0
    torch.nn.init.normal_(model.blocks[0].ada[1].weight, std=0.1)  # once the modulation learns, it acts
    assert (model.blocks[0](x, c, model.cos, model.sin) - x).abs().mean() > 1e-3
    with_tokens = jit.JiT(28, 1, 10, **dict(jit.PRESETS["tiny"], context=(16, 1), dim=64), pred="x",
                          noise_scale=1.0, t_eps=0.05)  # in-context class tokens' positions: N(0, 0.02) too
    assert abs(with_tokens.context_pos.std().item() - 0.02) < 0.003
    out = with_tokens(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([0, 10]))
    assert out.shape == (2, 1, 28, 28)  # the class tokens leave the sequence before the head


def test_presets_match_the_papers_parameter_and_flop_counts():
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):  # no memory, no time: counts only
        b16 = jit.JiT(256, 3, 1000, **jit.PRESETS["B"], pred="x", noise_scale=1.0, t_eps=0.05)
        assert abs(sum(p.numel() for p in b16.parameters()) / 1e6 - 131) < 0.5  # JiT-B/16: 131M
        with FlopCounterMode(display=False) as flops:
            b16(torch.zeros(1, 3, 256, 256), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert 24.5 < flops.get_total_flops() / 2e9 < 25.5  # JiT-B/16: 25 GFLOPs (the papers count multiply-adds)
    assert jit.check_grid(256, 16, 12) ** 2 == 441  # the blog's 21 x 21 overlapping tokens


# --------------------------------------------------------------------------------------------- method
def test_velocity_from_x_v_and_eps_on_analytic_values():
    """z_t = t x + (1 - t) e with x = 0.6, e = -0.4: the velocity is x - e = 1 wherever no clamp acts."""
    t = torch.tensor([0.0, 0.02, 0.5, 0.99])
    x, e = torch.full((4, 1, 2, 2), 0.6), torch.full((4, 1, 2, 2), -0.4)
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * e
    v = x - e
    torch.testing.assert_close(z + (1 - t.view(-1, 1, 1, 1)) * v, x)  # the path's identities: x from (z_t, v)
    torch.testing.assert_close(z - t.view(-1, 1, 1, 1) * v, e)  # and e from (z_t, v)
    per_t = lambda value: value[:, 0, 0, 0]
    # x -> v divides by 1 - t, clamped at t_eps = 0.05: at t = 0.99, (x - z) / 0.05 = 0.01 / 0.05
    torch.testing.assert_close(per_t(jit.to_velocity(x, z, t, "x", 0.05)), torch.tensor([1.0, 1.0, 1.0, 0.2]))
    # e -> v divides by t, clamped at t_eps: at t = 0, (z - e) / 0.05 = 0; at t = 0.02, 0.02 / 0.05
    torch.testing.assert_close(per_t(jit.to_velocity(e, z, t, "eps", 0.05)), torch.tensor([0, 0.4, 1, 1]))
    torch.testing.assert_close(jit.to_velocity(v, z, t, "v", 0.05), v, atol=0, rtol=0)  # v is read as is
    # a wrong x (or e) moves v by its error over the (clamped) divisor
    dx = jit.to_velocity(x + 0.1, z, t, "x", 0.05) - jit.to_velocity(x, z, t, "x", 0.05)
    torch.testing.assert_close(per_t(dx), 0.1 / torch.tensor([1.0, 0.98, 0.5, 0.05]))


def test_t_mu_shift_only_above_256_px_and_the_logit_normal_sampler():
    for res in (28, 32, 64, 256):
        assert jit.effective_t_mu(-0.8, res) == -0.8  # never shifted towards less noise
    assert abs(jit.effective_t_mu(-0.8, 512) - (-0.8 - math.log(2))) < 1e-12  # = --noise-scale 2 in SNR
    assert abs(jit.effective_t_mu(-0.8, 1024) - (-0.8 - math.log(4))) < 1e-12
    torch.manual_seed(0)
    logit = torch.logit(jit.sample_t(200_000, -1.2, 0.7, "cpu").double())
    assert abs(logit.mean() + 1.2) < 0.01 and abs(logit.std() - 0.7) < 0.01


def test_heun_is_second_order_and_euler_first_order():
    a = -1.5  # dz/dt = a z, z(1) = z(0) exp(a)
    calls = []
    velocity = lambda z, t: calls.append(t) or a * z
    one = torch.ones(1, dtype=torch.float64)
    err = lambda solver, steps: abs(jit.ode_solve(velocity, one, steps, solver).item() - math.exp(a))
    heun, euler = err("heun", 20) / err("heun", 40), err("euler", 20) / err("euler", 40)
    assert 3.5 < heun < 4.5 and 1.8 < euler < 2.2, (heun, euler)
    calls.clear()
    path = []
    jit.ode_solve(velocity, torch.ones(1), 10, "heun", on_step=path.append)
    assert len(calls) == 19 and max(calls) < 1 and len(path) == 10  # Euler on the last interval, never t = 1


class FakeModel(torch.nn.Module):
    """The output 1 for the label 0, -1 for the null label: the guided velocity is known in closed form."""
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, t, y):
        self.calls.append((t[0].item(), len(z)))
        return torch.where(y == self.num_classes, -1.0, 1.0).view(-1, 1, 1, 1).expand_as(z)


@pytest.mark.parametrize("interval,t,guided", [
    ((0.1, 1.0), 0.05, False), ((0.1, 1.0), 0.1, False), ((0.1, 1.0), 0.5, True), ((0.1, 1.0), 0.99, True),
    ((0.2, 0.6), 0.6, False), ((0.0, 0.5), 0.0, True), ((0.0, 0.5), 0.5, False)],
    ids=["below", "at-lo", "inside", "near-1", "at-hi", "lo-0-takes-t-0", "lo-0-at-hi"])
def test_cfg_interval_is_open_at_both_ends_as_the_official_sampler(interval, t, guided):
    model, z, y, w = FakeModel(), torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), 4.0
    v = jit.guided_velocity(model, z, t, y, w, interval, "v", 0.05)
    expected = -1 + w * (1 - -1) if guided else 1.0
    torch.testing.assert_close(v, torch.full_like(z, expected))
    assert [n for _, n in model.calls] == ([6] if guided else [3])  # cond and uncond in one batched forward


def test_cfg_interval_on_the_samplers_grid():
    """The grid points 0.1, 0.2, ... (float32, as the official linspace) compare as the official code's do."""
    for interval, expected in [((0.1, 0.6), [0.2, 0.3, 0.4, 0.5]), ((0.0, 0.3), [0.0, 0.1, 0.2])]:
        model = FakeModel()
        y = torch.zeros(1, dtype=torch.long)
        velocity = lambda z, t: jit.guided_velocity(model, z, t, y, 2.0, interval, "v", 0.05)
        jit.ode_solve(velocity, torch.zeros(1, 1, 2, 2), 10, "euler")
        assert [round(t, 4) for t, n in model.calls if n == 2] == expected


def test_generate_uses_the_models_noise_scale_and_prediction():
    model = tiny(pred="eps", res=16)
    model.noise_scale = 2.0
    seen = []
    model.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].std().item()))
    path = []
    images = jit.generate(model, torch.randn(64, 1, 16, 16), None, cfg=3.0, steps=3, solver="euler",
                          on_step=path.append)
    assert abs(seen[0] - 2) < 0.1 and len(seen) == 3  # unconditional: no guided (doubled) batch
    # the untrained eps-model outputs 0 ("no noise"): v = z_t / t, so the Euler steps grow z
    assert path[-1].abs().mean() > 2 * seen[0]
    assert torch.equal(images, path[-1].clamp(-1, 1))  # the images are the last state, in [-1, 1]


def test_learns_class_shapes():
    """A tiny JiT on made-up class-shaped images beats the best input-blind guess (the mean) at t = 0.5."""
    torch.manual_seed(0)
    images, labels = shapes(256, 16, 1)
    x_all, y_all = torch.from_numpy(images).float() / 127.5 - 1, torch.from_numpy(labels)
    model = tiny(stride=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0)
    g = torch.Generator().manual_seed(1)
    x_eval, y_eval = x_all[:64], y_all[:64]
    z_eval = 0.5 * x_eval + 0.5 * torch.randn(x_eval.shape, generator=g)
    baseline = ((x_all.mean(0) - x_eval) ** 2).mean()
    for step in range(300):
        idx = torch.randint(0, 256, (32,))
        loss = jit.flow_matching_loss(model, x_all[idx], y_all[idx], "x", -0.8, 0.8, 1.0, 0.05, 0.1, 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = ((model(z_eval, torch.full((64,), 0.5), y_eval) - x_eval) ** 2).mean()
    assert mse < 0.5 * baseline, (mse, baseline)


@pytest.mark.parametrize("warmup", [10, 22])
def test_ema_decay_is_the_warm_up_then_the_fixed_decay(tmp_path, monkeypatch, warmup):
    """decay(s) = min(--ema, (1 + s) / (K + s)): the warm-up K rules a short run, --ema caps a long one."""
    decays, update = [], jit.ema_update
    monkeypatch.setattr(jit, "ema_update", lambda ema, model, d: decays.append(d) or update(ema, model, d))
    mnist_run(tmp_path, "--ema-warmup", warmup, "--ema", 0.3, "--epochs", 2)  # 2 steps per epoch
    assert decays == [min(0.3, (1 + s) / (warmup + s)) for s in range(1, 5)]
    assert decays[0] == 2 / (warmup + 1) and decays[-1] == (0.3 if warmup == 10 else 5 / 26)


def test_label_dropout_lives_in_the_loss():
    seen = []
    model = lambda z, t, y: seen.append(y.clone()) or torch.zeros_like(z)
    x, y = torch.zeros(64, 1, 4, 4), torch.arange(64) % 10
    for dropout in (0.0, 1.0, 0.5):
        jit.flow_matching_loss(model, x, y, "x", -0.8, 0.8, 1.0, 0.05, dropout, 10)
    assert torch.equal(seen[0], y) and (seen[1] == 10).all()
    assert 10 < (seen[2] == 10).sum() < 54 and torch.equal(seen[2][seen[2] != 10], y[seen[2] != 10])


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_celeba_folder_end_to_end(tmp_path):
    """CelebA layout DATA/img_align_celeba (plus a non-image), training, figures, metrics, cache; then
    --sample to an .npz."""
    folder = make_image_folder(tmp_path / "data" / "img_align_celeba", n=10)
    (tmp_path / "data" / "img_align_celeba" / "list_attr.txt").write_text("not an image")
    out = tmp_path / "run"
    r = run_script("celeba_jit.py", "--dataset", "celeba", "--data-dir", tmp_path / "data", "--res", 16,
                   "--epochs", 2, "--batch-size", 4, "--out", out, *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "0.05M parameters, 10 images; t-mu 0 at 16 px; flips: True" in r.stdout
    assert "precision: fp32" in r.stdout and "Warning" not in r.stderr  # no NumPy non-writable-array warning
    for name in ["last.pt", "loss.png", "samples.png", "sampling.gif", "metrics.jsonl"]:
        assert (out / name).stat().st_size > 0, name
    caches = [f for f in os.listdir(folder) if f.startswith(".celeba_jit-cache-16px")]
    cache = np.load(os.path.join(folder, caches[0]))
    assert len(caches) == 1 and cache.shape == (10, 3, 16, 16) and cache.dtype == np.uint8
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["epoch"] == 2 and len(ckpt["losses"]) == 4
    assert ckpt["config"]["dataset"] == "celeba" and ckpt["checksum"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if "img_per_s" in line]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(set(e) >= {"loss", "lr", "seconds"} for e in epochs)
    assert {"step", "epoch", "loss", "lr"} <= set(lines[0]) and lines[0]["step"] == 2
    grid = np.asarray(Image.open(out / "samples.png").convert("L"))  # 8 x 8 grid of 16 px at scale 6, a title
    assert grid.shape[1] >= 8 * 18 * 6 and grid.shape[0] > 8 * 18 * 6 + 15 and grid[:15].min() < 100  # title
    r = run_script("celeba_jit.py", "--sample", out / "last.pt", "--save-samples", out / "s.npz",
                   "--num-samples", 5, "--out", out / "sampled", "--steps", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    samples = np.load(out / "s.npz")
    assert samples["images"].shape == (5, 3, 16, 16) and samples["images"].dtype == np.uint8
    assert (samples["labels"] == -1).all() and (out / "sampled" / "samples.png").exists()
    folder = tmp_path / "data" / "img_align_celeba"  # evaluate.py scores CelebA as a folder of images
    assert f"python evaluate.py {out / 's.npz'} --dataset folder --data-dir {folder}" in r.stdout


def test_sample_without_the_celeba_images_downloads_nothing(tmp_path, monkeypatch, capsys):
    """--sample of a CelebA model on a machine without its images: the evaluate command names the data folder
    as it was given, and nothing reaches for the network."""
    import torchvision

    def download(*args, **kwargs):
        raise AssertionError("a download was started")
    monkeypatch.setattr(torchvision.datasets, "CelebA", download)
    make_image_folder(tmp_path / "data" / "img_align_celeba", n=4)
    run_main("--dataset", "celeba", "--data-dir", tmp_path / "data", "--res", 16, "--epochs", 1,
             "--batch-size", 4, "--out", tmp_path / "run", *TINY)
    shutil.rmtree(tmp_path / "data")
    capsys.readouterr()
    run_main("--sample", tmp_path / "run" / "last.pt", "--save-samples", tmp_path / "s.npz",
             "--num-samples", 2, "--out", tmp_path / "sampled", "--steps", 2, "--device", "cpu")
    assert f"--dataset folder --data-dir {tmp_path / 'data'}\n" in capsys.readouterr().out
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 3, 16, 16)
    message = refusal(capsys, "--sample", tmp_path / "run" / "last.pt", "--cfg", 4, "--out", tmp_path / "s2")
    assert "--cfg: this model is unconditional" in message  # guidance needs classes


def test_folder_loading_crops_resizes_and_caches(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "imgs", n=3, size=(40, 20))
    images, cache = jit.load_folder(folder, 8, None, str(tmp_path))
    assert images.shape == (3, 3, 8, 8) and os.path.dirname(cache) == folder
    # the images are a left-to-right ramp: after the centre crop the left edge stays darker than the right
    assert (images[:, :, :, 0].astype(int).mean() + 40) < images[:, :, :, -1].astype(int).mean()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the memory-mapped cache becomes a tensor without NumPy's warning
        assert torch.as_tensor(images).shape == (3, 3, 8, 8)
    assert jit.load_folder(folder, 8, None, str(tmp_path))[1] == cache  # second run: the same cache
    image = next(f for f in sorted(os.listdir(folder)) if not f.startswith("."))
    os.utime(os.path.join(folder, image), (1, 1))  # an image replaced by one of the same size
    assert jit.load_folder(folder, 8, None, str(tmp_path))[1] != cache
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only data folder: the cache in --out
    cache = jit.load_folder(folder, 12, None, str(tmp_path / "out"))[1]
    assert os.path.dirname(cache) == str(tmp_path / "out")


def test_a_killed_cache_build_leaves_no_temp(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "imgs", n=6)
    load = common.load_image

    def interrupted(path, size, crop):
        if path.endswith("0003.png"):
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, which common.run turns into it) mid-build
        return load(path, size, crop)
    monkeypatch.setattr(common, "load_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jit.load_folder(folder, 8, None, str(tmp_path))
    assert not [f for f in os.listdir(folder) if "cache" in f]  # no cache: the next run decodes them all


def test_resume_equals_an_uninterrupted_run_and_appends_the_metrics(tmp_path):
    root = make_mnist_root(tmp_path / "mnist", n=48)
    common_args = ["--dataset", "mnist", "--data-dir", root, "--batch-size", 16, *TINY]
    run_main(*common_args, "--epochs", 2, "--out", tmp_path / "full")
    run_main(*common_args, "--epochs", 1, "--out", tmp_path / "half")
    run_main(*common_args, "--epochs", 2, "--out", tmp_path / "half", "--resume", tmp_path / "half/last.pt")
    full, resumed = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "half"))
    assert full["step"] == resumed["step"] == 6 and full["losses"] == resumed["losses"]
    for key in ("model", "ema"):
        for name, value in full[key].items():
            torch.testing.assert_close(resumed[key][name], value, atol=0, rtol=0)
    epochs = {d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                  if "img_per_s" in line] for d in ("full", "half")}
    assert [e["epoch"] for e in epochs["half"]] == [1, 2]  # the resumed run appended its epoch
    assert [e["loss"] for e in epochs["half"]] == [e["loss"] for e in epochs["full"]]


def test_a_resume_with_nothing_left_to_train_is_refused(tmp_path, capsys):
    ckpt = mnist_run(tmp_path)
    before = ckpt.read_bytes()
    message = refusal(capsys, "--dataset", "mnist", "--data-dir", tmp_path / "mnist", "--batch-size", 16,
                      "--epochs", 1, "--out", tmp_path / "run", *TINY, "--resume", ckpt)
    assert "has trained 1 epochs already, so --epochs 1 leaves nothing to do" in message
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("pred", ["x", "v", "eps"])
def test_each_prediction_trains_samples_and_is_kept_by_the_checkpoint(tmp_path, monkeypatch, capsys, pred):
    ckpt = mnist_run(tmp_path, "--pred", pred)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["config"]["pred"] == pred and all(math.isfinite(v) for v in saved["losses"])
    seen, generate = [], jit.generate
    spy = lambda model, *a, **k: seen.append(model.pred) or generate(model, *a, **k)
    monkeypatch.setattr(jit, "generate", spy)
    run_main("--sample", ckpt, "--out", tmp_path / "s", "--steps", 2, "--device", "cpu", "--pred", "x",
             "--save-samples", tmp_path / "s.npz", "--num-samples", 3)
    assert seen == [pred, pred] and np.load(tmp_path / "s.npz")["images"].std() > 0
    other = "v" if pred == "x" else "x"
    assert f"pred={pred!r} but this run has pred={other!r}" in refusal(
        capsys, "--dataset", "mnist", "--data-dir", tmp_path / "mnist", "--batch-size", 16, "--epochs", 2,
        "--out", tmp_path / "run", *TINY, "--pred", other, "--resume", ckpt)


def test_sample_takes_the_architecture_and_noise_from_the_checkpoint(tmp_path, monkeypatch):
    """A model trained with --noise-scale 2 samples from 2 * N(0, I); --sample needs no --dataset/--res, and
    the command line's preset (here mnist's 7px patches, which can't tile the default 256 px) is not used."""
    ckpt = mnist_run(tmp_path, "--noise-scale", 2, "--t-eps", 0.1, n=16)
    seen, generate = [], jit.generate
    spy = lambda model, noise, *a, **k: seen.append(((noise * model.noise_scale).std().item(), model.t_eps,
                                                     model.res)) or generate(model, noise, *a, **k)
    monkeypatch.setattr(jit, "generate", spy)
    run_main("--sample", ckpt, "--model", "mnist", "--out", tmp_path / "s", "--steps", 2, "--device", "cpu",
             "--save-samples", tmp_path / "s.npz", "--num-samples", 3)
    assert len(seen) == 2 and all(abs(std - 2) < 0.15 and rest == [0.1, 28] for std, *rest in seen), seen
    assert np.load(tmp_path / "s.npz")["images"].shape == (3, 1, 28, 28)


@pytest.mark.parametrize("dataset,extra,flipped", [("fashion", [], False), ("cifar10", [], True),
                                                   ("cifar10", ["--no-flip"], False)])
def test_fashion_classes_and_horizontal_flips(tmp_path, monkeypatch, dataset, extra, flipped):
    root = (make_fashion_root if dataset == "fashion" else make_cifar_root)(tmp_path / "data", n=40)
    batches, loss = [], jit.flow_matching_loss
    spy = lambda model, x, *a, **k: batches.append(x) or loss(model, x, *a, **k)
    monkeypatch.setattr(jit, "flow_matching_loss", spy)
    run_main("--dataset", dataset, "--data-dir", root, "--batch-size", 20, "--epochs", 2, "--steps", 2,
             "--out", tmp_path / "o", *TINY, "--stride", 4, *extra,
             "--save-samples", tmp_path / "s.npz", "--num-samples", 12)
    assert jit.load_model(tmp_path / "o" / "last.pt")[0].num_classes == 10
    samples = np.load(tmp_path / "s.npz")  # written after training, classes in turn
    channels, res = (1, 28) if dataset == "fashion" else (3, 32)
    assert samples["images"].shape == (12, channels, res, res) and samples["images"].dtype == np.uint8
    assert samples["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    real = common.load_dataset(dataset, root)[0].float() / 127.5 - 1
    seen = torch.cat(batches)
    mirrored = [any(torch.equal(x, r.flip(2)) and not torch.equal(x, r) for r in real) for x in seen]
    assert 20 < sum(mirrored) < 60 if flipped else not any(mirrored)  # about half the images when flipping


def test_bf16_trains_resumes_and_samples_on_the_cpu(tmp_path, capsys):
    """bf16 autocast on the CPU: losses finite, an fp32 checkpoint that resumes and samples."""
    ckpt = mnist_run(tmp_path, "--precision", "bf16")
    assert "precision: bf16" in capsys.readouterr().out
    saved = torch.load(ckpt, weights_only=True)
    assert all(math.isfinite(v) for v in saved["losses"])
    assert saved["model"]["head.weight"].dtype == torch.float32 and saved["scaler"] == {}
    run_main("--dataset", "mnist", "--data-dir", tmp_path / "mnist", "--batch-size", 16, "--epochs", 2,
             "--out", tmp_path / "run", *TINY, "--precision", "bf16", "--resume", ckpt)
    run_main("--sample", ckpt, "--out", tmp_path / "s", "--steps", 2, "--device", "cpu",
             "--precision", "bf16", "--save-samples", tmp_path / "s.npz", "--num-samples", 4)
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    assert np.load(tmp_path / "s.npz")["images"].std() > 0


def test_fp16_steps_with_its_gradient_scaler(capsys, tmp_path):
    """fp16's path (autocast and an enabled gradient scaler) run on the CPU; the CLI keeps fp16 for GPUs."""
    torch.manual_seed(0)
    model = tiny(res=16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = common.grad_scaler(torch.device("cpu"), "fp16")
    seen = []
    model.blocks[0].qkv.register_forward_hook(lambda m, inputs, out: seen.append(out.dtype))
    x, y = torch.rand(4, 1, 16, 16) * 2 - 1, torch.arange(4)
    settings = dict(pred="x", mu=0.0, sigma=0.8, noise_scale=1.0, t_eps=0.05, label_dropout=0.1, null=10)
    losses = [jit.train_step(model, opt, scaler, x, y, settings, 1.0, "fp16") for _ in range(3)]
    assert scaler.is_enabled() and seen[0] == torch.float16 and all(torch.isfinite(v) for v in losses)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # the scaled step applied
    assert "fp16 needs a CUDA GPU" in refusal(capsys, "--dataset", "mnist", "--precision", "fp16",
                                              "--out", tmp_path / "never", *TINY)


@pytest.mark.slow
def test_compiled_and_eager_runs_resume_each_other(tmp_path):
    ckpt = mnist_run(tmp_path, "--compile")
    assert not [k for k in torch.load(ckpt, weights_only=True)["model"] if "_orig_mod" in k]
    good = ["--dataset", "mnist", "--data-dir", tmp_path / "mnist", "--batch-size", 16,
            "--out", tmp_path / "run", *TINY, "--resume", ckpt]
    run_main(*good, "--epochs", 2)  # eager from a compiled run
    run_main(*good, "--epochs", 3, "--compile")  # compiled from an eager run
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["epoch"] == 3 and all(math.isfinite(v) for v in resumed["losses"])
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0


PROBE = """import os, sys, torch
sys.path.insert(0, {repo!r})
import celeba_jit as jit
update, prefix = jit.ema_update, os.path.join({out!r}, "ema" + os.environ["RANK"])

def first_update(ema, model, decay):  # each rank writes its EMA as it starts and after its first step
    if not os.path.exists(prefix + ".pt"):
        torch.save({{k: v.clone() for k, v in ema.state_dict().items()}}, prefix + "_start.pt")
        update(ema, model, decay)
        torch.save(ema.state_dict(), prefix + ".pt")
    else:
        update(ema, model, decay)
jit.ema_update = first_update
jit.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_the_ema_of_rank_0(tmp_path):
    root = make_mnist_root(tmp_path / "mnist", n=64)
    (tmp_path / "ddp").mkdir()
    (tmp_path / "probe.py").write_text(PROBE.format(repo=REPO, out=str(tmp_path / "ddp")))
    r = run_script(tmp_path / "probe.py", "--dataset", "mnist", "--data-dir", root, "--epochs", 1,
                   "--batch-size", 16, "--out", tmp_path / "ddp", *TINY, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(math.isfinite(v) for v in ckpt["losses"])  # 64 images / global batch 16
    assert r.stdout.count("JiT-tiny") == 1  # rank 0 alone logs and writes
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    for when in ("_start", ""):  # every rank's EMA starts from rank 0's weights, and stays equal after a step
        ema0, ema1 = (torch.load(tmp_path / f"ddp/ema{rank}{when}.pt", weights_only=True) for rank in (0, 1))
        for name, value in ema0.items():
            torch.testing.assert_close(ema1[name], value, atol=0, rtol=0)


@pytest.mark.slow
def test_save_samples_over_two_ranks_equals_one_process(tmp_path):
    ckpt = mnist_run(tmp_path, n=16)
    sampling = ["--sample", ckpt, "--num-samples", 7, "--batch-size", 2, "--steps", 2, "--device", "cpu"]
    r = run_script("celeba_jit.py", *sampling, "--save-samples", tmp_path / "two.npz",
                   "--out", tmp_path / "two", torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sampling 7/7" in r.stdout  # the progress line of rank 0 covers every rank's work
    run_main(*sampling, "--save-samples", tmp_path / "one.npz", "--out", tmp_path / "one")
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["images"], two["images"]) and np.array_equal(one["labels"], two["labels"])
    assert one["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert not np.array_equal(one["images"][0], one["images"][2])


def test_save_samples_noise_follows_the_seed_not_the_batch_size(tmp_path, monkeypatch):
    ckpt = mnist_run(tmp_path)
    monkeypatch.setattr(jit, "generate", lambda model, noise, y, **sampling: noise)  # write the noise itself
    sampling = ["--sample", ckpt, "--num-samples", 5, "--out", tmp_path / "s"]
    for name, extra in (("b2", ["--batch-size", 2]), ("b5", ["--batch-size", 5]), ("seed1", ["--seed", 1])):
        run_main(*sampling, *extra, "--save-samples", tmp_path / f"{name}.npz")
    names = ("b2", "b5", "seed1")
    b2, b5, seed1 = (np.load(tmp_path / f"{name}.npz")["images"].astype(int) for name in names)
    assert np.array_equal(b2, b5)  # each sample's own noise, whatever the chunks
    assert np.abs(b2 - seed1).mean() > 30  # another seed, other noise (seed << 32 + j gave the same)
    assert np.abs(b2[0] - b2[1]).mean() > 30


def test_benchmark_prints_eager_and_compiled_speeds(capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the slow test runs the real compile
    for dataset in ("fashion", "folder"):
        run_main("--benchmark", "--dataset", dataset, "--res", 28, "--batch-size", 4, *TINY)
        rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| JiT")]
        assert [row[1].strip() for row in rows] == [f"JiT-tiny 28 px fp32, {name}" for name in ("eager",
                                                                                               "compiled")]
        assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)  # training and sampling img/s


def test_gpu_sized_recipes_on_a_cpu_print_their_run_time_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jit, "GPU_PRESETS", ("tiny",))
    mnist_run(tmp_path)
    out = capsys.readouterr().out
    assert out.index("timing 2 steps") < out.index("would take about") < out.index("step 2/2")
    assert "for CPU runs pass --quick" in out


def test_the_two_notebook_lines_of_the_readme(tmp_path, monkeypatch):
    ckpt = mnist_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/celeba_jit")
    os.replace(ckpt, "runs/celeba_jit/last.pt")
    from celeba_jit import generate, load_model
    model, config = load_model("runs/celeba_jit/last.pt")
    images = generate(model, torch.randn(10, 1, 28, 28), torch.arange(10), cfg=2.0, steps=49)
    assert images.shape == (10, 1, 28, 28) and torch.isfinite(images).all() and images.std() > 0
    assert config["dataset"] == "mnist" and config["pred"] == "x" and not model.training


def test_help_shows_every_default_once_and_the_presets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping
    with pytest.raises(SystemExit):
        jit.parse_args(["--help"])
    text = capsys.readouterr().out
    for default in ["(default: 100)", "(default: 128)", "(default: 0.9999)", "(default: 50)",
                    "(default: heun)", "(default: 0 at --res 32 and below, else the paper's -0.8)",
                    "(default: 1000)", "(default: 0.1 1.0)", "(default: runs/celeba_jit)",
                    "(default: 3; 1: off)", "(default: auto)", "(default: x)", "(default: 0)"]:
        assert text.count(default) == 1, default
    assert "default: None" not in text and "default: False" not in text and "see PRESETS" not in text
    for name, p in jit.PRESETS.items():
        assert f"{name}: {p['depth']} x {p['dim']}, {p['heads']} heads, patch {p['patch']}" in text
    assert "don't use both" in text  # the t shift above 256 px and --noise-scale 2 at 512 px are the same
    # what a flag does, not what was measured with it; w = 3 is not the official JiT-B/16 command's 2.9
    for measured in ["FD ", "measured", "README", "94.5", "JiT-B's"]:
        assert measured not in text, measured


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--t-mu", "nan"], "--t-mu must be a finite number"),
    (["--cfg-interval", "0.1", "nan"], "--cfg-interval must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["--seed", "-1"], "--seed must be between 0 and"),
    (["--seed", str(2**31)], "--seed must be between 0 and"),
    (["--num-samples", "0"], "--num-samples must be between 1 and 1,000,000"),
    (["--num-samples", "1000001"], "--num-samples must be between 1 and 1,000,000"),
    (["--device", "gpu"], "--device gpu is not a device"),
    (["--cfg-interval", "0.5", "0.2"], "--cfg-interval LO HI must satisfy 0 <= LO < HI <= 1"),
    (["--patch", "0"], "--patch must be positive, got 0"),
    (["--steps", "100000000"], "--steps must be between 1 and 10,000"),
    (["--dataset", "folder", "--res", "0"], "--res must be between 1 and 4,096, got 0"),
    (["--dataset", "fashion", "--res", "32"], "fashion images are 28 px"),
    (["--t-eps", "1"], "--t-eps < 1"),
    (["--ema", "1"], "0 < --ema < 1"),
    (["--cfg", "-1"], "can't be negative"),
    (["--save-samples", "x.txt"], "--save-samples x.txt: pass a file name ending in .npz"),
    (["--resume", "a.pt", "--sample", "b.pt"], "not both"),
    (["--dataset", "mnist", "--no-flip"], "mnist images are never flipped"),
    (["--dataset", "folder", "--cfg", "2"], "--cfg: this model is unconditional"),
    (["--dataset", "celeba", "--cfg", "2", "--data-dir", "."], "--cfg: this model is unconditional"),
    (["--res", "17", "--dataset", "folder", "--patch", "4", "--stride", "3"], "use --res 16 or 19"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_flags_are_refused_in_one_sentence(tmp_path, capsys, argv, message):
    assert message in refusal(capsys, *argv, "--out", tmp_path / "never", "--model", "tiny")
    assert not (tmp_path / "never").exists()  # refused before anything is written


def test_bad_data_and_checkpoints_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    fail = lambda *argv: refusal(capsys, *argv, "--out", out, *TINY)
    assert "mmlab.ie.cuhk.edu.hk" in fail("--dataset", "celeba", "--data-dir", tmp_path / "nothing")
    assert "does not exist" in fail("--dataset", "folder", "--data-dir", tmp_path / "nothing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert "no images" in fail("--dataset", "folder", "--data-dir", tmp_path / "notes")
    bad = make_image_folder(tmp_path / "bad", n=2)
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    assert "broken.jpg is not a readable image" in fail("--dataset", "folder", "--data-dir", bad, "--res", 16)
    assert not [f for f in os.listdir(bad) if "cache" in f]  # no half-written cache left behind
    Image.MAX_IMAGE_PIXELS, limit = 100, Image.MAX_IMAGE_PIXELS  # a decompression bomb, as PIL sees it
    try:
        assert "DecompressionBombError" in fail("--dataset", "folder", "--data-dir", make_image_folder(
            tmp_path / "bomb", n=2), "--res", 16)
    finally:
        Image.MAX_IMAGE_PIXELS = limit

    root = make_mnist_root(tmp_path / "mnist", n=32)
    good = ["--dataset", "mnist", "--data-dir", root, "--batch-size", 16, "--epochs", 1]
    run_main(*good, "--out", out, *TINY)
    before = (out / "last.pt").read_bytes()
    message = refusal(capsys, *good, "--out", out, "--model", "mnist", "--device", "cpu", "--resume",
                      out / "last.pt")
    assert "model='tiny' but this run has model='mnist'" in message
    common.save_checkpoint(tmp_path / "other.pt", {"script": "mnist_unet", "config": {"a": 1}})
    assert "not celeba_jit.py" in fail(*good, "--resume", tmp_path / "other.pt")
    (tmp_path / "cut.pt").write_bytes(before[: len(before) // 2])
    assert "truncated or corrupt" in fail(*good, "--resume", tmp_path / "cut.pt")
    assert "is a folder" in fail(*good, "--resume", out)
    assert "does not exist" in fail(*good, "--resume", tmp_path / "missing.pt")
    assert "batch_size=16 but this run has batch_size=8" in fail(*good[:-3], "8", "--resume", out / "last.pt")
    assert "noise_scale=1.0 but this run has noise_scale=2.0" in fail(*good, "--noise-scale", 2, "--resume",
                                                                      out / "last.pt")
    (tmp_path / "x.npz").mkdir()
    for target, message in [(tmp_path / "no" / "s.npz", "cannot write --save-samples"),
                            (tmp_path / "x.npz", "is not a regular file")]:
        assert message in refusal(capsys, "--sample", out / "last.pt", "--save-samples", target,
                                  "--out", tmp_path / "never", "--device", "cpu")
    assert not (tmp_path / "never").exists()  # refused before any work
    assert "fewer images than --batch-size 64" in fail(*good[:-4], "--batch-size", 64, "--overwrite")
    assert (out / "last.pt").read_bytes() == before  # nothing overwritten by the failed runs
    old = torch.load(out / "last.pt", weights_only=True)  # a checkpoint whose parameters have other names
    old.pop("checksum")
    old["ema"] = {f"old.{name}": value for name, value in old["ema"].items()}
    common.save_checkpoint(tmp_path / "old.pt", old)
    message = refusal(capsys, "--sample", tmp_path / "old.pt", "--out", tmp_path / "s", "--device", "cpu")
    assert "old.pt does not fit this run" in message and "a checkpoint of this version" in message


def test_a_fresh_run_never_replaces_a_checkpoint_and_a_locked_out_is_refused(tmp_path, capsys):
    ckpt = mnist_run(tmp_path)
    before = ckpt.read_bytes()
    again = ["--dataset", "mnist", "--data-dir", tmp_path / "mnist", "--batch-size", 16, "--epochs", 1,
             "--out", tmp_path / "run", *TINY]
    assert "already holds a checkpoint of celeba_jit.py; pass --resume" in refusal(capsys, *again)
    assert ckpt.read_bytes() == before
    with open(tmp_path / "run" / ".lock", "w") as holder:  # another training holds the folder
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "in use by another training run (`fuser" in refusal(capsys, *again, "--overwrite")
    run_main(*again, "--overwrite", "--seed", 1)
    assert ckpt.read_bytes() != before


def test_a_non_finite_loss_stops_before_the_checkpoint(tmp_path, monkeypatch, capsys):
    ckpt = mnist_run(tmp_path)
    before = ckpt.read_bytes()
    loss = jit.flow_matching_loss
    monkeypatch.setattr(jit, "flow_matching_loss", lambda *a, **k: loss(*a, **k) * float("nan"))
    message = refusal(capsys, "--dataset", "mnist", "--data-dir", tmp_path / "mnist", "--batch-size", 16,
                      "--epochs", 2, "--out", tmp_path / "run", *TINY, "--resume", ckpt)
    assert "the loss became nan at step 3" in message and "--lr" in message
    assert ckpt.read_bytes() == before


def test_ctrl_c_during_training_is_one_line_and_leaves_no_temp(tmp_path):
    root = make_mnist_root(tmp_path / "mnist", n=64)
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "celeba_jit.py"), "--dataset", "mnist", "--data-dir", root,
           "--batch-size", 16, "--epochs", 1000, "--out", str(out), *TINY]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == ["interrupted"]
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] >= 1


def test_bad_input_from_the_command_line(tmp_path):
    r = run_script("celeba_jit.py", "--dataset", "folder", "--data-dir", tmp_path / "missing",
                   "--out", tmp_path / "o", *TINY)
    assert_user_error(r, "does not exist", "--data-dir")


CIFAR_GRID = ["--model", "mnist", "--patch", "4", "--stride", "4"]


@pytest.mark.parametrize("flags, mu", [(["--dataset", "fashion"], 0.0), (["--dataset", "mnist"], 0.0),
                                       (["--dataset", "cifar10", *CIFAR_GRID], 0.0),
                                       (["--dataset", "celeba"], -0.8),
                                       (["--dataset", "folder", "--res", "28", *CIFAR_GRID], 0.0),
                                       (["--dataset", "folder", "--res", "32", *CIFAR_GRID], 0.0),
                                       (["--dataset", "folder", "--res", "64", *CIFAR_GRID], -0.8),
                                       (["--dataset", "celeba", "--res", "16", "--model", "tiny"], 0.0),
                                       (["--dataset", "fashion", "--t-mu", "-0.8"], -0.8)])
def test_default_t_mu_follows_the_resolution(flags, mu):
    """0 at 32 px and below, whatever the data; the paper's -0.8 above."""
    args = jit.validate(jit.parse_args(flags))
    assert args.t_mu == mu
    assert jit.effective_t_mu(args.t_mu, args.res) == mu  # up to 256 px: never shifted


# ---------------------------------------------------------------------------------------- --quick, notes
QUICK_ARGV = ["--model", "mnist", "--epochs", "8", "--batch-size", "64", "--warmup-epochs", "0.5",
              "--ema-warmup", "22", "--cfg", "3.5", "--cfg-interval", "0.2", "0.9", "--compile",
              "--steps", "10"]


def test_quick_is_the_cpu_recipe_and_an_explicit_flag_wins(capsys, monkeypatch):
    quick = vars(jit.parse_args(["--quick", "--dataset", "fashion"]))
    spelled_out = vars(jit.parse_args(["--dataset", "fashion", *QUICK_ARGV]))
    quick.pop("quick")
    spelled_out.pop("quick")
    assert quick == spelled_out
    assert quick["model"] == "mnist" and quick["patch"] == 7 and quick["lr"] == 1e-3  # the mnist preset's
    assert quick["epochs"] == 8 and quick["cfg_interval"] == [0.2, 0.9] and quick["compile"]
    mine = jit.parse_args(["--dataset", "fashion", "--epochs", "2", "--quick", "--model", "tiny",
                           "--cfg", "2"])
    assert (mine.epochs, mine.model, mine.patch, mine.cfg, mine.ema_warmup) == (2, "tiny", 4, 2.0, 22)
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        jit.parse_args(["--help"])
    assert "the CPU recipe: " + " ".join(QUICK_ARGV) + ";" in capsys.readouterr().out  # every value it sets


def test_warm_ups_longer_than_the_run_are_named_at_the_start(tmp_path, capsys):
    mnist_run(tmp_path, "--warmup-epochs", 5, "--ema-warmup", 10, "--epochs", 3)  # 2 steps an epoch: 6 steps
    out = capsys.readouterr().out
    assert "note: --warmup-epochs 5 is longer than the run" in out
    assert "note: --ema-warmup 10 is longer than the run" in out
    assert out.index("note: --warmup-epochs") < out.index("step 6/6")
    mnist_run(tmp_path, "--warmup-epochs", 1, "--ema-warmup", 2, "--epochs", 3, out="short")
    assert "note:" not in capsys.readouterr().out


def test_an_out_inside_the_image_folder_is_refused(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs", n=4)
    flags = ["--dataset", "folder", "--data-dir", folder, "--res", 16, "--batch-size", 4, *TINY]
    for out in (folder, tmp_path / "imgs" / "runs"):
        assert "is in the data folder" in refusal(capsys, *flags, "--out", out)
    assert not (tmp_path / "imgs" / "runs").exists()
    assert not [f for f in os.listdir(folder) if f.endswith(".lock") or f.startswith(".celeba_jit-cache")]
