"""Tests for cifar_cfg.py: parity with diffusers' UNet2DModel, the loss, the samplers, CFG, EMA, precisions, learning,
and the CLI (CIFAR-10 and 28 px Fashion-MNIST end to end, resume, compile, torchrun DDP and sampling, metrics, help,
interrupts, bad input). Tiny widths (--channels 32 32 32 32) and a few images keep it fast on a CPU."""
import copy
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import cifar_cfg
import common
from helpers import REPO, assert_user_error, make_cifar_root, make_fashion_root, run_script, shapes

TINY = ["--channels", "32", "32", "32", "32", "--batch-size", "4", "--warmup", "2", "--steps", "1",
        "--classes", "0", "--device", "cpu"]
FIGURES = ["last.pt", "loss.png", "classes.png", "guidance.png", "sampling.gif", "metrics.jsonl"]


# ------------------------------------------------------------------------------------- the network
class DiffusersUNet(torch.nn.Module):
    """The write-up's diffusers UNet2DModel behind our forward(x, t, y): the reference of the parity tests."""

    def __init__(self, channels=cifar_cfg.WRITEUP_CHANNELS, image_channels=3):
        super().__init__()
        from diffusers import UNet2DModel
        self.unet = UNet2DModel(
            sample_size=cifar_cfg.RES, in_channels=image_channels, out_channels=image_channels, layers_per_block=2,
            block_out_channels=tuple(channels), num_class_embeds=cifar_cfg.NULL + 1,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))

    def forward(self, x, t, y):
        return self.unet(x, t * 1000, class_labels=y).sample


def diffusers_to_ours(state):
    """diffusers UNet2DModel state-dict keys -> cifar_cfg.UNet keys; to_q/to_k/to_v are stacked into qkv."""
    rules = [(r"^time_embedding\.linear_1", "time_embed.0"), (r"^time_embedding\.linear_2", "time_embed.2"),
             (r"^class_embedding", "class_embed"), (r"^conv_norm_out", "out_norm"),
             (r"^down_blocks\.(\d)\.downsamplers\.0\.conv", r"encoder.\1.resample"),
             (r"^up_blocks\.(\d)\.upsamplers\.0\.conv", r"decoder.\1.resample.1"),
             (r"^down_blocks", "encoder"), (r"^up_blocks", "decoder"), (r"\.resnets\.", ".res."),
             (r"\.attentions\.", ".attn."), (r"^mid_block\.res\.0", "mid_res1"), (r"^mid_block\.res\.1", "mid_res2"),
             (r"^mid_block\.attn\.0", "mid_attn"), (r"time_emb_proj", "time_proj"), (r"conv_shortcut", "skip"),
             (r"group_norm", "norm"), (r"to_out\.0", "out")]
    ours = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        ours[key] = value
    for key in [k for k in ours if ".to_q." in k]:
        ours[key.replace(".to_q.", ".qkv.")] = torch.cat([ours.pop(key.replace(".to_q.", f".to_{n}.")) for n in "qkv"])
    return ours


@pytest.mark.parametrize("channels, image_channels, n_params", [
    ((64, 128, 256, 256), 3, 25_307_779),  # the write-up's configuration
    ((32, 32, 64, 64), 1, None),  # grey data (MNIST, Fashion-MNIST) at a CPU width
], ids=["writeup-rgb", "narrow-grey"])
def test_parity_with_diffusers_unet2dmodel(channels, image_channels, n_params):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = DiffusersUNet(channels, image_channels).eval()
    ours = cifar_cfg.UNet(channels, image_channels).eval()
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs == (n_params or n_theirs)
    ours.load_state_dict(diffusers_to_ours(theirs.unet.state_dict()))  # strict: every key maps, none left over
    x, t = torch.randn(3, image_channels, 32, 32), torch.tensor([0.0, 0.3137, 0.9991])
    y = torch.tensor([0, 7, cifar_cfg.NULL])
    with torch.no_grad():
        ref, out = theirs(x, t, y), ours(x, t, y)
    assert ref.shape == (3, image_channels, 32, 32) and ref.abs().mean() > 0.05  # not an agreement on zeros
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_shapes_and_skips():
    net = cifar_cfg.UNet([32, 32, 64, 64])
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([3, cifar_cfg.NULL])
    assert net(x, t, y).shape == (2, 3, 32, 32)
    assert cifar_cfg.UNet([32, 32, 64, 64], 1)(x[:, :1], t, y).shape == (2, 1, 32, 32)
    assert sum(len(lv.res) + (lv.resample is not None) for lv in net.encoder) + 1 == 12  # the 12 skip connections
    assert [len(lv.attn) for lv in net.encoder] == [0, 0, 2, 0] and [len(lv.attn) for lv in net.decoder] == [0, 3, 0, 0]
    assert cifar_cfg.timestep_embedding(torch.tensor([0.0]), 64)[0, :32].eq(1).all()  # cos first: cos(0) = 1


# ---------------------------------------------------------------------------------------- the loss
def test_loss_path_target_and_null_class_rate():
    seen = {}

    def model(x_t, t, y):
        seen.update(x_t=x_t, t=t, y=y)
        return torch.zeros_like(x_t)

    torch.manual_seed(0)
    n, p = 40_000, 0.3
    x, y = torch.randn(n, 3, 1, 1), torch.arange(n) % 10
    loss = cifar_cfg.flow_matching_loss(model, x, y, p)
    dropped = seen["y"] == cifar_cfg.NULL
    assert abs(dropped.float().mean().item() - p) < 0.01  # 4.4 sigma
    assert torch.equal(seen["y"][~dropped], y[~dropped])
    t = seen["t"][:, None, None, None]
    eps = (seen["x_t"] - t * x) / (1 - t)  # x_t = t x + (1-t) eps, so the loss of a zero prediction is |x - eps|^2
    torch.testing.assert_close(loss, ((x - eps) ** 2).mean(), rtol=1e-3, atol=0)
    assert 0 <= seen["t"].min() and seen["t"].max() <= 1 and abs(seen["t"].mean().item() - 0.5) < 0.01


# ------------------------------------------------------------------------------------ the samplers
def test_euler_exact_for_constant_velocity_and_uses_the_writeups_grid():
    x0, c = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(cifar_cfg.ode_solve(lambda x, t: c, x0, 7), x0 + c)
    # u = 2t integrates to 1; left-point Euler on steps+1 points gives sum 2 t_i h = 1 - h
    out = cifar_cfg.ode_solve(lambda x, t: torch.full_like(x, 2 * t), torch.zeros(1), 49)
    assert out.item() == pytest.approx(1 - 1 / 49, abs=1e-6)
    path = []
    last = cifar_cfg.ode_solve(lambda x, t: c, x0, 5, on_step=path.append)
    assert len(path) == 5 and torch.equal(path[-1], last)  # x after each of the 5 steps
    torch.testing.assert_close(path[0], x0 + c / 5)


def test_heun_second_order_euler_first_order_on_a_linear_field():
    a, x0 = -1.5, torch.ones(1, dtype=torch.float64)
    exact = x0 * np.exp(a)

    def err(solver, n):
        return (cifar_cfg.ode_solve(lambda x, t: a * x, x0, n, solver) - exact).abs().item()
    assert 3.7 < err("heun", 10) / err("heun", 20) < 4.3
    assert 1.8 < err("euler", 10) / err("euler", 20) < 2.2
    assert err("heun", 10) < err("euler", 10) / 10


# ---------------------------------------------------------------------------------------------- CFG
def test_cfg_identities_and_one_batched_forward():
    torch.manual_seed(0)
    net = cifar_cfg.UNet([32, 32, 32, 32]).eval()
    calls = []
    net.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))
    x, y, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 8]), 0.37
    with torch.no_grad():
        cond = net(x, torch.full((2,), t), y)
        uncond = net(x, torch.full((2,), t), torch.full((2,), cifar_cfg.NULL))
        calls.clear()
        guided = {w: cifar_cfg.guided_velocity(net, x, t, y, w) for w in (0.0, 1.0, 3.0)}
        per_sample = cifar_cfg.guided_velocity(net, x, t, y, torch.tensor([0.0, 3.0]))
    assert calls == [4, 4, 4, 4]  # cond and uncond of 2 samples in a single forward each time
    torch.testing.assert_close(guided[0.0], uncond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[1.0], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[3.0], 3 * cond - 2 * uncond, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(per_sample, torch.stack([guided[0.0][0], guided[3.0][1]]))


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_update_formula():
    torch.manual_seed(0)
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in ema.parameters()]
    cifar_cfg.ema_update(ema, net, 0.9)
    for e, b, p in zip(ema.parameters(), before, net.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


# ----------------------------------------------------------------------------- learning, precision
def labelled_shapes():
    images, labels = shapes(64, 16, 3)  # the U-Net is convolutional: 16x16 images keep this quick
    return torch.from_numpy(images).float() / 127.5 - 1, torch.from_numpy(labels)


def test_loss_falls_on_labelled_shapes():
    torch.manual_seed(0)
    x, y = labelled_shapes()
    net = cifar_cfg.UNet([32, 32, 32, 32])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    scaler = common.grad_scaler(torch.device("cpu"), "fp32")
    losses = []
    for _ in range(30):
        idx = torch.randint(0, len(x), (8,))
        losses.append(cifar_cfg.train_step(net, opt, scaler, x[idx], y[idx], 0.1, 1.0, "fp32").item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses  # measured: 1.29 -> 0.48


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_and_sampling_on_the_cpu(precision):
    """The autocast paths a GPU takes, run on the CPU; fp16 with its gradient scaler enabled (CPU scalers work)."""
    torch.manual_seed(0)
    x, y = labelled_shapes()
    net = cifar_cfg.UNet([32, 32, 32, 32])
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler = common.grad_scaler(torch.device("cpu"), precision)
    assert scaler.is_enabled() == (precision == "fp16")
    seen = []
    net.register_forward_hook(lambda m, inp, out: seen.append(out.dtype))
    losses = [cifar_cfg.train_step(net, opt, scaler, x[:4], y[:4], 0.1, 1.0, precision) for _ in range(3)]
    assert seen[0] == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]  # the forward really ran in it
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # weights stay fp32
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))  # the optimizer stepped
    images = cifar_cfg.generate(net, torch.randn(2, 3, 16, 16), y[:2], cfg=2.0, steps=2, precision=precision)
    assert images.dtype == torch.float32 and torch.isfinite(images).all() and images.abs().max() <= 1


def test_cpu_estimate_times_a_copy_and_leaves_the_run_untouched(capsys):
    torch.manual_seed(0)
    x, y = labelled_shapes()
    net = cifar_cfg.UNet([32, 32, 32, 32])
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    trial = copy.deepcopy(net)  # as train() does
    scaler = common.grad_scaler(torch.device("cpu"), "fp32")
    step = functools.partial(cifar_cfg.train_step, trial, torch.optim.AdamW(trial.parameters()), scaler, x[:4], y[:4],
                             0.1, 1.0, "fp32")
    common.estimate_time(step, total_steps=19_550, advice="for a CPU run pass --quick")
    first, note = capsys.readouterr().out.splitlines()
    assert first == "timing 2 steps to estimate the run time on this CPU..."
    assert "19,550 steps would take about" in note and note.endswith("for a CPU run pass --quick")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    assert not all(torch.equal(weights[k], v) for k, v in trial.state_dict().items())  # the copy did train


def test_quick_is_the_cpu_recipe_and_an_explicit_flag_wins():
    args = cifar_cfg.parse_args(["--quick", "--dataset", "fashion"])
    assert (args.channels, args.epochs, args.batch_size, args.lr, args.warmup, args.ema_decay) == (
        [32, 32, 64, 64], 1, 64, 1e-3, 100, 0.995)
    assert cifar_cfg.parse_args(["--quick", "--epochs", "3", "--lr", "5e-4"]).epochs == 3
    assert cifar_cfg.parse_args(["--quick", "--lr", "5e-4"]).lr == 5e-4
    assert cifar_cfg.parse_args([]).channels == [64, 128, 256, 256]


# -------------------------------------------------------------------------------------------- data
def test_28px_data_is_padded_exactly_and_cropped_back(tmp_path):
    make_fashion_root(tmp_path, n=20)
    padded, labels, shape = cifar_cfg.load_data("fashion", str(tmp_path))
    raw, raw_labels = common.load_dataset("fashion", str(tmp_path))
    assert shape == [1, 28, 28] and padded.shape == (20, 1, 32, 32) and padded.dtype == torch.uint8
    assert torch.equal(cifar_cfg.crop(padded, shape), raw) and torch.equal(labels, raw_labels)  # no resampling
    border = padded.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.eq(0).all()  # 2 px of black (-1 in the model) on each side
    cifar = torch.zeros(2, 3, 32, 32)
    assert torch.equal(cifar_cfg.crop(cifar, [3, 32, 32]), cifar)


# ---------------------------------------------------------------------------------------------- CLI
def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def run_inprocess(capsys, *argv):
    """main() wrapped by common.run, as the script runs it, without starting a Python per case."""
    capsys.readouterr()
    code = 0
    try:
        common.run(lambda: cifar_cfg.main([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    finally:
        while common.LOCKS:  # release the --out locks this process took (the OS would, at its end)
            common.LOCKS.pop().close()
    captured = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 2-epoch run on a fake CIFAR root (8 images, 2 steps an epoch), with samples saved at the end."""
    root = tmp_path_factory.mktemp("cifar")
    make_cifar_root(root / "data", n=8)
    out = root / "run"
    r = run_script("cifar_cfg.py", "--data-dir", root / "data", "--out", out, "--epochs", "2",
                   "--save-samples", root / "samples.npz", "--num-samples", "6", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, out, r


def test_cli_trains_and_writes_every_output(trained):
    root, out, r = trained
    for name in FIGURES:
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["script"] == "cifar_cfg" and ckpt["epoch"] == 2 and ckpt["step"] == 4 and len(ckpt["losses"]) == 4
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(ckpt)
    assert ckpt["image_shape"] == [3, 32, 32] and ckpt["config"]["dataset"] == "cifar10"
    assert not all(torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    samples = np.load(root / "samples.npz")
    assert samples["images"].shape == (6, 3, 32, 32) and samples["images"].dtype == np.uint8
    assert samples["labels"].tolist() == [0] * 6
    assert Image.open(out / "sampling.gif").n_frames == 2  # --steps 1: the noise, then x after the only step
    assert "precision: fp32" in r.stdout and "epoch 2/2" in r.stdout and "sampling 6/6" in r.stdout
    assert f"python evaluate.py {root / 'samples.npz'} --dataset cifar10 --data-dir {root / 'data'}" in r.stdout
    lines = read_metrics(out / "metrics.jsonl")
    steps = [m for m in lines if "step" in m]
    epochs = [m for m in lines if "step" not in m]
    assert [m["step"] for m in steps] == [2, 4] and [m["epoch"] for m in epochs] == [1, 2]
    assert set(epochs[0]) == {"time", "epoch", "loss", "lr", "img_per_s", "seconds"}
    assert epochs[1]["loss"] == pytest.approx(np.mean(ckpt["losses"][2:])) and epochs[1]["lr"] == 2e-4
    assert steps[0]["lr"] == pytest.approx(2e-4 * 2 / 2) and epochs[0]["img_per_s"] > 0  # warm-up done at step 2


def test_fashion_28px_grey_end_to_end_with_titles_and_class_names(tmp_path, capsys, monkeypatch):
    make_fashion_root(tmp_path / "data", n=8)
    grids, save_grid = {}, common.save_grid

    def recorded(images, path, nrow, **kw):
        grids[os.path.basename(path)] = (images.shape, kw)
        save_grid(images, path, nrow, **kw)
    monkeypatch.setattr(common, "save_grid", recorded)
    r = run_inprocess(capsys, "--dataset", "fashion", "--data-dir", tmp_path / "data", "--out", tmp_path / "run",
                      "--epochs", "1", *TINY, "--classes", "5", "9", "--solver", "heun",
                      "--save-samples", tmp_path / "f.npz", "--num-samples", "3")
    assert r.returncode == 0, r.stderr
    samples = np.load(tmp_path / "f.npz")
    assert samples["images"].shape == (3, 1, 28, 28) and samples["labels"].tolist() == [5, 9, 5]
    shape, kw = grids["classes.png"]
    assert shape == (20, 1, 28, 28) and kw["row_labels"] == ["Sandal", "Ankle boot"]
    assert kw["title"] == "Fashion-MNIST, 1 heun steps, w=2"
    assert grids["guidance.png"][1]["title"].startswith("Fashion-MNIST, 1 heun steps")
    frame = common.grid_image(torch.zeros(20, 1, 28, 28), 10, title="x")
    assert Image.open(tmp_path / "run" / "sampling.gif").height == frame.height  # frames at 28 px too
    assert "--dataset fashion" in r.stdout


def test_cli_sample_mode(trained, tmp_path, capsys):
    root, out, _ = trained
    r = run_inprocess(capsys, "--sample", out / "last.pt", "--out", tmp_path, "--classes", "3", "5", "--solver",
                      "heun", "--steps", "1", "--device", "cpu", "--save-samples", tmp_path / "s.npz",
                      "--num-samples", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"classes.png", "guidance.png", "sampling.gif", "s.npz"} <= set(os.listdir(tmp_path))
    assert np.load(tmp_path / "s.npz")["labels"].tolist() == [3, 5]
    assert Image.open(out / "classes.png").height < Image.open(tmp_path / "classes.png").height  # 1 row vs 2


def test_notebook_two_lines(trained):
    """Exactly the README's two lines."""
    path = str(trained[1] / "last.pt")
    from cifar_cfg import generate, load_model
    model, config = load_model(path)
    images = generate(model, torch.randn(10, 3, 32, 32), torch.arange(10), cfg=2.0, steps=49)
    assert images.shape == (10, 3, 32, 32) and images.abs().max() <= 1 and images.std() > 0.05
    assert config["dataset"] == "cifar10" and config["image_shape"] == [3, 32, 32] and not model.training
    ema = torch.load(path, weights_only=True)["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())  # the EMA weights by default


def test_bf16_training_run_on_the_cpu_loads_and_samples(trained, tmp_path, capsys):
    root = trained[0]
    r = run_inprocess(capsys, "--data-dir", root / "data", "--out", tmp_path, "--epochs", "1", "--precision",
                      "bf16", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "precision: bf16 (autocast; weights and checkpoints stay fp32)" in r.stdout
    assert all(np.isfinite(m["loss"]) for m in read_metrics(tmp_path / "metrics.jsonl"))
    model, config = cifar_cfg.load_model(str(tmp_path / "last.pt"))
    assert config["precision"] == "bf16" and all(p.dtype == torch.float32 for p in model.parameters())
    images = cifar_cfg.generate(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), cfg=2.0, steps=2,
                                precision="bf16")
    assert torch.isfinite(images).all()


def test_resume_equals_uninterrupted_and_appends_metrics(trained, tmp_path):
    root, out, _ = trained
    first = run_script("cifar_cfg.py", "--data-dir", root / "data", "--out", tmp_path, "--epochs", "1", *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    # a larger --epochs than the checkpoint's is allowed: the README's `--resume last.pt --epochs 100`
    second = run_script("cifar_cfg.py", "--data-dir", root / "data", "--out", tmp_path, "--epochs", "2",
                        "--resume", tmp_path / "last.pt", *TINY)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (out, tmp_path))
    assert a["step"] == b["step"] == 4 and a["losses"] == b["losses"]
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    strip = [{k: v for k, v in m.items() if k not in ("time", "img_per_s", "seconds")} for m in
             read_metrics(tmp_path / "metrics.jsonl")]
    assert strip == [{k: v for k, v in m.items() if k not in ("time", "img_per_s", "seconds")} for m in
                     read_metrics(out / "metrics.jsonl")]  # the resumed run appended epoch 2 to epoch 1's lines


@pytest.mark.slow
def test_compiled_and_eager_checkpoints_resume_each_other(trained, tmp_path):
    root, out, _ = trained
    compiled = run_script("cifar_cfg.py", "--data-dir", root / "data", "--out", tmp_path / "c", "--epochs", "3",
                          "--resume", out / "last.pt", "--compile", *TINY)  # eager -> compiled, samples compiled
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    ckpt = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and not any("_orig_mod" in k or "module." in k for k in ckpt["model"])
    assert (tmp_path / "c" / "classes.png").stat().st_size > 0 and np.isfinite(ckpt["losses"]).all()
    eager = run_script("cifar_cfg.py", "--data-dir", root / "data", "--out", tmp_path / "c", "--epochs", "4",
                       "--resume", tmp_path / "c" / "last.pt", *TINY)  # compiled -> eager
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=True)["step"] == 8


DRIVER = """import os, sys, time, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import cifar_cfg
out, rank = sys.argv[sys.argv.index('--out') + 1], int(os.environ['RANK'])
load, ema_update, emas = cifar_cfg.load_data, cifar_cfg.ema_update, []
def timed_load(*a):
    start = time.time()
    data = load(*a)
    time.sleep(0.5)  # a slow rank 0 makes a rank that does not wait show
    open(f'{{out}}/load{{rank}}.txt', 'w').write(f'{{start}} {{time.time()}}')
    return data
def first_ema(ema, net, decay):
    ema_update(ema, net, decay)
    if not emas:
        emas.append({{k: v.clone() for k, v in ema.state_dict().items()}})
cifar_cfg.load_data, cifar_cfg.ema_update = timed_load, first_ema
net = cifar_cfg.main()
torch.save({{'model': net.state_dict(), 'ema': emas[0]}}, f'{{out}}/rank{{rank}}.pt')
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_ddp_same_weights_same_ema_and_rank0_reads_first(tmp_path):
    make_cifar_root(tmp_path / "data", n=8)
    driver = tmp_path / "driver.py"  # runs the real main() under torchrun, then saves each rank's weights
    driver.write_text(DRIVER.format(repo=REPO))
    r = run_script(str(driver), "--data-dir", tmp_path / "data", "--out", tmp_path / "run", "--epochs", "1", *TINY,
                   torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / "run" / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 2 and len(ckpt["losses"]) == 2  # one mean over ranks per step
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # each rank draws its own noise
    for k in ranks[0]["model"]:
        assert torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]), k
        assert torch.equal(ranks[0]["model"][k], ckpt["model"][k]), k
        assert torch.equal(ranks[0]["ema"][k], ranks[1]["ema"][k]), k  # after one step: both from rank 0's init
    start1 = float((tmp_path / "run" / "load1.txt").read_text().split()[0])
    end0 = float((tmp_path / "run" / "load0.txt").read_text().split()[1])
    assert start1 >= end0  # rank 0 read (and would download) alone, first


@pytest.mark.slow
def test_torchrun_save_samples_equal_one_process(trained, tmp_path):
    root, out, _ = trained
    r = run_script("cifar_cfg.py", "--sample", out / "last.pt", "--out", tmp_path / "s", *TINY,
                   "--save-samples", tmp_path / "s.npz", "--num-samples", "6", torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote 6 samples") == 1 and "sampling 6/6" in r.stdout, r.stdout  # rank 0 alone reports
    one, two = np.load(root / "samples.npz"), np.load(tmp_path / "s.npz")  # 1 process (at the end of training)
    assert np.array_equal(one["labels"], two["labels"]) and np.array_equal(one["images"], two["images"])


@pytest.mark.slow
def test_torchrun_errors_reach_every_rank(trained, tmp_path):
    root, _, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_script("cifar_cfg.py", "--data-dir", root / "data", "--out", blocker / "run", "--epochs", "1", *TINY,
                   torchrun=2)
    assert r.returncode != 0 and r.stderr.count("cannot write to the output folder") == 2, r.stderr[-3000:]
    r = run_script("cifar_cfg.py", "--data-dir", blocker, "--out", tmp_path / "run", "--epochs", "1", *TINY,
                   torchrun=2)  # rank 0 fails to read: the others get its sentence instead of waiting
    assert r.returncode != 0 and r.stderr.count("CIFAR10 is not in") == 2, r.stderr[-3000:]
    (tmp_path / "locked").mkdir()
    common.lock_out(str(tmp_path / "locked"))  # another training run holds this --out
    try:  # rank 0 can't take the lock: the others get its sentence, not a broken connection
        r = run_script("cifar_cfg.py", "--data-dir", root / "data", "--out", tmp_path / "locked",
                       "--epochs", "1", *TINY, torchrun=2)
    finally:
        common.LOCKS.pop().close()
    assert r.returncode != 0 and r.stderr.count("in use by another training run") == 2, r.stderr[-3000:]


def test_interrupt_exits_130_in_one_line_and_leaves_no_temp(trained, tmp_path):
    root = trained[0]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "cifar_cfg.py"), "--data-dir", str(root / "data"),
                             "--out", str(tmp_path), "--epochs", "10000", *TINY], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.3)  # somewhere in epoch 2: training, writing a checkpoint or drawing
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines() == ["interrupted"]
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
    assert common.load_checkpoint(str(tmp_path / "last.pt"), "cifar_cfg")["epoch"] >= 1


def test_help_shows_each_default_once_and_no_none(capsys):
    r = run_inprocess(capsys, "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "(default: None)" not in text and "(default: False)" not in text
    for default in ("(default: cifar10)", "(default: auto)", "(default: 64 128 256 256)", "(default: 0.0002)",
                    "(default: 50)", "(default: 0)", "(default: 49)", "(default: 2.0)", "(default: 50000)"):
        assert text.count(default) >= 1, default
    assert text.count("best available") == 1 and "--overwrite" in text and "--precision" in text


# --------------------------------------------------------------------------------------- bad input
class Marker:
    """Pickles to a call of os.system: what a booby-trapped CIFAR batch would run on load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def bad_cases():
    """(id, argv builder, fragments of the one-line message); the builder gets (root, out, tmp) and may make files.
    The runs that a broken check would let through train for one epoch, never 50."""
    def data(root, out, tmp):
        return ["--data-dir", root / "data", "--out", tmp / "new", *TINY, "--epochs", "1"]

    def flag(*extra):
        return lambda root, out, tmp: data(root, out, tmp) + list(extra)

    def resume(*extra, epochs="3"):
        return lambda root, out, tmp: ["--data-dir", root / "data", "--out", out, *TINY, "--epochs", epochs,
                                       "--resume", out / "last.pt", *extra]

    def not_a_dataset(root, out, tmp):
        (tmp / "file").write_text("")
        return ["--data-dir", tmp / "file", "--out", tmp / "new", *TINY, "--epochs", "1"]

    def broken_batch(root, out, tmp):
        shutil.copytree(root / "data", tmp / "broken")
        (tmp / "broken" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04junk")
        return ["--data-dir", tmp / "broken", "--out", tmp / "new", *TINY, "--epochs", "1"]

    def booby_trapped_batch(root, out, tmp):
        shutil.copytree(root / "data", tmp / "evil")
        with open(tmp / "evil" / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
            pickle.dump({"data": Marker(tmp / "MARKER"), "labels": [0]}, f)
        return ["--data-dir", tmp / "evil", "--out", tmp / "new", *TINY, "--epochs", "1"]

    def other_script(root, out, tmp):
        common.save_checkpoint(str(tmp / "other.pt"), {"script": "mnist_unet", "config": {"x": 1}, "model": {}})
        return data(root, out, tmp) + ["--resume", tmp / "other.pt"]

    def truncated(root, out, tmp):
        (tmp / "cut.pt").write_bytes((out / "last.pt").read_bytes()[:5000])
        return ["--sample", tmp / "cut.pt", "--out", tmp / "new"]

    def save_samples_dir(root, out, tmp):
        (tmp / "x.npz").mkdir()
        return flag("--save-samples", tmp / "x.npz")(root, out, tmp)

    def locked(root, out, tmp):
        (tmp / "locked").mkdir()
        common.lock_out(str(tmp / "locked"))  # held by this process until run_inprocess ends
        return ["--data-dir", root / "data", "--out", tmp / "locked", *TINY, "--epochs", "1"]

    return [
        ("seed-negative", flag("--seed", "-1"), ["--seed", "between 0 and"]),
        ("seed-too-large", flag("--seed", str(2**64)), ["--seed", "between 0 and"]),
        ("lr-nan", flag("--lr", "nan"), ["--lr must be a finite number"]),
        ("cfg-inf", flag("--cfg", "inf"), ["--cfg must be a finite number"]),
        ("grad-clip-nan", flag("--grad-clip", "nan"), ["--grad-clip must be a finite number"]),
        ("ema-decay-nan", flag("--ema-decay", "nan"), ["--ema-decay must be a finite number"]),
        ("cfg-negative", flag("--cfg", "-1"), ["--cfg"]),
        ("num-samples-1e9", flag("--num-samples", "1000000000"), ["--num-samples", "1,000,000"]),
        ("num-samples-0", flag("--num-samples", "0"), ["--num-samples"]),
        ("device-gpu", flag("--device", "gpu"), ["--device gpu"]),
        ("classes-out-of-range", flag("--classes", "2", "10"), ["--classes", "0 to 9"]),
        ("channels-too-wide", flag("--channels", "32", "32", "32", "32000000000"), ["--channels", "4096"]),
        ("batch-larger-than-the-data", flag("--batch-size", "64"), ["fewer images than --batch-size 64"]),
        ("epochs-absurd", flag("--epochs", str(10**30)), ["--epochs", "100,000"]),
        ("channels-not-multiple-of-32", flag("--channels", "48", "64", "64", "64"), ["multiples of 32"]),
        ("save-samples-in-missing-folder", flag("--save-samples", "/nonexistent/dir/s.npz"), ["--save-samples"]),
        ("save-samples-is-a-directory", save_samples_dir, ["--save-samples", "not a regular file"]),
        ("save-samples-not-npz", flag("--save-samples", "/tmp/s.png"), ["--save-samples", ".npz"]),
        ("sample-and-resume", lambda root, out, tmp: ["--sample", out / "last.pt", "--resume", out / "last.pt"],
         ["--sample", "--resume"]),
        ("data-dir-without-cifar", not_a_dataset, ["CIFAR10 is not in", "--data-dir"]),
        ("unreadable-batch", broken_batch, ["data_batch_3", "not a CIFAR-10 python batch"]),
        ("booby-trapped-batch", booby_trapped_batch, ["data_batch_1", "not allowed"]),
        ("checkpoint-of-another-script", other_script, ["mnist_unet", "cifar_cfg.py"]),
        ("truncated-checkpoint", truncated, ["truncated or corrupt"]),
        ("resume-other-channels", resume("--channels", "64", "64", "64", "64"), ["trained with channels="]),
        ("resume-other-batch", resume("--batch-size", "8"), ["trained with batch_size="]),
        ("resume-other-lr", resume("--lr", "1e-3"), ["trained with lr="]),
        ("resume-other-flip", resume("--no-flip"), ["trained with no_flip="]),
        ("resume-other-dataset", resume("--dataset", "fashion"), ["trained with dataset="]),
        ("resume-no-more-epochs", resume(epochs="2"), ["trained 2 epochs already", "larger --epochs"]),
        ("fresh-run-into-a-run", lambda root, out, tmp: ["--data-dir", root / "data", "--out", out, *TINY,
                                                          "--epochs", "1"],
         ["already holds a checkpoint", "--overwrite"]),
        ("out-locked-by-another-run", locked, ["in use by another training run", "`fuser", "/.lock` names it"]),
        ("loss-turns-nan", flag("--lr", "1e30", "--warmup", "0", "--epochs", "3"),
         ["loss became nan", "--lr", "--precision fp32"]),
    ]


@pytest.mark.parametrize("make_argv, fragments", [c[1:] for c in bad_cases()], ids=[c[0] for c in bad_cases()])
def test_bad_input_is_one_sentence_exit_2_and_overwrites_nothing(trained, tmp_path, capsys, make_argv, fragments):
    root, out, _ = trained
    good = {name: digest(out / name) for name in FIGURES}
    assert_user_error(run_inprocess(capsys, *make_argv(root, out, tmp_path)), *fragments)
    assert good == {name: digest(out / name) for name in FIGURES}
    assert not (tmp_path / "MARKER").exists()  # the booby-trapped batch ran nothing
    assert not (tmp_path / "new" / "last.pt").exists()  # nothing trained, no NaN checkpoint written


def test_a_warmup_longer_than_the_run_is_named_at_the_start(trained, tmp_path, capsys):
    root = trained[0]
    r = run_inprocess(capsys, "--data-dir", root / "data", "--out", tmp_path, *TINY, "--epochs", "1", "--warmup", "5")
    assert r.returncode == 0, r.stderr
    assert "note: --warmup 5 is longer than the run's 2 steps, so the learning rate never reaches --lr" in r.stdout
    assert "note: --warmup" not in run_inprocess(capsys, "--data-dir", root / "data", "--out", tmp_path / "b", *TINY,
                                                 "--epochs", "1").stdout  # TINY's --warmup 2 fits in 2 steps


def test_overwrite_starts_a_fresh_run_in_a_used_out(trained, tmp_path, capsys):
    root, out, _ = trained
    shutil.copytree(out, tmp_path / "run")
    r = run_inprocess(capsys, "--data-dir", root / "data", "--out", tmp_path / "run", *TINY, "--epochs", "1",
                      "--overwrite")
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1
    assert [m["epoch"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "step" not in m] == [1]


def test_benchmark_times_ours_next_to_diffusers(capsys, monkeypatch):
    """The write-up's diffusers UNet2DModel and ours through the shared benchmark, one training step and one
    sampling call each, after a warm-up."""
    pytest.importorskip("diffusers")
    calls = {"ours": 0, "diffusers": 0}
    for name, cls in (("ours", cifar_cfg.UNet), ("diffusers", DiffusersUNet)):
        def counted(self, *a, _forward=cls.forward, _name=name):
            calls[_name] += 1
            return _forward(self, *a)
        monkeypatch.setattr(cls, "forward", counted)
    device = torch.device("cpu")
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    rows = {}
    for name, net in (("ours", cifar_cfg.UNet([32, 32, 32, 32])), ("diffusers", DiffusersUNet([32, 32, 32, 32]))):
        opt = torch.optim.AdamW(net.parameters())
        scaler = common.grad_scaler(device, "bf16")
        step = functools.partial(cifar_cfg.train_step, net, opt, scaler, x, y, 0.1, 1.0, "bf16")
        sample = functools.partial(cifar_cfg.generate, net, x, y, 2.0, 1, "euler", "bf16")
        rows[name] = (step, sample, 2)
    speeds = common.benchmark(rows, device, calls=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "| model | train img/s | sample img/s |" and len(lines) == 5
    assert set(speeds) == {"ours", "diffusers"} and all(v > 0 for s in speeds.values() for v in s)
    assert calls == {"ours": 4, "diffusers": 4}  # warm-up and 1 timed call: a training step and a sampling step each


def test_benchmark_prints_eager_img_per_s(capsys):
    args = cifar_cfg.validate(cifar_cfg.parse_args(["--benchmark", "--channels", "32", "32", "32", "32",
                                                    "--batch-size", "2", "--steps", "3", "--precision", "bf16"]))
    speeds = cifar_cfg.benchmark(args, torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("precision: bf16") and "bf16, batch 2; sampling: 3 euler steps" in lines[1]
    assert set(speeds) == {"eager"} and all(v > 0 for v in speeds["eager"])
    assert next(line for line in lines if line.startswith("| eager |"))


@pytest.mark.slow
def test_benchmark_with_compile_times_eager_and_compiled(capsys):
    args = cifar_cfg.validate(cifar_cfg.parse_args(["--benchmark", "--compile", *TINY]))
    speeds = cifar_cfg.benchmark(args, torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert set(speeds) == {"eager", "compiled"} and all(v > 0 for s in speeds.values() for v in s)
    assert lines[-1].startswith("| compiled |")
