"""Tests for cifar_cfg.py: parity with diffusers' UNet2DModel, the loss, the samplers, CFG, EMA, learning, and the CLI
(end to end, resume, torchrun DDP, bad input). Tiny widths (--channels 32 32 32 32) and a few images keep it fast on a CPU."""
import hashlib
import os
import re
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

import cifar_cfg
import common
from helpers import assert_user_error, make_cifar_root, run_script, shapes

TINY = ["--channels", "32", "32", "32", "32", "--batch-size", "4", "--warmup", "2", "--steps", "1",
        "--classes", "0", "--device", "cpu"]
FIGURES = ["last.pt", "loss.png", "classes.png", "guidance.png", "sampling.gif"]


# ------------------------------------------------------------------------------------- the network
def diffusers_to_ours(state):
    """diffusers UNet2DModel state-dict keys -> cifar_cfg.UNet keys; to_q/to_k/to_v are stacked into qkv."""
    rules = [(r"^time_embedding\.linear_1", "time_embed.0"), (r"^time_embedding\.linear_2", "time_embed.2"),
             (r"^class_embedding", "class_embed"), (r"^conv_norm_out", "out_norm"),
             (r"^down_blocks\.(\d)\.downsamplers\.0\.conv", r"encoder.\1.resample"),
             (r"^up_blocks\.(\d)\.upsamplers\.0\.conv", r"decoder.\1.resample.1"),
             (r"^down_blocks", "encoder"), (r"^up_blocks", "decoder"), (r"\.resnets\.", ".res."), (r"\.attentions\.", ".attn."),
             (r"^mid_block\.res\.0", "mid_res1"), (r"^mid_block\.res\.1", "mid_res2"), (r"^mid_block\.attn\.0", "mid_attn"),
             (r"time_emb_proj", "time_proj"), (r"conv_shortcut", "skip"), (r"group_norm", "norm"), (r"to_out\.0", "out")]
    ours = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        ours[key] = value
    for key in [k for k in ours if ".to_q." in k]:
        ours[key.replace(".to_q.", ".qkv.")] = torch.cat([ours.pop(key.replace(".to_q.", f".to_{n}.")) for n in "qkv"])
    return ours


def test_parity_with_diffusers_unet2dmodel():
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs, ours = cifar_cfg.DiffusersUNet().eval(), cifar_cfg.UNet().eval()
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    assert n_ours == n_theirs == 25_307_779
    ours.load_state_dict(diffusers_to_ours(theirs.unet.state_dict()))  # strict: every key maps, none left over
    x, t, y = torch.randn(3, 3, 32, 32), torch.tensor([0.0, 0.3137, 0.9991]), torch.tensor([0, 7, cifar_cfg.NULL])
    with torch.no_grad():
        ref, out = theirs(x, t, y), ours(x, t, y)
    assert ref.abs().mean() > 0.05  # not a trivial agreement on zeros
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_shapes_and_skips():
    net = cifar_cfg.UNet([32, 32, 64, 64])
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([3, cifar_cfg.NULL])
    assert net(x, t, y).shape == (2, 3, 32, 32)
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
    frames = []
    cifar_cfg.ode_solve(lambda x, t: c, x0, 5, frames=frames)
    assert len(frames) == 6  # the noise, then x after each of the 5 steps


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
        guided = {w: cifar_cfg.guided_field(net, y, w)(x, t) for w in (0.0, 1.0, 3.0)}
        per_sample = cifar_cfg.guided_field(net, y, torch.tensor([0.0, 3.0]))(x, t)
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


# ----------------------------------------------------------------------------------------- learning
def test_loss_falls_on_labelled_shapes():
    torch.manual_seed(0)
    images, labels = shapes(64, 16, 3)  # the U-Net is convolutional: 16x16 images keep this quick
    x, y = torch.from_numpy(images).float() / 127.5 - 1, torch.from_numpy(labels)
    net = cifar_cfg.UNet([32, 32, 32, 32])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    args = types.SimpleNamespace(label_dropout=0.1, grad_clip=1.0)
    losses = []
    for _ in range(30):
        idx = torch.randint(0, len(x), (8,))
        losses.append(cifar_cfg.train_step(net, opt, x[idx], y[idx], args, net.parameters()).item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses  # measured: 1.29 -> 0.48


# ---------------------------------------------------------------------------------------------- CLI
def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


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
    assert {"model", "ema", "optimizer", "scheduler", "rng", "config"} <= set(ckpt)
    assert not all(torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    samples = np.load(root / "samples.npz")
    assert samples["images"].shape == (6, 3, 32, 32) and samples["images"].dtype == np.uint8
    assert samples["labels"].tolist() == [0] * 6
    assert Image.open(out / "sampling.gif").n_frames == 2  # --steps 1: the noise, then x after the only step
    assert "epoch 2/2" in r.stdout


def test_cli_sample_mode(trained, tmp_path):
    root, out, _ = trained
    r = run_script("cifar_cfg.py", "--sample", out / "last.pt", "--out", tmp_path, "--classes", "3", "5", "--solver", "heun",
                   "--steps", "1", "--device", "cpu", "--save-samples", tmp_path / "s.npz", "--num-samples", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"classes.png", "guidance.png", "sampling.gif", "s.npz"} <= set(os.listdir(tmp_path))
    assert np.load(tmp_path / "s.npz")["labels"].tolist() == [3, 5]
    assert Image.open(out / "classes.png").height < Image.open(tmp_path / "classes.png").height  # 1 row vs 2


def test_resume_equals_uninterrupted(trained, tmp_path):
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


def test_torchrun_ddp_two_processes_same_weights(tmp_path):
    make_cifar_root(tmp_path / "data", n=8)
    driver = tmp_path / "driver.py"  # runs the real main() under torchrun, then saves each rank's final weights
    driver.write_text(f"import sys, torch, torch.distributed as dist\nsys.path.insert(0, {cifar_cfg.__file__.rsplit(os.sep, 1)[0]!r})\n"
                      "import cifar_cfg\nnet = cifar_cfg.main()\n"
                      "torch.save(net.state_dict(), sys.argv[sys.argv.index('--out') + 1] + f'/rank{dist.get_rank()}.pt')\n"
                      "dist.destroy_process_group()\n")
    r = run_script(str(driver), "--data-dir", tmp_path / "data", "--out", tmp_path / "run", "--epochs", "1", *TINY, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / "run" / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 2 and len(ckpt["losses"]) == 2  # one mean over ranks per step
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # each rank draws its own noise
    for k in w0:
        assert torch.equal(w0[k], w1[k]) and torch.equal(w0[k], ckpt["model"][k]), k


def test_torchrun_bad_out_fails_on_every_rank_and_sample_writes_once(trained, tmp_path):
    root, out, _ = trained
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_script("cifar_cfg.py", "--data-dir", root / "data", "--out", blocker / "run", "--epochs", "1", *TINY, torchrun=2)
    assert r.returncode != 0 and r.stderr.count("cannot write to the output folder") == 2, r.stderr[-3000:]  # no rank left waiting
    r = run_script("cifar_cfg.py", "--sample", out / "last.pt", "--out", tmp_path / "s", "--steps", "1", "--classes", "0",
                   "--device", "cpu", "--save-samples", tmp_path / "s.npz", "--num-samples", "2", torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 2 and (tmp_path / "s.npz").exists(), r.stdout  # figures and samples, by rank 0 alone


# --------------------------------------------------------------------------------------- bad input
def run_inprocess(capsys, *argv):
    """main() wrapped by common.run, as the script runs it, without starting a Python per case."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.run(lambda: cifar_cfg.main([str(a) for a in argv]))
    captured = capsys.readouterr()
    return types.SimpleNamespace(returncode=e.value.code, stdout=captured.out, stderr=captured.err)


def test_bad_input_exits_2_with_a_message_and_overwrites_nothing(trained, tmp_path, capsys, monkeypatch):
    root, out, _ = trained
    good = {name: digest(out / name) for name in FIGURES}
    data = ["--data-dir", root / "data", "--out", out, *TINY, "--epochs", "1"]  # a check that broke would train briefly, not 50 epochs
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert_user_error(run_script("cifar_cfg.py", "--data-dir", not_a_dir, "--out", out, "--device", "cpu"),
                      "cifar10 is not in", "--data-dir")
    broken = tmp_path / "broken"
    shutil.copytree(root / "data", broken)
    (broken / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04junk")
    assert_user_error(run_inprocess(capsys, "--data-dir", broken, "--out", out, *TINY), "unreadable", "--data-dir")
    torch.save({"script": "mnist_unet", "config": {}, "model": {}}, tmp_path / "other.pt")
    assert_user_error(run_inprocess(capsys, *data, "--resume", tmp_path / "other.pt"), "mnist_unet", "cifar_cfg.py")
    assert_user_error(run_inprocess(capsys, *data, "--channels", "64", "64", "64", "64", "--resume", out / "last.pt"),
                      "channels")
    for flag, value, key in (("--batch-size", "8", "batch_size"), ("--lr", "1e-3", "lr"), ("--no-flip", None, "no_flip")):
        assert_user_error(run_inprocess(capsys, *data, flag, *[value] * (value is not None), "--resume", out / "last.pt"),
                          f"trained with {key}=")
    (tmp_path / "cut.pt").write_bytes((out / "last.pt").read_bytes()[:5000])
    assert_user_error(run_inprocess(capsys, "--sample", tmp_path / "cut.pt", "--out", out), "truncated or corrupt")
    assert_user_error(run_script("cifar_cfg.py", *data, "--cfg", "-1"), "--cfg")
    assert_user_error(run_inprocess(capsys, *data, "--classes", "2", "10"), "--classes", "0 to 9")
    assert_user_error(run_inprocess(capsys, *data, "--channels", "48", "64", "64", "64"), "multiples of 32")
    assert_user_error(run_inprocess(capsys, *data, "--save-samples", tmp_path / "nowhere" / "s.npz"), "--save-samples")
    with monkeypatch.context() as m:  # a folder that exists but can't be written (chmod can't show it when tests run as root)
        m.setattr(os, "access", lambda path, mode: False)
        assert_user_error(run_inprocess(capsys, "--sample", out / "last.pt", "--out", tmp_path / "x", *TINY, "--num-samples", "1",
                                        "--save-samples", tmp_path / "s.npz"), "--save-samples", "not writable")
    assert good == {name: digest(out / name) for name in FIGURES}


def test_benchmark_times_ours_next_to_diffusers(capsys, monkeypatch):
    pytest.importorskip("diffusers")
    calls = {"ours": 0, "diffusers": 0}
    for name, cls in (("ours", cifar_cfg.UNet), ("diffusers", cifar_cfg.DiffusersUNet)):
        def counted(self, *a, _forward=cls.forward, _name=name):
            calls[_name] += 1
            return _forward(self, *a)
        monkeypatch.setattr(cls, "forward", counted)
    args = cifar_cfg.parse_args(["--benchmark", "--channels", "32", "32", "32", "32", "--batch-size", "2", "--steps", "3"])
    cifar_cfg.benchmark(args, torch.device("cpu"), rounds=1)
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split("  ")[0]: line.split()[-2:] for line in lines if line.startswith(("ours (", "diffusers"))}
    assert set(rows) == {"ours (cifar_cfg.UNet)", "diffusers UNet2DModel"}
    assert all(float(v) > 0 for r in rows.values() for v in r)
    assert "ours / diffusers speed: training x" in lines[-1]
    assert calls == {"ours": 4, "diffusers": 4}  # warm-up and 1 timed round: a training step and a sampling step each
