"""deepfloyd_edit.py: the hand-written schedule, variance and step against diffusers' DDPMScheduler, the
editing tricks on the exact denoiser, the figures, the deepfloyd code path through a tiny randomly initialised
IF-layout UNet, precision, and every bad input."""
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

import common
import deepfloyd_edit as de
from common import UserError
from helpers import assert_user_error, make_image_folder, run_script

TS = de.strided_timesteps(30)
ABAR = de.alphas_cumprod()
SET_IMAGES, SET_NAMES = de.draw_builtin()
EXACT = de.ExactDenoiser(SET_IMAGES, SET_NAMES, ABAR)
EMB_DIM = 24


def if_scheduler(timesteps=TS, **config):
    """IF stage 1's scheduler config with thresholding off, as in the course's own loop."""
    config = dict(dict(thresholding=False, clip_sample=False, dynamic_thresholding_ratio=0.95,
                       sample_max_value=1.5), **config)
    s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                      variance_type="learned_range", **config)
    s.set_timesteps(timesteps=timesteps)
    return s


def tiny_if_unet():
    """IF stage 1's layout (ResnetDownsample + SimpleCrossAttn blocks, scale-shift, text_proj + text pooling,
    6 outputs), tiny."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, attention_head_dim=8,
        encoder_hid_dim=EMB_DIM, encoder_hid_dim_type="text_proj", addition_embed_type="text",
        addition_embed_type_num_heads=2, resnet_time_scale_shift="scale_shift", norm_num_groups=8,
        act_fn="gelu").eval()


def exact_estimate(prompt=""):
    return lambda x, t: EXACT(x, t, [prompt] * len(x))


def nearest_set_image(x):
    return ((SET_IMAGES[None] - x[:, None]) ** 2).flatten(2).mean(2).argmin(1)


def context(out, stride=30, **settings):
    """The tasks' Context on the exact backend with the built-in set and photos, as main builds it."""
    photos, names = de.builtin_photos()
    mask = torch.zeros(1, 64, 64)
    mask[:, 2:24, 22:42] = 1
    values = dict(prompt="", edit_prompt="a rocket ship", anagram=["a smiley face", "a house"],
                  hybrid=["a smiley face", "a house"], cfg=1.0, samples=2, seed=189)
    return de.Context(model=EXACT, abar=ABAR, ts=de.strided_timesteps(stride), images=torch.stack(photos),
                      image_names=names, mask=mask, out=str(out), backend="exact", **dict(values, **settings))


# ------------------------------------------------------------------------------ parity with diffusers
def test_schedule_matches_diffusers():
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert ABAR.dtype == torch.float32
    assert (ABAR - theirs).abs().max() < 1e-6
    for t, value in [(0, 0.99995869), (250, 0.84588802), (500, 0.49228504), (750, 0.14317866),
                     (990, 1.9671733e-4)]:
        assert abs(ABAR[t].item() - value) < 1e-6 * max(1, value * 10)
    assert TS[:3] == [990, 960, 930] and TS[-1] == 0 and len(TS) == 34
    assert de.strided_timesteps(100)[-2:] == [90, 0]


def test_learned_range_variance_matches_diffusers():
    sched = if_scheduler()
    g = torch.Generator().manual_seed(0)
    for t, t_prev in zip(TS[:-1], TS[1:]):
        v = torch.rand(3, 8, 8, generator=g) * 2 - 1
        ours = de.learned_range_logvar(v, ABAR[t], ABAR[t_prev])
        assert torch.allclose(ours, sched._get_variance(t, predicted_variance=v), atol=1e-5, rtol=1e-5), t


def test_strided_step_matches_diffusers():
    sched = if_scheduler()
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 3, 16, 16, generator=g) * 1.5
    eps = torch.randn(2, 3, 16, 16, generator=g)
    v = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    for t, t_prev in [(990, 960), (690, 660), (30, 0)]:
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
        ours = de.ddpm_step(x_t, eps, v, ABAR[t], ABAR[t_prev], z)
        gen = torch.Generator().manual_seed(t)
        theirs = sched.step(torch.cat([eps, v], 1), t, x_t, generator=gen).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (t, (ours - theirs).abs().max())


def test_deepfloyd_path_matches_diffusers_two_steps():
    """The deepfloyd backend + CFG + sampler for two steps equals the same steps through diffusers."""
    unet = tiny_if_unet()
    g = torch.Generator().manual_seed(2)
    embeds = {"": torch.randn(1, 77, EMB_DIM, generator=g), "a cat": torch.randn(1, 77, EMB_DIM, generator=g)}
    model = de.DeepFloydDenoiser(unet, embeds, torch.device("cpu"), torch.float32)
    ts = [990, 500, 0]
    w = 7.0
    x_start = torch.randn(1, 3, 64, 64, generator=g)
    def estimate(x, t):
        return de.guided_eps(model, x, t, ["a cat"], w)
    ours, xs = de.iterative_denoise(estimate, x_start, 0, ts, ABAR, torch.Generator().manual_seed(3))
    assert len(xs) == 3 and ours.shape == (1, 3, 64, 64)

    sched = if_scheduler(ts)
    gen = torch.Generator().manual_seed(3)
    x = x_start
    emb = torch.cat([embeds["a cat"], embeds[""]])
    with torch.no_grad():
        for t in ts[:-1]:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
            eps_c, eps_u = out[:, :3].chunk(2)
            guided = torch.cat([eps_u + w * (eps_c - eps_u), out[:1, 3:]], 1)
            x = sched.step(guided, t, x, generator=gen).prev_sample
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


def test_guidance_at_w1_is_the_conditional_estimate_in_one_pass():
    calls = []

    def model(x_t, t, prompts):
        calls.append(list(prompts))
        return EXACT(x_t, t, prompts)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    eps, _ = de.guided_eps(model, x, 500, ["a house"] * 2, 1.0)
    assert calls == [["a house", "a house"]]
    assert torch.equal(eps, EXACT(x, 500, ["a house"] * 2)[0])
    guided, _ = de.guided_eps(model, x, 500, ["a house"] * 2, 3.0)
    assert calls[1] == ["a house", "a house", "", ""]  # cond and uncond in one batch
    eps_u = EXACT(x, 500, ["", ""])[0]
    assert torch.allclose(guided, eps_u + 3 * (eps - eps_u), atol=1e-5)


# -------------------------------------------------------------------------------- the exact denoiser
def test_x0_from_eps_recovers_a_set_image_at_small_t_and_a_blend_at_large_t():
    y = SET_IMAGES[[0, 7]]
    for t, close in [(30, True), (990, False)]:
        x_t = de.add_noise(y, ABAR[t], torch.randn(y.shape, generator=torch.Generator().manual_seed(t)))
        eps, v = EXACT(x_t, t, ["", ""])
        x0 = de.x0_from_eps(x_t, eps, ABAR[t])
        assert v.eq(-1).all()
        if close:
            assert (x0 - y).abs().max() < 1e-3
        else:  # almost no signal left: the posterior mean is near the mean of the set, far from any one image
            assert (x0 - y).abs().mean() > 0.1
            assert (x0 - SET_IMAGES.mean(0)).abs().mean() < (x0 - y).abs().mean()


def test_iterative_denoising_returns_the_noised_set_image():
    y = SET_IMAGES[[1, 5, 10]]
    g = torch.Generator().manual_seed(4)
    i = de.start_index(TS, 690)
    assert (i, TS[i]) == (10, 690)
    x_t = de.add_noise(y, ABAR[690], de.randn(y, g))
    out, xs = de.iterative_denoise(exact_estimate(), x_t, i, TS, ABAR, g)
    assert len(xs) == len(TS) - i
    assert nearest_set_image(out).tolist() == [1, 5, 10]
    assert (out - y).abs().mean() < 0.01


def test_prompts_select_their_images():
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(6, 3, 64, 64, generator=g)
    out, _ = de.iterative_denoise(exact_estimate("a house"), x_t, 0, TS, ABAR, g)
    assert all(SET_NAMES[k] == "a house" for k in nearest_set_image(out))
    with pytest.raises(UserError, match="names no image"):
        EXACT.check(["a dragon"])


def test_inpainting_keeps_the_unmasked_pixels_exactly():
    photos, _ = de.builtin_photos()
    x = photos[0][None].expand(2, -1, -1, -1)
    m = torch.zeros(1, 1, 64, 64)
    m[..., 2:24, 22:42] = 1  # a partial mask: 440 of 4096 pixels are regenerated
    g = torch.Generator().manual_seed(6)
    x_t = de.add_noise(x, ABAR[990], de.randn(x, g))
    out, _ = de.iterative_denoise(exact_estimate(), x_t, 0, TS, ABAR, g, x_orig=x, m=m)
    keep = (m == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert (out - x)[~keep].abs().mean() > 0.1  # the hole was regenerated


def test_sdedit_from_the_last_index_keeps_the_image_and_from_t390_memorises():
    photos, _ = de.builtin_photos()
    x = photos[0][None]
    g = torch.Generator().manual_seed(7)
    same, _ = de.sdedit(exact_estimate(), x, 0, TS, ABAR, g)
    assert (same - x).abs().max() < 0.05
    edited, _ = de.sdedit(exact_estimate(), x, 390, TS, ABAR, g)
    assert (edited - SET_IMAGES[nearest_set_image(edited)]).abs().mean() < 0.01  # it returns a set image


def test_filters_and_hybrid():
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(de.gaussian_blur(x), tv_gaussian_blur(x, [33, 33], [2.0, 2.0]), atol=1e-5)
    assert torch.allclose(de.gaussian_blur(x, 5, 2.0), tv_gaussian_blur(x, [5, 5], [2.0, 2.0]), atol=1e-5)
    assert torch.allclose(de.hybrid_combine(x, x), x, atol=1e-5)  # low-pass + high-pass of one estimate is it
    assert not torch.allclose(de.hybrid_combine(x, torch.zeros_like(x)), x, atol=0.1)  # of two, a real mix


def test_views_and_anagram_symmetry():
    x = torch.randn(2, 3, 64, 64)
    for fwd, inv in de.VIEWS.values():
        assert torch.equal(inv(fwd(x)), x) and not torch.equal(fwd(x), x)
    p1, p2, flip = "a smiley face", "a house", de.VIEWS["flip"][0]
    a, _ = de.anagram_eps(EXACT, x, 500, p1, p2, "flip", 3.0)
    b, _ = de.anagram_eps(EXACT, flip(x), 500, p2, p1, "flip", 3.0)
    assert torch.allclose(flip(a), b, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-2)


# ------------------------------------------------------------------------------------------- figures
def test_iterative_figure_runs_in_denoising_order(tmp_path):
    c = context(tmp_path)
    panels, labels = de.task_iterative(c)
    assert labels == ["t=690", "t=540", "t=390", "t=240", "t=90", "iterative", "1-step", "blur", "original"]
    clean = panels[5]
    distances = [(p - clean).abs().mean().item() for p in panels[:5]]
    assert distances == sorted(distances, reverse=True) and distances[-1] < 0.5 * distances[0]  # less noisy


def test_onestep_retrieves_a_set_image_at_t250_and_blends_the_set_at_t990(tmp_path):
    c = context(tmp_path)
    noisy = c.noisy_image(de.ONESTEP_TS)
    assert torch.equal(noisy[:3], c.noisy_image(de.FORWARD_TS))  # the same x_t as the forward figure
    x0 = c.one_step(noisy, de.ONESTEP_TS)
    rms = ((SET_IMAGES[None] - x0[:, None]) ** 2).flatten(2).mean(2).sqrt()  # (t, set image)
    assert rms[0].min() < 1e-3 and SET_NAMES[rms[0].argmin()] == "a house"  # t = 250: one image, retrieved
    to_mean = ((x0[3] - SET_IMAGES.mean(0)) ** 2).mean().sqrt()
    assert rms[3].min() > 0.3 and to_mean < rms[3].min()  # t = 990: nearer the set mean than any image


# task -> (rows, images per row, has column labels): the layout each figure must have at samples=2, stride 66
LAYOUT = {"forward": (1, 4, True), "blur": (2, 3, True), "onestep": (2, 5, True), "iterative": (1, 6, True),
          "sample": (1, 2, False), "cfg": (2, 2, False), "sdedit": (2, 7, True), "inpaint": (1, 4, True),
          "img2img": (2, 7, True), "anagram": (3, 2, True), "hybrid": (2, 3, True)}


@pytest.mark.parametrize("task", list(de.TASKS))
def test_every_task_writes_a_titled_figure(task, tmp_path):
    c = context(tmp_path, stride=66)
    with torch.no_grad():
        de.TASKS[task](c)
    img = np.asarray(Image.open(tmp_path / f"{task}.png").convert("L"))
    rows, cols, col_labels = LAYOUT[task]
    top = 18 + (16 if col_labels else 0)  # common.grid_image: title line, then column labels
    assert img.shape[0] == top + 2 * (66 * rows + 2)  # 64 px + 2 px padding per image, at scale 2
    assert img.shape[1] >= 2 * (66 * cols + 2)
    assert (img[:18] < 100).sum() > 50  # the title's text is there
    assert img[top:].std() > 20  # and the panels are not blank


def test_figure_titles_name_the_prompt_and_the_unconditional_one():
    assert de.quoted("") == "'' (unconditional)"
    assert de.quoted("a house") == "'a house'"


def test_mask_is_read_without_a_numpy_warning(tmp_path):
    make_image_folder(tmp_path / "photos", n=1, size=(80, 60))
    photo = tmp_path / "photos" / "0000.jpg"
    mask = np.zeros((60, 80), np.uint8)
    mask[:30] = 255  # the top half is regenerated
    Image.fromarray(mask).save(tmp_path / "mask.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, names, m = de.load_inputs([str(photo)], str(tmp_path / "mask.png"))
    assert images.shape == (1, 3, 64, 64) and names == ["0000.jpg"]
    assert m.shape == (1, 64, 64) and m[:, :31].eq(1).all() and m[:, 33:].eq(0).all()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_every_task_on_the_exact_backend(tmp_path, capsys):
    de.main(["--out", str(tmp_path / "out"), "--samples", "2", "--steps-stride", "66"])
    assert sorted(os.listdir(tmp_path / "out")) == sorted(f"{t}.png" for t in de.TASKS)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "precision: fp32 (the exact backend always computes in fp32)"
    for task in de.TASKS:  # one line per task as its figure is written, in order
        assert f"-> {tmp_path / 'out' / task}.png" in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == list(de.TASKS)


def test_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit):
        de.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ["(default: runs/deepfloyd_edit)", "(default: DeepFloyd/IF-I-XL-v1.0)", "(default: 30)",
                    "(default: 'an oil painting of an old man' 'an oil painting of people around a campfire'",
                    "(default: 'a lithograph of a skull' 'a lithograph of waterfalls' on deepfloyd",
                    "(default: 7 on deepfloyd", "(default: 189)", "(default: auto)", "(default: all)",
                    "(default: prompt_embeds_dict.pth)"]:
        assert default in text
    assert "default: None" not in text and "default: False" not in text
    assert text.count("(default") == 17  # every flag has a default, shown once
    assert text.startswith("usage:") and "every formula hand-written" in text  # the module docstring


class Loaded(Exception):
    """Raised by a stand-in for load_deepfloyd: main got as far as loading the model, with this dtype."""


@pytest.mark.parametrize("flag,device,capability,expected", [
    ("auto", "cuda", (7, 5), "fp16"), ("auto", "cuda", (8, 0), "fp16"), ("auto", "cpu", None, "fp32"),
    ("bf16", "cuda", (8, 0), "bf16"), ("bf16", "cpu", None, "bf16"), ("fp32", "cuda", (9, 0), "fp32"),
    ("fp16", "cpu", None, "fp16 needs a CUDA GPU"), ("bf16", "cuda", (7, 5), "bf16 needs a GPU with native")])
def test_precision_choice(flag, device, capability, expected, tmp_path, monkeypatch, capsys):
    """main's choice on the deepfloyd backend (on a pretended GPU of the given compute capability)."""
    def load_deepfloyd(model_id, embeds, prompts, device, dtype):
        raise Loaded(dtype)
    monkeypatch.setattr(common, "get_device", lambda name: torch.device(device))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability)
    monkeypatch.setattr(de, "load_deepfloyd", load_deepfloyd)
    argv = ["--backend", "deepfloyd", "--precision", flag, "--out", str(tmp_path / "out")]
    if " " in expected:
        with pytest.raises(UserError, match=expected):
            de.main(argv)
    else:
        with pytest.raises(Loaded) as e:
            de.main(argv)
        assert capsys.readouterr().out.splitlines()[0] == f"precision: {expected}"
        assert e.value.args[0] == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[expected]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A local 'model id': a folder holding unet/ only (no text encoder), its full weights and the *.fp16.*
    ones as IF publishes them, and an embeddings file of every default prompt."""
    root = tmp_path_factory.mktemp("if")
    tiny_if_unet().save_pretrained(root / "model" / "unet")
    tiny_if_unet().half().save_pretrained(root / "model" / "unet", variant="fp16")
    d = de.DEEPFLOYD_DEFAULTS
    prompts = ["", d["prompt"], d["edit_prompt"], *d["anagram"], *d["hybrid"]]
    torch.save({p: torch.randn(1, 77, EMB_DIM).half() for p in prompts}, root / "embeds.pth")
    return root


def deepfloyd_args(tiny_model, out):
    return ["--backend", "deepfloyd", "--model-id", tiny_model / "model", "--embeds",
            tiny_model / "embeds.pth", "--steps-stride", 495, "--samples", 1, "--out", out]


def test_deepfloyd_backend_every_task_through_a_local_model(tiny_model, tmp_path, capsys):
    before = (tiny_model / "embeds.pth").read_bytes()
    de.main([*map(str, deepfloyd_args(tiny_model, tmp_path / "out")), "--device", "cpu", "--cfg", "1"])
    assert sorted(os.listdir(tmp_path / "out")) == sorted(f"{t}.png" for t in de.TASKS)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "precision: fp32"
    for task in de.TASKS:  # one line per task as its figure is written
        assert f"-> {tmp_path / 'out' / task}.png" in out
    assert (tiny_model / "embeds.pth").read_bytes() == before


def test_deepfloyd_backend_in_bf16_on_the_cpu(tiny_model, tmp_path, capsys):
    argv = deepfloyd_args(tiny_model, tmp_path / "out") + ["--device", "cpu", "--task", "cfg"]
    de.main([str(a) for a in argv] + ["--precision", "bf16"])
    assert "precision: bf16" in capsys.readouterr().out
    img = np.asarray(Image.open(tmp_path / "out" / "cfg.png"))
    assert img[34:].std() > 10


def test_unet_load_errors_say_what_went_wrong(tiny_model, tmp_path, monkeypatch):
    """In fp16 the *.fp16.* files load; a failed load is one line naming its error and both usual causes (a
    gated model, no network)."""
    from huggingface_hub.errors import GatedRepoError
    model_id = str(tiny_model / "model")
    embeds = str(tiny_model / "embeds.pth")
    cpu = torch.device("cpu")
    model = de.load_deepfloyd(model_id, embeds, [""], cpu, torch.float16)
    assert next(model.unet.parameters()).dtype == torch.float16
    reference = de.DeepFloydDenoiser(tiny_if_unet(), model.embeds, cpu, torch.float32)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    eps, v = model(x, 500, [""])
    assert eps.shape == v.shape == (1, 3, 64, 64)
    assert torch.allclose(eps, reference(x, 500, [""])[0], atol=0.05)
    full_only = tmp_path / "full" / "unet"  # good full weights, garbage *.fp16.* ones: which file loads?
    full_only.mkdir(parents=True)
    for name in ["config.json", "diffusion_pytorch_model.safetensors"]:
        (full_only / name).write_bytes((tiny_model / "model" / "unet" / name).read_bytes())
    (full_only / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"\x00garbage")
    de.load_deepfloyd(str(full_only.parent), embeds, [""], cpu, torch.float32)  # fp32: the full files
    with pytest.raises(UserError, match="needs IF's \\*.fp16.\\* files"):
        de.load_deepfloyd(str(full_only.parent), embeds, [""], cpu, torch.float16)  # fp16: the fp16 files

    (tmp_path / "bad" / "unet").mkdir(parents=True)
    config = (tiny_model / "model" / "unet" / "config.json").read_bytes()
    (tmp_path / "bad" / "unet" / "config.json").write_bytes(config)
    for name in ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]:
        (tmp_path / "bad" / "unet" / name).write_bytes(b"\x00garbage")
    for dtype in [torch.float32, torch.float16]:
        with pytest.raises(UserError) as e:
            de.load_deepfloyd(str(tmp_path / "bad"), embeds, [""], cpu, dtype)
        assert "cannot load the IF stage-1 UNet" in str(e.value) and "Error" in str(e.value), str(e.value)
        assert "accept its licence" in str(e.value) and "no network" in str(e.value) and "\n" not in str(e.value)

    def gated(*a, **k):  # diffusers wraps the hub's error (built without its HTTP response, hence __new__)
        hub_error = GatedRepoError.__new__(GatedRepoError)
        raise OSError("DeepFloyd/IF-I-XL-v1.0 could not be loaded") from hub_error
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", gated)
    with pytest.raises(UserError, match="accept its licence.*hf auth login"):
        de.load_deepfloyd(model_id, embeds, [""], cpu, torch.float16)


# ------------------------------------------------------------------------------------------ bad input
class Trap:
    """Unpickling this would create the file `marker`: a booby-trapped embeddings file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (40, 30)).save(tmp_path / "photo.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "photo.png").read_bytes()[:60])
    Image.new("L", (64, 64)).save(tmp_path / "mask.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage")
    torch.save({"": Trap(str(tmp_path / "marker"))}, tmp_path / "trap.pth")
    return tmp_path


def main_error(tmp_path, *argv):
    with pytest.raises(UserError) as e:
        de.main([*map(str, argv), "--out", str(tmp_path / "out")])
    return str(e.value)


DF = ["--backend", "deepfloyd", "--device", "cpu"]
BAD_INPUTS = {
    "image-not-an-image": (["--image", "{d}/notes.png"], "--image {d}/notes.png is not a readable image"),
    "image-truncated": (["--image", "{d}/cut.png"], "--image {d}/cut.png is not a readable image"),
    "image-is-a-folder": (["--image", "{d}/empty"], "--image {d}/empty is not a file (a folder, or missing)"),
    "image-missing": (["--image", "{d}/nope.png"], "--image {d}/nope.png is not a file (a folder, or missing)"),
    "mask-of-another-size": (["--image", "{d}/photo.png", "--mask", "{d}/mask.png"], "resize the mask"),
    "mask-unreadable": (["--mask", "{d}/notes.png"], "--mask {d}/notes.png is not a readable image"),
    "prompt-not-in-the-set": (["--prompt", "a dragon"], "names no image"),
    "stride-0": (["--steps-stride", "0"], "--steps-stride must be between 1 and 990"),
    "stride-991": (["--steps-stride", "991"], "--steps-stride must be between 1 and 990"),
    "samples-0": (["--samples", "0"], "--samples must be between 1 and 64"),
    "samples-65": (["--samples", "65"], "--samples must be between 1 and 64"),
    "cfg-nan": (["--cfg", "nan"], "--cfg must be a finite number"),
    "cfg-inf": (["--cfg", "inf"], "--cfg must be a finite number"),
    "cfg-negative": (["--cfg", "-1"], "--cfg must be between 0 and 100"),
    "seed-negative": (["--seed", "-1"], "--seed must be between 0 and"),
    "device-unknown": (["--device", "gpu"], "--device gpu is not a device"),
    "fp16-on-cpu": ([*DF, "--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_anything_is_written(case, bad_files):
    argv, expected = BAD_INPUTS[case]
    d = str(bad_files)
    message = main_error(bad_files, *[a.format(d=d) for a in argv])
    assert expected.format(d=d) in message and "\n" not in message
    assert not os.path.exists(bad_files / "out")


@pytest.mark.parametrize("case", ["bomb", "value-error"])
def test_hostile_images_are_one_sentence(case, bad_files, monkeypatch):
    if case == "bomb":  # PIL's DecompressionBombError, without writing a gigapixel file
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    else:
        def broken(*a, **k):
            raise ValueError("tile cannot extend outside image")
        monkeypatch.setattr(Image, "open", broken)
    message = main_error(bad_files, "--image", bad_files / "photo.png")
    assert f"--image {bad_files / 'photo.png'} is not a readable image" in message


EMBEDS_ERRORS = {
    "corrupt": ("corrupt.pth", "is not a readable file of embeddings"),
    "booby-trapped": ("trap.pth", "is not a readable file of embeddings"),  # weights_only=True refuses it
    "a-folder": ("empty", "is not a file (a folder, or missing)"),
}


@pytest.mark.parametrize("case", list(EMBEDS_ERRORS))
def test_bad_embeddings_file(case, bad_files, tiny_model):
    name, expected = EMBEDS_ERRORS[case]
    message = main_error(bad_files, *DF, "--model-id", tiny_model / "model", "--embeds", bad_files / name)
    assert expected in message
    assert not os.path.exists(bad_files / "marker")  # nothing in the file ran
    assert os.listdir(bad_files / "out") == []


def test_model_folder_without_a_unet_names_the_missing_file(bad_files, tiny_model):
    embeds = tiny_model / "embeds.pth"
    message = main_error(bad_files, *DF, "--embeds", embeds, "--model-id", bad_files / "empty")
    assert "OSError" in message and "config.json" in message and "\n" not in message


@pytest.mark.parametrize("case", ["prompt-not-in-the-file", "no-file"])
def test_a_prompt_without_an_embedding_is_refused_in_one_sentence(case, tiny_model, tmp_path):
    """Nothing encodes prompts: a prompt missing from --embeds (named), or a missing file, is refused with a
    pointer to the docs that show how to encode them; exit code 2, no figure, the file untouched."""
    embeds = tiny_model / "embeds.pth" if case == "prompt-not-in-the-file" else tmp_path / "nope.pth"
    before = (tiny_model / "embeds.pth").read_bytes()
    r = run_script("deepfloyd_edit.py", *deepfloyd_args(tiny_model, tmp_path / "out"), "--device", "cpu",
                   "--task", "sample", "--prompt", "a cat", "--embeds", embeds)  # the last --embeds counts
    if case == "prompt-not-in-the-file":
        message = assert_user_error(r, f"1 prompt(s) ('a cat') have no embedding in --embeds {embeds}")
    else:
        message = assert_user_error(r, f"--embeds {embeds} is not a file (a folder, or missing)")
    assert "docs/deepfloyd_edit.md shows" in message
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []
    assert (tiny_model / "embeds.pth").read_bytes() == before and not os.path.exists(tmp_path / "nope.pth")


def test_missing_diffusers(bad_files, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if diffusers were not installed
    embeds = tiny_model / "embeds.pth"
    message = main_error(bad_files, *DF, "--embeds", embeds, "--model-id", tiny_model / "model")
    assert "needs diffusers" in message
