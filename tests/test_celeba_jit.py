"""Tests of celeba_jit.py: the JiT pieces against their equations, a learning test, the CLI end to end, resume, DDP and bad input."""
import argparse
import math
import os

import numpy as np
import pytest
import torch

import celeba_jit as jit
import common
from helpers import assert_user_error, make_image_folder, make_mnist_root, run_script, shapes

TINY = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--warmup-epochs", "0"]


def run_main(*argv):
    """main() in this process (no interpreter start-up); bad input surfaces as common.UserError."""
    jit.main([str(a) for a in argv])


# -------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("res,p,s", [(16, 4, 4), (16, 4, 3), (28, 7, 7), (28, 4, 2), (40, 16, 12), (64, 16, 12)])
def test_patchify_roundtrip_covers_every_pixel(res, p, s):
    x = torch.randn(2, 3, res, res)
    tokens = jit.patchify(x, p, s)
    n = jit.check_grid(res, p, s)
    torch.testing.assert_close(tokens, torch.nn.functional.unfold(x, p, stride=s).transpose(1, 2), atol=0, rtol=0)
    assert tokens.shape == (2, n * n, 3 * p * p)
    torch.testing.assert_close(jit.unpatchify(tokens, res, p, s), x, atol=1e-5, rtol=0)
    coverage = torch.nn.functional.fold(torch.ones(1, p * p, n * n), res, p, stride=s)
    assert coverage.min() >= 1  # no pixel lost, including the outer frame
    # tokens that agree where they overlap give a seamless image: a constant stays exactly constant
    torch.testing.assert_close(jit.unpatchify(torch.full_like(tokens, 0.3), res, p, s), torch.full_like(x, 0.3))


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
    for (r1, c1), (r2, c2), (dr, dc) in [((0, 0), (1, 2), (2, 1)), ((3, 1), (0, 4), (1, 0)), ((2, 2), (2, 2), (-2, 2))]:
        torch.testing.assert_close(scores[at(r1, c1), at(r2, c2)], scores[at(r1 + dr, c1 + dc), at(r2 + dr, c2 + dc)])
    # both axes rotate, differently: a row offset and a column offset give different scores
    assert not torch.isclose(scores[at(0, 0), at(1, 0)], scores[at(0, 0), at(0, 1)])
    assert not torch.isclose(scores[at(0, 0), at(0, 0)], scores[at(0, 0), at(0, 1)])


def test_adaln_zero_blocks_start_as_identity():
    torch.manual_seed(0)
    block = jit.Block(32, 2)
    x, c = torch.randn(3, 9, 32), torch.randn(3, 32)
    cos, sin = jit.rope_2d(3, 16)
    torch.testing.assert_close(block(x, c, cos, sin), x, atol=0, rtol=0)
    torch.nn.init.normal_(block.ada[1].weight, std=0.1)  # once the modulation learns, the block acts
    assert (block(x, c, cos, sin) - x).abs().mean() > 1e-3
    model = jit.JiT(16, 1, 10, **jit.PRESETS["tiny"])
    assert model(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 10])).abs().max() == 0  # zero-init head


def test_presets_match_the_papers_parameter_and_flop_counts():
    with torch.device("meta"):  # no memory, no time: counts only
        b16 = jit.JiT(256, 3, 1000, **jit.PRESETS["B"])
    assert abs(sum(p.numel() for p in b16.parameters()) / 1e6 - 131) < 0.5  # JiT-B/16: 131M
    assert abs(jit.macs_per_image(256, 3, **jit.PRESETS["B"]) / 1e9 - 25) < 0.5  # JiT-B/16: 25 GFLOPs
    assert jit.check_grid(256, 16, 12) ** 2 == 441  # the blog's 21 x 21 overlapping tokens


# --------------------------------------------------------------------------------------------- method
def test_x_to_v_and_the_t_eps_clamp():
    x, e = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.0, 0.5, 0.95, 0.99])
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * e
    v = jit.x_to_v(x, z, t, 0.05)
    torch.testing.assert_close(v[:3], (x - e)[:3], atol=1e-5, rtol=1e-5)  # v = x - e while 1 - t >= t_eps
    torch.testing.assert_close(v[3], (x[3] - z[3]) / 0.05)  # 1 - t = 0.01 is clamped to 0.05
    x_pred = torch.randn_like(x)
    torch.testing.assert_close(jit.x_to_v(x_pred, z, t, 0.05) - v,
                               (x_pred - x) / torch.tensor([1.0, 0.5, 0.05, 0.05]).view(-1, 1, 1, 1))


def test_t_sampler_logit_normal_and_resolution_shift():
    torch.manual_seed(0)
    for res, mu in [(256, -0.8), (512, -0.8 - math.log(2)), (64, -0.8 + math.log(4))]:
        logit = torch.logit(jit.sample_t(200_000, res).double())
        assert abs(logit.mean() - mu) < 0.01 and abs(logit.std() - 0.8) < 0.01, (res, logit.mean(), logit.std())
    assert jit.sample_t(50_000, 512).mean() < jit.sample_t(50_000, 256).mean() - 0.05  # larger images: more noise


def test_heun_is_second_order_and_euler_first_order():
    a = -1.5  # dz/dt = a z, z(1) = z(0) exp(a)
    calls = []
    velocity = lambda z, t: calls.append(t) or a * z
    err = lambda solver, steps: abs(jit.solve(velocity, torch.ones(1, dtype=torch.float64), steps, solver).item() - math.exp(a))
    heun, euler = err("heun", 20) / err("heun", 40), err("euler", 20) / err("euler", 40)
    assert 3.5 < heun < 4.5 and 1.8 < euler < 2.2, (heun, euler)
    calls.clear()
    jit.solve(velocity, torch.ones(1), 10, "heun")
    assert len(calls) == 19 and max(calls) < 1  # 2 * 10 - 1 evaluations: Euler on the last interval, never at t = 1


class FakeModel(torch.nn.Module):
    """x_pred = 1 for the label 0, -1 for the null label: the guided velocity is then known in closed form."""
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, z, t, y):
        self.batches.append(len(z))
        return torch.where(y == self.num_classes, -1.0, 1.0).view(-1, 1, 1, 1).expand_as(z)


def test_cfg_only_inside_the_interval():
    model, z, y, w = FakeModel(), torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), 4.0
    for t, inside in [(0.05, False), (0.1, False), (0.5, True), (1.0, True)]:
        model.batches.clear()
        v = jit.guided_velocity(model, z, t, y, w, (0.1, 1.0), 0.05)
        v_cond, v_uncond = 1 / max(1 - t, 0.05), -1 / max(1 - t, 0.05)
        expected = v_uncond + w * (v_cond - v_uncond) if inside else v_cond
        torch.testing.assert_close(v, torch.full_like(z, expected))
        assert model.batches == ([6] if inside else [3])  # cond and uncond share one batched forward


def test_learns_class_shapes():
    """A tiny JiT on made-up class-shaped images beats the best input-blind guess (the mean image) at t = 0.5."""
    torch.manual_seed(0)
    images, labels = shapes(256, 16, 1)
    x_all, y_all = torch.from_numpy(images).float() / 127.5 - 1, torch.from_numpy(labels)
    model = jit.JiT(16, 1, 10, **dict(jit.PRESETS["tiny"], stride=4))
    args = argparse.Namespace(res=16, t_mu=-0.8, t_sigma=0.8, noise_scale=1.0, t_eps=0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0)
    g = torch.Generator().manual_seed(1)
    x_eval, y_eval = x_all[:64], y_all[:64]
    z_eval = 0.5 * x_eval + 0.5 * torch.randn(x_eval.shape, generator=g)
    baseline = ((x_all.mean(0) - x_eval) ** 2).mean()
    for step in range(300):
        idx = torch.randint(0, 256, (32,))
        loss = jit.jit_loss(model, x_all[idx], y_all[idx], args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = ((model(z_eval, torch.full((64,), 0.5), y_eval) - x_eval) ** 2).mean()
    assert mse < 0.5 * baseline, (mse, baseline)


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_celeba_folder_end_to_end(tmp_path):
    """CelebA layout DATA/img_align_celeba (plus a non-image), training, figures, cache, then --sample to an .npz."""
    folder = make_image_folder(tmp_path / "data" / "img_align_celeba", n=10)
    (tmp_path / "data" / "img_align_celeba" / "list_attr.txt").write_text("not an image")
    out = tmp_path / "run"
    r = run_script("celeba_jit.py", "--dataset", "celeba", "--data-dir", tmp_path / "data", "--res", 16, "--epochs", 2,
                   "--batch-size", 4, "--out", out, *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping 1 entries" in r.stdout and "JiT-tiny: 0.05M parameters, 25 tokens, 10 training images" in r.stdout
    for name in ["last.pt", "loss.png", "samples.png", "samples_epoch001.png", "sampling.gif"]:
        assert (out / name).stat().st_size > 0, name
    caches = [f for f in os.listdir(folder) if f.startswith(".celeba_jit-cache-16px")]
    cache = np.load(os.path.join(folder, caches[0]))
    assert len(caches) == 1 and cache.shape == (10, 3, 16, 16) and cache.dtype == np.uint8
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["epoch"] == 2 and len(ckpt["losses"]) == 4 and ckpt["data"]["classes"] == []
    r = run_script("celeba_jit.py", "--sample", out / "last.pt", "--save-samples", out / "s.npz", "--num-samples", 5,
                   "--out", out / "sampled", "--steps", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    samples = np.load(out / "s.npz")
    assert samples["images"].shape == (5, 3, 16, 16) and samples["images"].dtype == np.uint8
    assert (samples["labels"] == -1).all() and (out / "sampled" / "samples.png").exists()


def test_folder_loading_crops_resizes_and_caches(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "imgs", n=3, size=(40, 20))
    images, cache = jit.load_folder(folder, 8, None, str(tmp_path), print)
    assert images.shape == (3, 3, 8, 8) and os.path.dirname(cache) == folder
    # the images are a left-to-right ramp: after the centre crop the left edge stays darker than the right
    assert (images[:, :, :, 0].astype(int).mean() + 40) < images[:, :, :, -1].astype(int).mean()
    assert jit.load_folder(folder, 8, None, str(tmp_path), print)[1] == cache  # second run: the same cache
    image = next(f for f in sorted(os.listdir(folder)) if not f.startswith("."))
    os.utime(os.path.join(folder, image), (1, 1))  # an image replaced by one of the same size
    assert jit.load_folder(folder, 8, None, str(tmp_path), print)[1] != cache
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only data folder: the cache goes to the out dir
    assert os.path.dirname(jit.load_folder(folder, 12, None, str(tmp_path / "out"), print)[1]) == str(tmp_path / "out")


def test_resume_equals_an_uninterrupted_run(tmp_path):
    root = make_mnist_root(tmp_path / "mnist", n=48)
    common_args = ["--dataset", "mnist", "--data-dir", root, "--batch-size", 16, "--sample-every", 5, *TINY]
    run_main(*common_args, "--epochs", 2, "--out", tmp_path / "full")
    run_main(*common_args, "--epochs", 1, "--out", tmp_path / "half")
    run_main(*common_args, "--epochs", 2, "--out", tmp_path / "half", "--resume", tmp_path / "half" / "last.pt")
    full, resumed = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "half"))
    assert full["step"] == resumed["step"] == 6 and full["losses"] == resumed["losses"]
    for key in ("model", "ema"):
        for name, value in full[key].items():
            torch.testing.assert_close(resumed[key][name], value, atol=0, rtol=0)


def test_sample_takes_the_architecture_and_noise_from_the_checkpoint(tmp_path, monkeypatch):
    """A model trained with --noise-scale 2 samples from 2 * N(0, I); --sample needs no --dataset/--res, and the command
    line's preset (here mnist's 7px patches, which can't tile the default 256 px) does not matter."""
    root = make_mnist_root(tmp_path / "mnist", n=16)
    run_main("--dataset", "mnist", "--data-dir", root, "--batch-size", 16, "--epochs", 1, "--noise-scale", 2, "--t-eps", 0.1,
             "--out", tmp_path / "run", *TINY)
    seen, generate = [], jit.generate
    monkeypatch.setattr(jit, "generate", lambda model, noise, y, args, **k: seen.append(
        ((noise * args.noise_scale).std().item(), args.t_eps, args.res, args.model)) or generate(model, noise, y, args, **k))
    run_main("--sample", tmp_path / "run" / "last.pt", "--model", "mnist", "--out", tmp_path / "s", "--steps", 2, "--device", "cpu",
             "--save-samples", tmp_path / "s.npz", "--num-samples", 3)
    assert len(seen) == 2 and all(abs(std - 2) < 0.1 and rest == [0.1, 28, "tiny"] for std, *rest in seen), seen
    assert np.load(tmp_path / "s.npz")["images"].shape == (3, 1, 28, 28)


def test_ddp_two_cpu_processes(tmp_path):
    root = make_mnist_root(tmp_path / "mnist", n=64)
    r = run_script("celeba_jit.py", "--dataset", "mnist", "--data-dir", root, "--epochs", 1, "--batch-size", 16,
                   "--out", tmp_path / "ddp", *TINY, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(math.isfinite(v) for v in ckpt["losses"])  # 64 images / global batch 16
    assert r.stdout.count("JiT-tiny:") == 1  # rank 0 alone logs and writes
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # each rank's stream


def test_benchmark_prints_speeds(capsys):
    run_main("--benchmark", "--dataset", "mnist", "--batch-size", 4, *TINY)
    line = capsys.readouterr().out
    assert "train" in line and "sample" in line and line.count("img/s") == 2 and "MFU unknown" in line
    run_main("--benchmark", "--dataset", "mnist", "--batch-size", 4, "--peak-tflops", 1.0, *TINY)
    assert "MFU " in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_exits_2_with_a_message(tmp_path, monkeypatch, capsys):
    import torchvision

    def fail(*argv):
        with pytest.raises(SystemExit) as e:
            common.run(lambda: run_main(*argv))
        assert e.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    def quota(*a, **k):
        raise RuntimeError("Too many users have viewed or downloaded this file recently")
    monkeypatch.setattr(torchvision.datasets, "CelebA", quota)
    out = tmp_path / "out"
    assert "mmlab.ie.cuhk.edu.hk" in fail("--dataset", "celeba", "--data-dir", tmp_path / "nothing", "--out", out, *TINY)
    assert "does not exist" in fail("--dataset", "folder", "--data-dir", tmp_path / "nothing", "--out", out, *TINY)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert "no images" in fail("--dataset", "folder", "--data-dir", tmp_path / "notes", "--out", out, *TINY)
    bad = make_image_folder(tmp_path / "bad", n=2)
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg")
    assert "broken.jpg is not a readable image" in fail("--dataset", "folder", "--data-dir", bad, "--res", 16, "--out", out, *TINY)
    assert not [f for f in os.listdir(bad) if "cache" in f]  # no half-written cache left behind
    assert "--res 16 or 19" in fail("--dataset", "folder", "--data-dir", bad, "--res", 17, "--out", out, *TINY)
    assert "mnist images are 28 px" in fail("--dataset", "mnist", "--res", 32, *TINY)
    assert "--cfg-interval" in fail("--cfg-interval", 0.5, 0.2, *TINY)
    assert "--patch must be positive, got 0" in fail("--patch", 0, *TINY)
    assert "--res must be positive, got 0" in fail("--dataset", "folder", "--res", 0, *TINY)

    root = make_mnist_root(tmp_path / "mnist", n=32)
    good = ["--dataset", "mnist", "--data-dir", root, "--batch-size", 16, "--epochs", 1, "--out", out, *TINY]
    run_main(*good)
    before = (out / "last.pt").read_bytes()
    assert "model='tiny' but this run has model='mnist'" in fail(*good[:-len(TINY)], "--model", "mnist", "--device", "cpu",
                                                                  "--resume", out / "last.pt")
    torch.save({"script": "mnist_unet", "config": {}}, tmp_path / "other.pt")
    assert "not celeba_jit.py" in fail(*good, "--resume", tmp_path / "other.pt")
    (tmp_path / "cut.pt").write_bytes(before[: len(before) // 2])
    assert "truncated or corrupt" in fail(*good, "--resume", tmp_path / "cut.pt")
    assert "is a folder" in fail(*good, "--resume", out)
    assert "does not exist" in fail(*good, "--resume", tmp_path / "missing.pt")
    assert "batch_size=16 but this run has batch_size=8" in fail(*good, "--batch-size", 8, "--resume", out / "last.pt")
    assert "noise_scale=1.0 but this run has noise_scale=2.0" in fail(*good, "--noise-scale", 2, "--resume", out / "last.pt")
    assert "cannot write --save-samples" in fail("--sample", out / "last.pt", "--save-samples", tmp_path / "no" / "s.npz",
                                                 "--out", tmp_path / "never", "--device", "cpu")
    assert not (tmp_path / "never").exists()  # refused before any work
    assert "larger than the dataset" in fail(*good[:-len(TINY) - 2], "--out", out, "--batch-size", 64, *TINY)
    assert (out / "last.pt").read_bytes() == before  # nothing overwritten by the failed runs


def test_bad_input_from_the_command_line(tmp_path):
    r = run_script("celeba_jit.py", "--dataset", "folder", "--data-dir", tmp_path / "missing", "--out", tmp_path / "o", *TINY)
    assert_user_error(r, "does not exist", "--data-dir")
