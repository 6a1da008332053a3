"""Tests for mnist_unet.py: the U-Net, the flow-matching identities, the losses, the solver, CFG, the LR schedule
and the ablation's optimizer, learning on structured digits, the CLI end to end (MNIST and Fashion-MNIST), figures,
progress, metrics, precision, --compile, --resume, interrupts and every bad input. All on CPU, tiny models, data
made here."""
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import mnist_unet as m
from helpers import REPO, assert_user_error, make_fashion_root, make_mnist_root, run_script, shapes

TINY = ["--hidden", "8", "--batch-size", "32", "--epochs", "2", "--steps", "4", "--device", "cpu"]


def main(*argv):
    """mnist_unet.main in this process; releases the --out lock afterwards, as the end of a process would."""
    try:
        return m.main([str(a) for a in argv])
    finally:
        while common.LOCKS:
            common.LOCKS.pop().close()


def folder_digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if f != ".lock"}


def load(path):
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("cond", ["none", "time", "class"])
def test_unet_shapes_and_conditioning(cond):
    torch.manual_seed(0)
    D, B = 8, 3
    model = m.UNet(D, cond).train()  # batch statistics: a fresh net's eval-mode BN would shrink every signal to ~0
    x, t, y = torch.randn(B, 1, 28, 28), torch.rand(B), torch.tensor([0, 3, 9])
    # the CS180 path: 28 -> 14 -> 7 -> 1 (flatten) -> 7 -> 14 -> 28, with 2D channels at the bottleneck
    assert model.e2(model.e1(model.e0(x))).shape == (B, 2 * D, 7, 7)
    assert model.flatten(torch.randn(B, 2 * D, 7, 7)).shape == (B, 2 * D, 1, 1)
    assert model.unflatten(torch.randn(B, 2 * D, 1, 1)).shape == (B, 2 * D, 7, 7)
    args = {"none": (), "time": (t,), "class": (t, y)}[cond]
    out = model(x, *args)
    assert out.shape == (B, 1, 28, 28) and torch.isfinite(out).all()
    if cond != "none":  # the conditioning reaches the output
        assert not torch.allclose(model(x, 1 - t, *args[1:]), out, atol=1e-5)
    if cond == "class":
        assert not torch.allclose(model(x, t, torch.tensor([5, 5, 5])), out, atol=1e-5)
        assert not torch.allclose(model(x, t, torch.full((3,), m.NULL)), out, atol=1e-5)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert ({"fc1_t", "fc2_t"} <= names) == (cond != "none")
    assert ({"fc1_c", "fc2_c"} <= names) == (cond == "class")


def test_null_label_is_the_all_zero_one_hot():
    torch.manual_seed(0)
    model = m.UNet(4, "class")
    seen = []
    model.fc1_c.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    model(torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([2, m.NULL, 9]))
    assert seen[0].tolist() == [[float(k == 2) for k in range(10)], [0.0] * 10, [float(k == 9) for k in range(10)]]


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_make_model_takes_a_device_string_or_object(device):
    model = m.make_model("class", 8, device)
    assert isinstance(model, m.UNet) and next(model.parameters()).device.type == "cpu"


# ------------------------------------------------------------------------------------ the method
def test_flow_path_identities():
    torch.manual_seed(0)
    x, eps = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    x_t0, v = m.flow_path(x, eps, torch.zeros(4))
    x_t1, _ = m.flow_path(x, eps, torch.ones(4))
    assert torch.equal(x_t0, eps) and torch.allclose(x_t1, x)   # t=0 noise, t=1 data
    assert torch.allclose(v, x - eps)
    t, h = torch.tensor([0.1, 0.3, 0.6, 0.9]), 1e-3               # v is dx_t/dt
    numeric = (m.flow_path(x, eps, t + h)[0] - m.flow_path(x, eps, t - h)[0]) / (2 * h)
    assert torch.allclose(numeric, v, atol=1e-2)
    assert torch.allclose(m.flow_path(x, eps, torch.full((4,), 0.5))[0], (x + eps) / 2)


class Recorder(torch.nn.Module):
    """A stand-in network that records its inputs and returns zeros."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t=None, y=None):
        self.calls.append((x, t, y))
        return torch.zeros_like(x)


@pytest.mark.parametrize("dropout", [0.0, 0.1, 1.0])
def test_flow_matching_loss_drops_labels_to_null_at_the_asked_rate(dropout):
    torch.manual_seed(0)
    net, x, y = Recorder(), torch.zeros(20000, 1, 1, 1), torch.arange(20000) % 10
    m.flow_matching_loss(net, x, y, dropout)
    seen = net.calls[0][2]
    dropped = seen == m.NULL
    assert dropped.float().mean().item() == pytest.approx(dropout, abs=0.01)
    assert torch.equal(seen[~dropped], y[~dropped])  # the others keep their label
    t = net.calls[0][1]
    assert 0 <= t.min() and t.max() <= 1 and t.mean().item() == pytest.approx(0.5, abs=0.01)  # t ~ U[0, 1]
    m.flow_matching_loss(net, x, None, dropout)
    assert net.calls[1][2] is None  # the time-only model gets no label


def test_denoising_loss_input_is_x_plus_2_sigma_z_or_pure_noise():
    torch.manual_seed(0)
    net, x = Recorder(), torch.full((64, 1, 28, 28), 0.7)
    m.denoising_loss(net, x, 0.5)
    assert (net.calls[0][0] - x).std().item() == pytest.approx(1.0, rel=0.02)  # CS180's sigma on [0, 1]: 2*sigma
    m.denoising_loss(net, x, None)
    assert net.calls[1][0].mean().abs().item() < 0.02 and net.calls[1][0].std().item() == pytest.approx(1, rel=0.02)
    assert m.denoising_loss(net, x, None).item() == pytest.approx(0.49)  # MSE of the zero output against x = 0.7


def test_ode_solve_euler_exact_on_constant_velocity_and_first_order_on_linear_in_t():
    x0, c = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    for steps in (1, 7, 50):
        path = []
        x1 = m.ode_solve(lambda x, t: c, x0, steps, on_step=path.append)
        assert len(path) == steps and torch.equal(path[-1], x1)
        assert torch.allclose(x1, x0 + c, atol=1e-5)
    ts = []  # Euler evaluates the field at t = 0, 1/steps, ..., 1 - 1/steps
    m.ode_solve(lambda x, t: ts.append(t) or torch.zeros_like(x), x0, 4)
    assert ts == pytest.approx([0, 0.25, 0.5, 0.75])
    # v = 2t: the exact end point is x0 + 1; Euler (left end of each step) in 4 steps gives x0 + 0.75
    assert torch.allclose(m.ode_solve(lambda x, t: torch.full_like(x, 2 * t), x0, 4), x0 + 0.75)


def test_guided_velocity_is_cfg_from_one_batched_forward():
    torch.manual_seed(0)
    model = m.UNet(8, "class")
    x, y, t = torch.randn(3, 1, 28, 28), torch.tensor([1, 4, 7]), torch.full((3,), 0.3)
    with torch.no_grad():
        for _ in range(30):  # give BatchNorm real running statistics, then compare in eval mode as sampling does
            model(x, t, y)
        model.eval()
        u_cond, u_uncond = model(x, t, y), model(x, t, torch.full((3,), m.NULL))
        calls = []
        hook = model.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
        guided = {w: m.guided_velocity(model, x, 0.3, y, w) for w in (0, 1, 5)}
        hook.remove()
    assert calls == [6, 6, 6]  # cond and uncond in one forward of twice the batch
    assert torch.allclose(guided[0], u_uncond, atol=1e-5)
    assert torch.allclose(guided[1], u_cond, atol=1e-5)
    assert torch.allclose(guided[5], u_uncond + 5 * (u_cond - u_uncond), atol=1e-4)
    assert not torch.allclose(u_cond, u_uncond, atol=1e-4)


def test_lr_schedule_ends_at_a_tenth_and_the_ablation_is_adamw_at_a_tenth_without_scheduler():
    model = m.UNet(4, "time")
    for epochs in (1, 4, 10):
        opt, sched = m.make_optimizer(m.RUNS["fm"], model, 1e-2, epochs)
        assert type(opt) is torch.optim.Adam
        for _ in range(epochs):
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3, rel=1e-9)
    assert m.RUNS["cfg_nosched"]["part"] == "cfg"  # the ablation takes cfg's preset: its epochs, D, batch
    for lr in (m.RECIPE["cfg"]["lr"], m.QUICK["cfg"]["lr"], 3e-3):
        assert m.make_optimizer(m.RUNS["cfg"], model, lr, 10)[0].param_groups[0]["lr"] == lr
        opt, sched = m.make_optimizer(m.RUNS["cfg_nosched"], model, lr, 10)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr / 10)
    assert sched is None and type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["weight_decay"] == 0.01
    assert m.make_optimizer(m.RUNS["denoise"], model, 1e-4, 5)[1] is None


def train_on_shapes(steps, precision="fp32", seed=0):
    torch.manual_seed(seed)
    images, labels = shapes(256, classes=2)
    x, y = m.normalise(torch.from_numpy(images)), torch.from_numpy(labels)
    model = m.UNet(8, "class")
    opt, _ = m.make_optimizer(m.RUNS["cfg"], model, 3e-3, 1)
    scaler = common.grad_scaler(torch.device("cpu"), precision)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,))
        losses.append(m.train_step(m.RUNS["cfg"], model, opt, scaler, x[idx], y[idx], precision).item())
    return model, losses, x, y


def test_class_conditioned_model_learns_and_cfg_follows_the_class():
    """Two classes of distinct squares: the loss falls well below its start; guided samples look like their class."""
    model, losses, x, y = train_on_shapes(120)
    start, end = np.mean(losses[:10]), np.mean(losses[-30:])
    assert end < 0.35 * start, (start, end)
    means = torch.stack([x[y == k].mean(0) for k in (0, 1)])
    asked = torch.tensor([0, 1] * 8)
    samples = m.generate(model, torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)), asked,
                         cfg=3.0, steps=20)
    dist = ((samples[:, None] - means[None]) ** 2).flatten(2).mean(2)  # (16, 2): distance to each class mean
    own, other = dist[torch.arange(16), asked], dist[torch.arange(16), 1 - asked]
    assert (own < other).float().mean() >= 0.9, (own, other)
    assert own.mean() < 0.5 * other.mean(), (own.mean(), other.mean())


def test_fp16_step_with_an_enabled_grad_scaler_on_the_cpu():
    model, losses, _, _ = train_on_shapes(6, precision="fp16")
    assert all(np.isfinite(losses)) and all(torch.isfinite(p).all() for p in model.parameters())
    assert common.grad_scaler(torch.device("cpu"), "fp16").is_enabled()


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One tiny run of every part into <tmp>/runs/mnist_unet; the other CLI tests reuse its checkpoints."""
    tmp = tmp_path_factory.mktemp("cli")
    root, out = make_mnist_root(tmp / "mnist", n=96), tmp / "runs" / "mnist_unet"
    result = run_script("mnist_unet.py", "--data-dir", root, "--out", out, *TINY, "--save-samples", tmp / "s.npz",
                        "--num-samples", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, root, out, result


def test_cli_writes_every_figure_checkpoint_and_npz(cli_run):
    tmp, root, out, result = cli_run
    # the CPU estimate says what it does before it goes silent timing, then points to --quick
    assert result.stdout.index("timing 2 steps of each run") < result.stdout.index("would take about")
    assert "use --quick" in result.stdout and "precision: fp32" in result.stdout
    expected = ["denoise_noising", "denoise_loss", "denoise_epoch1", "denoise_epoch2", "denoise_ood",
                "noise_loss", "noise_samples",
                "fm_epoch1", "fm_epoch2", "fm_loss", "fm_path", "fm_velocity", "fm_trajectory",
                "cfg_epoch1", "cfg_epoch2", "cfg_loss", "cfg_guidance", "cfg_trajectory",
                "cfg_nosched_epoch2", "cfg_nosched_loss"]
    for name in expected:
        with open(out / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    for gif in ("fm_trajectory.gif", "cfg_trajectory.gif"):
        assert open(out / gif, "rb").read(6) == b"GIF89a"
    for run in ("denoise", "noise", "fm", "cfg", "cfg_nosched"):
        ckpt = common.load_checkpoint(str(out / f"{run}.pt"), "mnist_unet")
        assert ckpt["run"] == run and ckpt["epoch"] == 2 and ckpt["step"] == 2 * (96 // 32)
        assert len(ckpt["losses"]) == ckpt["step"] and ckpt["settings"]["hidden"] == 8
        assert {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(ckpt)
        assert len(ckpt["rng"]) == 1 and ckpt["config"]["part"] == "all"  # one process: one RNG state
        assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    ckpt = common.load_checkpoint(str(out / "fm.pt"), "mnist_unet")
    assert ckpt["scheduler"]["_last_lr"][0] == pytest.approx(1e-2 * 0.1)  # the LR ended at 0.1*lr
    ablation = common.load_checkpoint(str(out / "cfg_nosched.pt"), "mnist_unet")
    assert ablation["scheduler"] is None and ablation["settings"]["lr"] == pytest.approx(1e-2)
    assert ablation["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    assert ablation["optimizer"]["param_groups"][0]["weight_decay"] == 0.01  # AdamW's
    npz = np.load(tmp / "s.npz")
    assert npz["images"].dtype == np.uint8 and npz["images"].shape == (12, 1, 28, 28)
    assert npz["labels"].tolist() == [k % 10 for k in range(12)]
    assert f"python evaluate.py {tmp / 's.npz'} --dataset mnist --data-dir {root}" in result.stdout


def test_metrics_file_has_a_line_per_epoch_of_every_run(cli_run):
    _, _, out, _ = cli_run
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    runs = ("denoise", "noise", "fm", "cfg", "cfg_nosched")
    # an epoch of 3 steps is shorter than LOG_EVERY: its steps' line is written with the epoch's checkpoint
    assert [(r["run"], r["epoch"], r.get("step")) for r in lines] == [
        (run, e, step) for run in runs for e in (1, 2) for step in (3 * e, None)]
    epochs = [r for r in lines if "step" not in r]
    for r in epochs:
        assert set(r) == {"time", "run", "epoch", "loss", "lr", "img_per_s", "seconds"}
        assert np.isfinite(r["loss"]) and r["img_per_s"] > 0 and r["seconds"] > 0
    for r in lines:
        if "step" in r:
            assert set(r) == {"time", "run", "step", "epoch", "loss", "lr"} and np.isfinite(r["loss"])
    fm = [r for r in epochs if r["run"] == "fm"]
    assert fm[0]["lr"] == pytest.approx(1e-2) and fm[1]["lr"] == pytest.approx(1e-2 * 0.1 ** 0.5)
    losses = common.load_checkpoint(str(out / "fm.pt"), "mnist_unet")["losses"]
    assert fm[1]["loss"] == pytest.approx(np.mean(losses[3:]))


def test_notebook_two_lines(cli_run, monkeypatch):
    monkeypatch.chdir(cli_run[0])
    from mnist_unet import generate, load_model
    model, config = load_model("runs/mnist_unet/cfg.pt")
    images = generate(model, torch.randn(10, 1, 28, 28), torch.arange(10), cfg=5.0, steps=50)
    assert images.shape == (10, 1, 28, 28) and torch.isfinite(images).all() and images.std() > 0
    assert config["run"] == "cfg" and config["hidden"] == 8 and config["dataset"] == "mnist" and not model.training


def test_cli_sample_only(cli_run, tmp_path, capsys):
    _, _, out, _ = cli_run
    m.main(["--sample", str(out / "fm.pt"), "--out", str(tmp_path / "fm"), "--num-samples", "5", "--steps", "3",
            "--device", "cpu"])
    npz = np.load(tmp_path / "fm" / "samples.npz")
    assert npz["images"].shape == (5, 1, 28, 28) and npz["labels"].tolist() == [-1] * 5  # unconditional
    m.main(["--sample", str(out / "cfg.pt"), "--out", str(tmp_path / "cfg"), "--num-samples", "20", "--steps", "3",
            "--device", "cpu", "--save-samples", str(tmp_path / "cfg.npz")])
    assert np.load(tmp_path / "cfg.npz")["labels"].tolist() == [k % 10 for k in range(20)]
    assert "sampling 20/20" in capsys.readouterr().out
    from PIL import Image
    grid = np.asarray(Image.open(tmp_path / "cfg" / "samples.png").convert("L"))
    assert grid.shape[0] > 10 * 56 and grid.std() > 10  # a row per class (2 samples each at scale 2), not blank


def test_npz_noise_comes_from_seed_and_index_so_the_file_does_not_depend_on_the_batch_size(cli_run, tmp_path):
    """Sample j starts from common.sample_noise(seed, j): the same file at batch 3 and batch 7, another file
    for another seed."""
    _, root, out, _ = cli_run
    model, _ = m.load_model(str(out / "cfg.pt"))
    files = {}
    for batch, seed in ((3, 7), (7, 7), (7, 8)):
        args = m.parse_args(["--num-samples", "10", "--steps", "2", "--seed", str(seed), "--data-dir", str(root)])
        path = tmp_path / f"b{batch}-s{seed}.npz"
        m.write_samples(model, "cfg", str(path), args, 2.0, "fp32", "mnist", batch=batch)
        files[batch, seed] = np.load(path)
    assert np.array_equal(files[3, 7]["images"], files[7, 7]["images"])
    assert not np.array_equal(files[7, 7]["images"], files[7, 8]["images"])
    assert files[3, 7]["labels"].tolist() == list(range(10))  # labels 0..9 in turn
    noise = torch.stack([common.sample_noise(7, j, (1, 28, 28)) for j in range(10)])
    expected = m.generate(model, noise, torch.arange(10), cfg=2.0, steps=2)
    assert np.array_equal(files[3, 7]["images"], common.to_uint8(expected).numpy())
    fm, _ = m.load_model(str(out / "fm.pt"))
    m.write_samples(fm, "fm", str(tmp_path / "fm.npz"), args, 2.0, "fp32", "mnist", batch=4)
    assert np.load(tmp_path / "fm.npz")["labels"].tolist() == [-1] * 10  # unconditional


def capture_figures(monkeypatch):
    """Record every figure's keyword arguments (and still write it)."""
    calls = {}
    for name in ("save_grid", "save_gif", "plot_curves"):
        original = getattr(common, name)

        def record(images, path, *a, _original=original, **kw):
            calls[os.path.basename(str(path if isinstance(path, (str, os.PathLike)) else images))] = kw
            return _original(images, path, *a, **kw)
        monkeypatch.setattr(common, name, record)
    return calls


def test_fashion_run_titles_every_figure_labels_rows_with_class_names_and_shows_each_runs_progress(
        tmp_path, monkeypatch, capsys):
    root = make_fashion_root(tmp_path / "data", n=64)
    figures = capture_figures(monkeypatch)
    monkeypatch.setattr(common, "Progress", functools.partial(common.Progress, every=0))  # every update prints
    main("--dataset", "fashion", "--data-dir", root, "--out", tmp_path / "out", *TINY, "--epochs", "1")
    names = common.CLASS_NAMES["fashion"]
    for figure, kw in figures.items():
        assert kw.get("title"), figure
    for figure in ("cfg_epoch1.png", "cfg_trajectory.png", "cfg_guidance.png"):
        assert figures[figure]["row_labels"] == names and "Fashion-MNIST" in figures[figure]["title"], figure
    assert "w=5" in figures["cfg_epoch1.png"]["title"] and "4 Euler steps" in figures["cfg_epoch1.png"]["title"]
    assert figures["denoise_ood.png"]["col_labels"][3] == "sigma=0.5"
    assert figures["cfg_guidance.png"]["col_labels"][::2] == ["w=0", "w=1", "w=3", "w=5", "w=7"]
    out = capsys.readouterr().out
    # each run's own progress: [run] step done/total | epoch | loss | img/s | ETA (of the run)
    line = r"^\[(\w+)\] step (\d+)/(\d+) \| epoch (\d+/\d+) \| loss [\d.]+ \| \d+ img/s \| ETA \d+m\d\ds$"
    progress = re.findall(line, out, re.M)
    assert progress == [(run, str(step), "2", "1/1") for run in ("denoise", "noise", "fm", "cfg", "cfg_nosched")
                        for step in (1, 2)]


def test_resume_matches_an_uninterrupted_run_appends_metrics_and_epochs_may_grow(tmp_path, monkeypatch):
    monkeypatch.setattr(m, "LOG_EVERY", 2)
    root = make_mnist_root(tmp_path / "mnist", n=96)
    flags = ["--part", "fm", "--data-dir", root, *TINY, "--epochs", "3"]
    main(*flags, "--out", tmp_path / "full")
    full = load(tmp_path / "full" / "fm.pt")
    crash_after(monkeypatch, 1)  # the machine dies right after the first epoch's checkpoint
    with pytest.raises(KeyboardInterrupt):
        main(*flags, "--out", tmp_path / "cut")
    assert load(tmp_path / "cut" / "fm.pt")["epoch"] == 1
    before = open(tmp_path / "cut" / "metrics.jsonl").read()
    main(*flags[2:], "--out", tmp_path / "cut", "--resume", tmp_path / "cut" / "fm.pt")  # --part from the ckpt
    resumed = load(tmp_path / "cut" / "fm.pt")
    assert resumed["step"] == full["step"] == 9 and resumed["losses"] == full["losses"]
    for k, v in full["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert resumed["scheduler"] == full["scheduler"] and resumed["config"]["part"] == "fm"  # for the next resume
    after = open(tmp_path / "cut" / "metrics.jsonl").read()
    assert after.startswith(before)  # appended, not rewritten
    lines = [json.loads(line) for line in after.splitlines()]
    # the harness writes an epoch's line after its checkpoint: the crash between them cost epoch 1's line
    assert [r["epoch"] for r in lines if "img_per_s" in r] == [2, 3]
    # a line per LOG_EVERY = 2 steps, and one for the steps left at each checkpoint (3 steps an epoch)
    groups = [r for r in lines if "step" in r]
    assert [(r["step"], r["epoch"]) for r in groups] == [(2, 1), (3, 1), (5, 2), (6, 2), (8, 3), (9, 3)]
    assert set(groups[0]) == {"time", "run", "step", "epoch", "loss", "lr"}
    assert groups[0]["loss"] == pytest.approx(np.mean(full["losses"][:2]))
    assert groups[1]["loss"] == pytest.approx(full["losses"][2]) and groups[2]["loss"] == pytest.approx(
        np.mean(full["losses"][3:5]))
    # --epochs may grow: the run trains on, the LR decaying at the same per-epoch rate
    main(*flags[2:-2], "--epochs", "4", "--out", tmp_path / "cut", "--resume", tmp_path / "cut" / "fm.pt")
    grown = load(tmp_path / "cut" / "fm.pt")
    assert grown["epoch"] == 4 and grown["step"] == 12 and grown["losses"][:9] == full["losses"]
    assert grown["scheduler"]["_last_lr"][0] == pytest.approx(1e-2 * 0.1 ** (4 / 3))


def crash_after(monkeypatch, n):
    """The machine dies right after the n-th checkpoint written from now on."""
    save, calls = common.save_checkpoint, []

    def save_then_crash(path, state):
        save(path, state)
        calls.append(path)
        if len(calls) == n:
            monkeypatch.setattr(common, "save_checkpoint", save)
            raise KeyboardInterrupt
    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)


def test_resume_goes_on_with_the_rest_of_the_part(tmp_path, monkeypatch):
    """--part cfg cut in cfg, resumed (without --part: the checkpoint knows it) and cut when cfg has finished;
    resumed from the finished cfg.pt, which is skipped, and cut in cfg_nosched; resumed again: both runs end as
    in an uninterrupted run, and the ablation's loss plot still compares with cfg's."""
    root = make_mnist_root(tmp_path / "mnist", n=96)
    flags = ["--data-dir", root, *TINY]
    main(*flags, "--part", "cfg", "--out", tmp_path / "full")
    cut = tmp_path / "cut"
    crash_after(monkeypatch, 1)  # after cfg's epoch 1
    with pytest.raises(KeyboardInterrupt):
        main(*flags, "--part", "cfg", "--out", cut)
    crash_after(monkeypatch, 1)  # after cfg's epoch 2: cfg has finished, cfg_nosched has not started
    with pytest.raises(KeyboardInterrupt):
        main(*flags, "--out", cut, "--resume", cut / "cfg.pt")
    finished = (cut / "cfg.pt").read_bytes()
    assert load(cut / "cfg.pt")["epoch"] == 2 and not os.path.exists(cut / "cfg_nosched.pt")
    crash_after(monkeypatch, 1)  # the finished cfg is skipped (not retrained): cut after cfg_nosched's epoch 1
    with pytest.raises(KeyboardInterrupt):
        main(*flags, "--out", cut, "--resume", cut / "cfg.pt")
    assert (cut / "cfg.pt").read_bytes() == finished and load(cut / "cfg_nosched.pt")["epoch"] == 1
    figures = capture_figures(monkeypatch)
    curves = {}
    plot = common.plot_curves
    monkeypatch.setattr(common, "plot_curves", lambda path, c, **kw: curves.update({os.path.basename(path): c})
                        or plot(path, c, **kw))
    main(*flags, "--out", cut, "--resume", cut / "cfg_nosched.pt")
    for run in ("cfg", "cfg_nosched"):
        full, resumed = load(tmp_path / "full" / f"{run}.pt"), load(cut / f"{run}.pt")
        assert resumed["epoch"] == 2 and resumed["losses"] == full["losses"], run
        for k, v in full["model"].items():
            assert torch.equal(resumed["model"][k], v), (run, k)
    assert os.path.isfile(cut / "cfg_nosched_epoch2.png") and "cfg_nosched_epoch2.png" in figures
    cfg_losses = load(cut / "cfg.pt")["losses"]
    plotted = curves["cfg_nosched_loss.png"]
    assert list(curves) == ["cfg_nosched_loss.png"] and plotted["cfg (Adam, ExponentialLR)"] == cfg_losses
    assert plotted["cfg_nosched (AdamW, lr/10, constant)"] == load(cut / "cfg_nosched.pt")["losses"]


def test_bf16_autocast_trains_samples_and_saves_an_fp32_checkpoint(tmp_path, capsys):
    root = make_mnist_root(tmp_path / "mnist", n=64)
    main("--part", "cfg", "--quick", "--data-dir", root, "--out", tmp_path / "out", *TINY, "--epochs", "1",
         "--precision", "bf16", "--save-samples", tmp_path / "s.npz", "--num-samples", "10")
    assert "precision: bf16" in capsys.readouterr().out
    ckpt = common.load_checkpoint(str(tmp_path / "out" / "cfg.pt"), "mnist_unet")
    assert np.isfinite(ckpt["losses"]).all() and all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())
    model, _ = m.load_model(str(tmp_path / "out" / "cfg.pt"))
    images = m.generate(model, torch.randn(4, 1, 28, 28), torch.arange(4), cfg=3.0, steps=3, precision="bf16")
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (10, 1, 28, 28) and npz["images"].std() > 0


def test_fp16_is_refused_on_a_cpu_and_an_fp16_run_saves_its_grad_scaler_and_resumes_it(tmp_path, monkeypatch):
    root = make_mnist_root(tmp_path / "mnist", n=64)
    flags = ["--part", "fm", "--data-dir", root, "--out", tmp_path / "out", *TINY, "--precision", "fp16"]
    with pytest.raises(common.UserError, match="--precision fp16 needs a CUDA GPU"):
        main(*flags, "--epochs", "1")
    assert not os.path.exists(tmp_path / "out")
    monkeypatch.setattr(common, "choose_precision", lambda flag, *a: flag)  # fp16 as on a GPU: autocast, scaler
    main(*flags, "--epochs", "1")
    first = load(tmp_path / "out" / "fm.pt")
    assert first["scaler"]["scale"] > 0 and np.isfinite(first["losses"]).all()
    main(*flags, "--epochs", "2", "--resume", tmp_path / "out" / "fm.pt")
    second = load(tmp_path / "out" / "fm.pt")
    assert second["epoch"] == 2 and second["scaler"]["_growth_tracker"] == first["scaler"]["_growth_tracker"] + 2


def test_non_finite_loss_stops_before_a_checkpoint_and_keeps_the_good_one(tmp_path, monkeypatch):
    root = make_mnist_root(tmp_path / "mnist", n=64)
    flags = ["--part", "fm", "--data-dir", root, "--out", tmp_path / "out", *TINY]
    main(*flags, "--epochs", "1")
    good = open(tmp_path / "out" / "fm.pt", "rb").read()
    loss = m.flow_matching_loss
    monkeypatch.setattr(m, "flow_matching_loss", lambda *a: loss(*a) * float("nan"))
    with pytest.raises(common.UserError, match=r"^the loss became nan at step 3, so training stopped before "
                                               r"writing a checkpoint of it; try a lower --lr or "
                                               r"--precision fp32$"):
        main(*flags, "--epochs", "2", "--resume", tmp_path / "out" / "fm.pt")
    assert open(tmp_path / "out" / "fm.pt", "rb").read() == good
    lines = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 1] and all(np.isfinite(r["loss"]) for r in lines)


def test_offline_data_error_names_the_path_and_the_cause(tmp_path, monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # a dead proxy: any download fails fast
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for dataset, folder in (("mnist", "MNIST"), ("fashion", "FashionMNIST")):
        data = tmp_path / f"missing-{dataset}"
        with pytest.raises(common.UserError) as e:
            main("--dataset", dataset, "--data-dir", data, "--out", tmp_path / "out", *TINY)
        message = str(e.value)
        assert f"{folder} is not in {data}" in message and "could not be downloaded (" in message
        assert "gunzipped" in message and "Running offline" in message and f"{folder}/raw" in message
        reason = message.split("could not be downloaded (", 1)[1].split("); put ", 1)[0]
        assert len(reason) > 20 and "\n" not in reason  # the cause in words, on one line
        assert os.listdir(tmp_path / "out") == [".lock"]  # no checkpoint, no metrics.jsonl


def test_help_shows_each_default_once_the_presets_and_names_the_notebook(capsys):
    with pytest.raises(SystemExit):
        m.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "default: None" not in text and "default: False" not in text and "seed 003" not in text.lower()
    assert "From noise to images" in text
    for default in ("(default: 50)", "(default: mnist)", "(default: auto)", "(default: 0)", "(default: 100)",
                    "(default: runs/mnist_unet)", "(default: all)"):
        assert text.count(default) == 1, default
    flat = " ".join(text.split())
    for preset in ("recipe: denoise/noise 5, fm/cfg 10; --quick 1/1/3/10", "recipe 5, --quick 3",
                   "recipe: denoise/noise 128, fm/cfg 64; --quick 32", "a tenth of it, with AdamW"):
        assert preset in flat, preset


def test_interrupt_exits_130_in_one_line_and_leaves_no_temp(tmp_path):
    root, out = make_mnist_root(tmp_path / "mnist", n=64), tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "mnist_unet.py"), "--part", "fm", "--data-dir", root, "--out", out,
           *TINY, "--epochs", "500"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # the first progress line comes after 10 s, many epochs in
        if line.startswith("[fm] step") and int(line.split("| epoch ")[1].split("/")[0]) >= 3:
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert stderr.strip() == "interrupted"
    assert common.load_checkpoint(str(out / "fm.pt"), "mnist_unet")["epoch"] >= 2
    assert not [f for f in os.listdir(out) if ".tmp-" in f]


def test_a_second_run_into_a_locked_out_is_refused_and_overwrite_starts_afresh(cli_run, tmp_path):
    _, root, out, _ = cli_run
    before = folder_digest(out)
    common.lock_out(str(out))  # another training run holds this --out
    try:
        assert_user_error(run_script("mnist_unet.py", "--part", "fm", "--data-dir", root, "--out", out, *TINY,
                                     "--overwrite"), f"in use by another training run (`fuser {out}/.lock` names it)")
    finally:
        while common.LOCKS:
            common.LOCKS.pop().close()
    assert folder_digest(out) == before
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "fm.pt").write_bytes((out / "fm.pt").read_bytes())
    (copy / "metrics.jsonl").write_text('{"old": 1}\n')
    main("--part", "fm", "--data-dir", root, "--out", copy, *TINY, "--epochs", "1", "--overwrite")
    assert load(copy / "fm.pt")["epoch"] == 1 and "old" not in (copy / "metrics.jsonl").read_text()


# ------------------------------------------------------------------------------------------ bad input
BAD_FLAGS = {  # name: (flags, what the one sentence must say)
    "lr-nan": (["--lr", "nan"], "--lr must be a finite number"),
    "cfg-inf": (["--cfg", "inf"], "--cfg must be a finite number"),
    "epochs-zero": (["--epochs", "0"], "--epochs must be between 1 and 100,000, got 0"),
    "epochs-10**30": (["--epochs", str(10**30)], "--epochs must be between 1 and 100,000, got 1,000,000,"),
    "steps-negative": (["--steps", "-3"], "--steps must be between 1 and 10,000, got -3"),
    "hidden-zero": (["--hidden", "0"], "--hidden must be positive"),
    "fp16-on-a-cpu": (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
    "seed-negative": (["--seed", "-1"], "--seed must be between 0 and"),
    "seed-2**64": (["--seed", str(2**64)], "--seed must be between 0 and"),
    "num-samples-zero": (["--num-samples", "0"], "--num-samples must be between 1 and 1,000,000"),
    "num-samples-1e9": (["--num-samples", str(10**9)], "--num-samples must be between 1 and 1,000,000"),
    "device-gpu": (["--device", "gpu"], "--device gpu is not a device"),
    "resume-and-sample": (["--resume", "a.pt", "--sample", "b.pt"], "not both"),
    "save-samples-not-npz": (["--save-samples", "s.png"], "--save-samples s.png: pass a file name ending in .npz"),
    "save-samples-without-a-flow-model": (["--part", "denoise", "--save-samples", "{tmp}/s.npz"],
                                          "--save-samples needs an fm or cfg model"),
    "save-samples-is-a-folder": (["--save-samples", "{tmp}/dir.npz"], "is not a regular file"),
    "save-samples-in-a-missing-folder": (["--save-samples", "{tmp}/nope/s.npz"], "create its folder"),
    "checkpoint-of-another-script": (["--resume", "{tmp}/other.pt"], "not mnist_unet.py"),
    "truncated-checkpoint": (["--sample", "{tmp}/cut.pt"], "truncated or corrupt"),
    "denoiser-cannot-sample": (["--sample", "{out}/denoise.pt"], "fm or cfg checkpoint"),
    "resume-with-another-hidden": (["--resume", "{out}/cfg.pt", "--hidden", "16"], "hidden=8"),
    "resume-with-another-seed": (["--resume", "{out}/cfg.pt", "--seed", "1"], "seed=0 but this run has seed=1"),
    "resume-with-another-dataset": (["--resume", "{out}/cfg.pt", "--dataset", "fashion"], "dataset='mnist'"),
    "resume-with-fewer-epochs": (["--resume", "{out}/cfg.pt", "--epochs", "1"], "pass --epochs 2 or more"),
    "fresh-run-into-a-used-out": (["--out", "{out}"], "already holds a checkpoint of mnist_unet.py"),
    "out-below-a-file": (["--out", "{tmp}/file/out"], "cannot write to the output folder"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_input_is_one_sentence_and_touches_nothing(case, cli_run, tmp_path):
    _, root, out, _ = cli_run
    before = folder_digest(out)
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "file").write_text("x")
    common.save_checkpoint(str(tmp_path / "other.pt"), {"script": "cifar_cfg", "config": {"a": 1}, "model": {}})
    data = (out / "cfg.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    flags, fragment = BAD_FLAGS[case]
    flags = [f.format(tmp=tmp_path, out=out) for f in flags]
    with pytest.raises(common.UserError, match=re.escape(fragment)):
        main("--data-dir", root, "--out", tmp_path / "new", *TINY, *flags)
    assert folder_digest(out) == before and not os.path.exists(tmp_path / "new")
    assert not os.path.exists(tmp_path / "s.npz")


def test_bad_input_from_the_command_line_is_exit_2_without_traceback(tmp_path):
    assert_user_error(run_script("mnist_unet.py", "--device", "gpu", "--out", tmp_path / "out"),
                      "--device gpu is not a device")


def test_a_batch_larger_than_the_training_set_is_refused_not_clamped(tmp_path):
    """The check needs the data, so it comes once the --out is locked: nothing but the lock is written."""
    root = make_mnist_root(tmp_path / "mnist", n=96)
    flags = ["--data-dir", root, "--out", tmp_path / "out", *TINY]
    with pytest.raises(common.UserError, match=re.escape(f"{root} holds 96 MNIST training images, fewer than "
                                                         f"the batch size 97; pass a smaller --batch-size")):
        main(*flags, "--part", "fm", "--batch-size", "97")
    with pytest.raises(common.UserError, match="fewer than the batch size 256"):  # the recipe's denoiser batch
        main("--data-dir", root, "--out", tmp_path / "out", "--part", "denoise", "--epochs", "1", "--device", "cpu")
    assert os.listdir(tmp_path / "out") == [".lock"]
    main(*flags, "--part", "fm", "--batch-size", "96", "--epochs", "1")  # the whole set in one batch is fine
    assert load(tmp_path / "out" / "fm.pt")["step"] == 1


# -------------------------------------------------------------------------------- compile (slow)
@pytest.mark.slow
def test_compiled_and_eager_checkpoints_resume_each_other_and_benchmark(tmp_path, capsys):
    root = make_mnist_root(tmp_path / "mnist", n=64)
    flags = ["--part", "fm", "--data-dir", root, "--out", tmp_path / "out", *TINY, "--steps", "2"]
    main(*flags, "--epochs", "1")
    main(*flags, "--epochs", "2", "--resume", tmp_path / "out" / "fm.pt", "--compile",  # compiled resumes eager
         "--save-samples", tmp_path / "s.npz", "--num-samples", "8")
    compiled = load(tmp_path / "out" / "fm.pt")
    assert compiled["epoch"] == 2 and not any(k.startswith("_orig_mod.") for k in compiled["model"])
    assert np.isfinite(compiled["losses"]).all() and np.load(tmp_path / "s.npz")["images"].shape == (8, 1, 28, 28)
    main(*flags, "--epochs", "3", "--resume", tmp_path / "out" / "fm.pt")  # eager resumes compiled
    assert load(tmp_path / "out" / "fm.pt")["epoch"] == 3
    capsys.readouterr()
    main("--benchmark", "--part", "fm", "--hidden", "8", "--batch-size", "32", "--steps", "2", "--device", "cpu")
    table = capsys.readouterr().out.splitlines()
    for name in ("fm (D=8, batch 32), eager", "fm (D=8, batch 32), compiled"):  # training and sampling img/s
        row = [line for line in table if line.startswith(f"| {name} |")]
        numbers = [float(v) for v in row[0].strip("| ").split(" | ")[1:]]
        assert len(numbers) == 2 and all(v > 0 for v in numbers), row


def test_a_checkpoint_naming_no_run_is_one_sentence(cli_run, tmp_path):
    _, _, out, _ = cli_run
    ckpt = torch.load(out / "fm.pt", weights_only=True)
    ckpt.pop("checksum")
    ckpt["run"] = "sdxl"
    common.save_checkpoint(str(tmp_path / "odd.pt"), ckpt)
    with pytest.raises(common.UserError, match="names no run of mnist_unet.py \\('sdxl'\\)"):
        main("--sample", tmp_path / "odd.pt", "--out", tmp_path / "s", "--device", "cpu")
    ckpt["run"] = "fm"
    ckpt["model"] = {k: v[:1] if v.dim() else v for k, v in ckpt["model"].items()}  # edited: other shapes
    common.save_checkpoint(str(tmp_path / "cut.pt"), ckpt)
    with pytest.raises(common.UserError, match="the weights of .*cut.pt does not fit this run"):
        main("--sample", tmp_path / "cut.pt", "--out", tmp_path / "s", "--device", "cpu")
