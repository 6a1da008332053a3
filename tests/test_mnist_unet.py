"""Tests for mnist_unet.py: model shapes, the flow-matching identities, the sampler, CFG, the LR schedule, learning on
structured digits, the CLI end to end, --resume, and every bad input. All on CPU with tiny models and data made here."""
import hashlib
import os

import numpy as np
import pytest
import torch

import common
import mnist_unet as m
from helpers import assert_user_error, make_mnist_root, run_script, shapes

TINY = ["--hidden", "8", "--batch-size", "32", "--epochs", "2", "--steps", "4", "--device", "cpu"]


def one_hot(labels):
    return torch.nn.functional.one_hot(labels, 10).float()


# ------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("cond", ["none", "time", "class"])
def test_unet_shapes_and_conditioning(cond):
    torch.manual_seed(0)
    D, B = 8, 3
    model = m.UNet(D, cond).train()  # batch statistics: a fresh net's eval-mode BN would shrink every signal to ~0
    x, t, c = torch.randn(B, 1, 28, 28), torch.rand(B), one_hot(torch.tensor([0, 3, 9]))
    # the CS180 path: 28 -> 14 -> 7 -> 1 (flatten) -> 7 -> 14 -> 28, with 2D channels at the bottleneck
    assert model.e2(model.e1(model.e0(x))).shape == (B, 2 * D, 7, 7)
    assert model.flatten(torch.randn(B, 2 * D, 7, 7)).shape == (B, 2 * D, 1, 1)
    assert model.unflatten(torch.randn(B, 2 * D, 1, 1)).shape == (B, 2 * D, 7, 7)
    args = {"none": (), "time": (t,), "class": (t, c)}[cond]
    y = model(x, *args)
    assert y.shape == (B, 1, 28, 28) and torch.isfinite(y).all()
    if cond != "none":  # the conditioning reaches the output
        assert not torch.allclose(model(x, 1 - t, *args[1:]), y, atol=1e-5)
    if cond == "class":
        assert not torch.allclose(model(x, t, one_hot(torch.tensor([5, 5, 5]))), y, atol=1e-5)
        assert not torch.allclose(model(x, t, torch.zeros_like(c)), y, atol=1e-5)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert ({"fc1_t", "fc2_t"} <= names) == (cond != "none")
    assert ({"fc1_c", "fc2_c"} <= names) == (cond == "class")


# ------------------------------------------------------------------------------------- flow maths
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
    x_half, _ = m.flow_path(x, eps, torch.full((4,), 0.5))
    assert torch.allclose(x_half, (x + eps) / 2)


def test_euler_is_exact_on_a_constant_velocity():
    x0, c = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    for steps in (1, 7, 50):
        path = m.euler(lambda x, t: c, x0, steps)
        assert len(path) == steps + 1 and torch.equal(path[0], x0)
        assert torch.allclose(path[-1], x0 + c, atol=1e-5)
    ts = []  # the field is evaluated at t = 0, 1/steps, ..., 1 - 1/steps
    m.euler(lambda x, t: ts.append(t) or torch.zeros_like(x), x0, 4)
    assert ts == pytest.approx([0, 0.25, 0.5, 0.75])


def test_cfg_formula():
    torch.manual_seed(0)
    model = m.UNet(8, "class")
    x, labels = torch.randn(3, 1, 28, 28), torch.tensor([1, 4, 7])
    t = torch.full((3,), 0.3)
    with torch.no_grad():
        for _ in range(30):  # give BatchNorm real running statistics, then compare in eval mode as sampling does
            model(x, t, one_hot(labels))
        model.eval()
        u_cond, u_uncond = model(x, t, one_hot(labels)), model(x, t, torch.zeros(3, 10))
        guided = {w: m.velocity_field(model, labels, w)(x, 0.3) for w in (0, 1, 5)}
    assert torch.allclose(guided[0], u_uncond, atol=1e-5)
    assert torch.allclose(guided[1], u_cond, atol=1e-5)
    assert torch.allclose(guided[5], u_uncond + 5 * (u_cond - u_uncond), atol=1e-4)
    assert not torch.allclose(u_cond, u_uncond, atol=1e-4)


def test_lr_after_E_epochs_is_a_tenth():
    model = m.UNet(4, "time")
    for epochs in (1, 4, 10):
        s = dict(hidden=4, batch_size=8, lr=1e-2, epochs=epochs)
        opt, sched = m.make_optimizer("fm", model, s, torch.device("cpu"))
        for _ in range(epochs):
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3, rel=1e-9)
    opt, sched = m.make_optimizer("cfg_nosched", model, s, torch.device("cpu"))
    assert sched is None and opt.param_groups[0]["lr"] == 1e-2
    assert m.make_optimizer("denoise", model, s, torch.device("cpu"))[1] is None


# ---------------------------------------------------------------------------------------- learning
def test_class_conditioned_model_learns_and_cfg_follows_the_class():
    """Two classes of distinct squares: the loss falls well below its start and guided samples look like their own class."""
    common.seed_everything(0)
    images, labels = shapes(256, classes=2)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    model = m.UNet(8, "class")
    opt, _ = m.make_optimizer("cfg", model, dict(lr=3e-3, epochs=1), torch.device("cpu"))
    losses = []
    for step in range(120):
        idx = torch.randint(0, len(x), (32,))
        losses.append(m.train_step("cfg", model, opt, x[idx], y[idx]).item())
    start, end = np.mean(losses[:10]), np.mean(losses[-30:])
    assert end < 0.35 * start, (start, end)
    means = torch.stack([m.normalise(x[y == k]).mean(0) for k in (0, 1)])
    asked = torch.tensor([0, 1] * 8)
    samples = m.generate(model, asked, 16, 20, 3.0, torch.Generator().manual_seed(1), torch.device("cpu"))[-1]
    dist = ((samples[:, None] - means[None]) ** 2).flatten(2).mean(2)  # (16, 2): distance to each class mean
    own, other = dist[torch.arange(16), asked], dist[torch.arange(16), 1 - asked]
    assert (own < other).float().mean() >= 0.9, (own, other)
    assert own.mean() < 0.5 * other.mean(), (own.mean(), other.mean())


# --------------------------------------------------------------------------------------------- CLI
def folder_digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One tiny run of every part; the other CLI tests reuse its checkpoints and output folder."""
    tmp = tmp_path_factory.mktemp("cli")
    root, out = make_mnist_root(tmp / "mnist", n=96), tmp / "out"
    result = run_script("mnist_unet.py", "--data-dir", root, "--out", out, *TINY, "--save-samples", tmp / "s.npz",
                        "--num-samples", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, root, out, result


def test_cli_writes_every_figure_checkpoint_and_npz(cli_run):
    tmp, _, out, result = cli_run
    assert "--quick" in result.stdout  # the CPU estimate of the GPU-sized recipe points to --quick
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
        assert {"model", "optimizer", "scheduler", "rng", "config"} <= set(ckpt)
    assert common.load_checkpoint(str(out / "fm.pt"), "mnist_unet")["scheduler"]["_last_lr"][0] == pytest.approx(
        1e-2 * 0.1)  # the LR ended at 0.1*lr
    npz = np.load(tmp / "s.npz")
    assert npz["images"].dtype == np.uint8 and npz["images"].shape == (12, 1, 28, 28)
    assert npz["labels"].tolist() == [k % 10 for k in range(12)]


def test_cli_sample_only(cli_run):
    tmp, _, out, _ = cli_run
    result = run_script("mnist_unet.py", "--sample", out / "fm.pt", "--out", tmp / "sampled", "--num-samples", "5",
                        "--steps", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    npz = np.load(tmp / "sampled" / "samples.npz")
    assert npz["images"].shape == (5, 1, 28, 28) and npz["labels"].tolist() == [-1] * 5  # unconditional
    assert os.path.isfile(tmp / "sampled" / "samples.png")


def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    root = make_mnist_root(tmp_path / "mnist", n=96)
    flags = ["--part", "fm", "--data-dir", root, *TINY, "--epochs", "3"]
    m.main([*flags, "--out", str(tmp_path / "full")])
    full = torch.load(tmp_path / "full" / "fm.pt", weights_only=True)

    save = common.save_checkpoint

    def save_then_crash(path, state):  # the machine dies right after the first epoch's checkpoint
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        m.main([*flags, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(common, "save_checkpoint", save)
    assert torch.load(tmp_path / "cut" / "fm.pt", weights_only=True)["epoch"] == 1
    capsys.readouterr()
    m.main([*flags, "--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "cut" / "fm.pt")])
    assert "resuming after epoch 1 (step 3)" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "cut" / "fm.pt", weights_only=True)
    assert resumed["step"] == full["step"] == 9 and resumed["losses"] == full["losses"]
    for k, v in full["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert resumed["scheduler"] == full["scheduler"]


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
    """--part cfg cut in cfg, resumed (without --part: the checkpoint knows it), cut again in cfg_nosched and resumed:
    both runs end as in an uninterrupted run, and the ablation's loss plot still compares with cfg's curve."""
    root = make_mnist_root(tmp_path / "mnist", n=96)
    flags = ["--data-dir", root, *TINY]
    m.main([*flags, "--part", "cfg", "--out", str(tmp_path / "full")])
    cut = tmp_path / "cut"
    crash_after(monkeypatch, 1)  # after cfg's epoch 1
    with pytest.raises(KeyboardInterrupt):
        m.main([*flags, "--part", "cfg", "--out", str(cut)])
    crash_after(monkeypatch, 2)  # after cfg's epoch 2 and cfg_nosched's epoch 1
    with pytest.raises(KeyboardInterrupt):
        m.main([*flags, "--out", str(cut), "--resume", str(cut / "cfg.pt")])
    assert torch.load(cut / "cfg_nosched.pt", weights_only=True)["epoch"] == 1
    curves = {}
    plot = common.plot_curves
    monkeypatch.setattr(common, "plot_curves", lambda path, c, **kw: curves.update({os.path.basename(path): c}) or plot(path, c, **kw))
    m.main([*flags, "--out", str(cut), "--resume", str(cut / "cfg_nosched.pt")])
    for run in ("cfg", "cfg_nosched"):
        full, resumed = (torch.load(d / f"{run}.pt", weights_only=True) for d in (tmp_path / "full", cut))
        assert resumed["epoch"] == 2 and resumed["losses"] == full["losses"], run
        for k, v in full["model"].items():
            assert torch.equal(resumed["model"][k], v), (run, k)
    assert os.path.isfile(cut / "cfg_nosched_epoch2.png") and os.path.isfile(cut / "cfg_nosched_loss.png")
    cfg_losses = torch.load(cut / "cfg.pt", weights_only=True)["losses"]
    assert list(curves) == ["cfg_nosched_loss.png"] and curves["cfg_nosched_loss.png"]["cfg (ExponentialLR)"] == cfg_losses


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_exit_2_with_a_clear_message_and_touch_nothing(cli_run, tmp_path, monkeypatch):
    tmp, root, out, _ = cli_run
    before = folder_digest(out)
    # no data and no internet (a dead proxy makes any download attempt fail at once)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert_user_error(run_script("mnist_unet.py", "--data-dir", tmp_path / "empty", "--out", out, *TINY),
                      "--data-dir", "MNIST/raw")
    # a checkpoint of another script
    other = tmp_path / "other.pt"
    common.save_checkpoint(str(other), {"script": "cifar_cfg", "config": {}, "model": {}})
    assert_user_error(run_script("mnist_unet.py", "--resume", other, "--data-dir", root, "--out", out, *TINY),
                      "cifar_cfg", "not mnist_unet.py")
    # a checkpoint of another config
    assert_user_error(run_script("mnist_unet.py", "--resume", out / "cfg.pt", "--data-dir", root, "--out", out,
                                 *TINY, "--hidden", "16"), "hidden=8", "hidden=16")
    # a truncated checkpoint
    data = open(out / "cfg.pt", "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert_user_error(run_script("mnist_unet.py", "--sample", tmp_path / "cut.pt", "--out", out, "--device", "cpu"),
                      "truncated or corrupt")
    # a denoiser cannot sample
    assert_user_error(run_script("mnist_unet.py", "--sample", out / "denoise.pt", "--out", out, "--device", "cpu"),
                      "fm or cfg checkpoint")
    # an unwritable --out (a path below a regular file)
    (tmp_path / "file").write_text("x")
    assert_user_error(run_script("mnist_unet.py", "--data-dir", root, "--out", tmp_path / "file" / "out", *TINY), "--out")
    # impossible numbers
    assert_user_error(run_script("mnist_unet.py", "--data-dir", root, "--out", out, "--epochs", "0"), "--epochs must be positive")
    assert_user_error(run_script("mnist_unet.py", "--data-dir", root, "--out", out, "--steps", "-3"), "--steps must be positive")
    # --save-samples with no fm/cfg model to sample, or into a missing folder: refused before any data or output
    fresh = tmp_path / "fresh"
    assert_user_error(run_script("mnist_unet.py", "--part", "denoise", "--data-dir", root, "--out", fresh, *TINY,
                                 "--save-samples", tmp_path / "s.npz"), "--save-samples needs an fm or cfg model")
    assert_user_error(run_script("mnist_unet.py", "--resume", out / "cfg_nosched.pt", "--data-dir", root, "--out", fresh,
                                 *TINY, "--save-samples", tmp_path / "s.npz"), "--save-samples needs an fm or cfg model")
    for extra in (["--part", "fm", "--data-dir", root, *TINY], ["--sample", out / "fm.pt", "--device", "cpu"]):
        assert_user_error(run_script("mnist_unet.py", *extra, "--out", fresh, "--save-samples", tmp_path / "nope" / "s.npz"),
                          "cannot write --save-samples", "create it or pass another path")
    assert not os.path.exists(fresh) and not os.path.exists(tmp_path / "s.npz")
    assert folder_digest(out) == before  # nothing was overwritten
