"""deepfloyd_edit.py: the hand-written schedule, variance and step against diffusers' DDPMScheduler, the editing tricks on
the exact denoiser, the deepfloyd code path through a tiny randomly initialised IF-layout UNet, and every bad input."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

import deepfloyd_edit as de
from common import UserError
from helpers import assert_user_error, make_image_folder, run_script

TS = de.strided_timesteps(30)
ABAR = de.alphas_cumprod()
SET_IMAGES, SET_NAMES = de.draw_builtin()
EXACT = de.ExactDenoiser(SET_IMAGES, SET_NAMES, ABAR)
EMB_DIM = 24


def if_scheduler(timesteps=TS, **config):
    """IF stage 1's scheduler config (thresholding off by default, as in the course's own loop)."""
    config = dict(dict(thresholding=False, clip_sample=False, dynamic_thresholding_ratio=0.95, sample_max_value=1.5), **config)
    s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range", **config)
    s.set_timesteps(timesteps=timesteps)
    return s


def tiny_if_unet():
    """IF stage 1's layout (ResnetDownsample + SimpleCrossAttn blocks, scale-shift, text_proj + text pooling, 6 outputs), tiny."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=32, attention_head_dim=8, encoder_hid_dim=EMB_DIM, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=2, resnet_time_scale_shift="scale_shift",
        norm_num_groups=8, act_fn="gelu").eval()


def exact_estimate(prompt=""):
    return lambda x, t: EXACT(x, t, [prompt] * len(x))


def nearest_set_image(x):
    return ((SET_IMAGES[None] - x[:, None]) ** 2).flatten(2).mean(2).argmin(1)


# ------------------------------------------------------------------------------ parity with diffusers
def test_schedule_matches_diffusers():
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert ABAR.dtype == torch.float32
    assert (ABAR - theirs).abs().max() < 1e-6
    for t, value in [(0, 0.99995869), (250, 0.84588802), (500, 0.49228504), (750, 0.14317866), (990, 1.9671733e-4)]:
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


@pytest.mark.parametrize("threshold", [False, True])
def test_strided_step_matches_diffusers(threshold):
    sched = if_scheduler(thresholding=threshold)
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(2, 3, 16, 16, generator=g) * 1.5, torch.randn(2, 3, 16, 16, generator=g)
    v = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    for t, t_prev in [(990, 960), (690, 660), (30, 0)]:
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
        ours = de.ddpm_step(x_t, eps, v, ABAR[t], ABAR[t_prev], z, threshold)
        theirs = sched.step(torch.cat([eps, v], 1), t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (t, (ours - theirs).abs().max())
    x0 = de.dynamic_threshold(torch.randn(2, 3, 16, 16) * 3)
    assert x0.abs().max() <= 1 + 1e-6  # thresholding maps into [-1, 1]


def test_deepfloyd_path_matches_diffusers_two_steps():
    """The deepfloyd backend + CFG + sampler for two steps equals the same steps through diffusers' own scheduler."""
    unet = tiny_if_unet()
    g = torch.Generator().manual_seed(2)
    embeds = {"": torch.randn(1, 77, EMB_DIM, generator=g), "a cat": torch.randn(1, 77, EMB_DIM, generator=g)}
    model = de.DeepFloydDenoiser(unet, embeds, torch.device("cpu"), torch.float32)
    ts, gamma = [990, 500, 0], 7.0
    x_start = torch.randn(1, 3, 64, 64, generator=g)
    ours, xs = de.iterative_denoise(lambda x, t: de.cfg_estimate(model, x, t, ["a cat"], gamma), x_start, 0, ts, ABAR,
                                    torch.Generator().manual_seed(3))
    assert len(xs) == 3 and ours.shape == (1, 3, 64, 64)

    sched, gen, x = if_scheduler(ts), torch.Generator().manual_seed(3), x_start
    emb = torch.cat([embeds["a cat"], embeds[""]])
    with torch.no_grad():
        for t in ts[:-1]:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
            (eps_c, eps_u), v_c = out[:, :3].chunk(2), out[:1, 3:]
            x = sched.step(torch.cat([eps_u + gamma * (eps_c - eps_u), v_c], 1), t, x, generator=gen).prev_sample
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


# -------------------------------------------------------------------------------- the exact denoiser
def test_x0_from_eps_recovers_a_set_image_at_small_t_and_the_mean_at_large_t():
    y = SET_IMAGES[[0, 7]]
    for t, close in [(30, True), (990, False)]:
        x_t = de.forward(y, ABAR[t], torch.randn(y.shape, generator=torch.Generator().manual_seed(t)))
        eps, v = EXACT(x_t, t, ["", ""])
        x0 = de.x0_from_eps(x_t, eps, ABAR[t])
        assert v.eq(-1).all()
        if close:
            assert (x0 - y).abs().max() < 1e-3
        else:  # almost no signal left: the posterior mean is close to the mean of the set, far from any one image
            assert (x0 - y).abs().mean() > 0.1
            assert (x0 - SET_IMAGES.mean(0)).abs().mean() < (x0 - y).abs().mean()


def test_iterative_denoising_returns_the_noised_set_image():
    y = SET_IMAGES[[1, 5, 10]]
    g = torch.Generator().manual_seed(4)
    i = de.start_index(TS, 690)
    assert (i, TS[i]) == (10, 690)
    out, xs = de.iterative_denoise(exact_estimate(), de.forward(y, ABAR[690], de.randn(y, g)), i, TS, ABAR, g)
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
    m[..., 2:24, 22:42] = 1
    g = torch.Generator().manual_seed(6)
    out, _ = de.iterative_denoise(exact_estimate(), de.forward(x, ABAR[990], de.randn(x, g)), 0, TS, ABAR, g, inpaint=(x, m))
    keep = (m == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert (out - x)[~keep].abs().mean() > 0.1  # the hole was regenerated


def test_sdedit_from_the_last_index_keeps_the_image_and_from_t390_memorises():
    photos, _ = de.builtin_photos()
    x = photos[0][None]
    g = torch.Generator().manual_seed(7)
    same = de.sdedit(exact_estimate(), x, 0, TS, ABAR, g)
    assert (same - x).abs().max() < 0.05
    edited = de.sdedit(exact_estimate(), x, 390, TS, ABAR, g)
    assert (edited - SET_IMAGES[nearest_set_image(edited)]).abs().mean() < 0.01  # the exact denoiser returns a set image


def test_filters_and_hybrid():
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(de.gaussian_blur(x), tv_gaussian_blur(x, [33, 33], [2.0, 2.0]), atol=1e-5)
    assert torch.allclose(de.gaussian_blur(x, 5, 2.0), tv_gaussian_blur(x, [5, 5], [2.0, 2.0]), atol=1e-5)
    assert torch.allclose(de.hybrid_combine(x, x), x, atol=1e-5)  # low-pass + high-pass of one estimate is that estimate
    assert not torch.allclose(de.hybrid_combine(x, torch.zeros_like(x)), x, atol=0.1)  # and of two, a real mix


def test_views_and_anagram_symmetry():
    x = torch.randn(2, 3, 64, 64)
    for fwd, inv in de.VIEWS.values():
        assert torch.equal(inv(fwd(x)), x) and not torch.equal(fwd(x), x)
    p1, p2, flip = "a smiley face", "a house", de.VIEWS["flip"][0]
    a, _ = de.anagram_estimate(EXACT, x, 500, p1, p2, "flip", 3.0)
    b, _ = de.anagram_estimate(EXACT, flip(x), 500, p2, p1, "flip", 3.0)
    assert torch.allclose(flip(a), b, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-2)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_every_task_on_the_exact_backend(tmp_path):
    out = tmp_path / "out"
    r = run_script("deepfloyd_edit.py", "--out", out, "--samples", 2, "--steps-stride", 66)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == sorted(f"{t}.png" for t in de.TASKS)
    assert Image.open(out / "sdedit.png").size[0] > 7 * 128  # 6 noise levels + the original, at scale 2


def test_cli_user_image_set_photo_and_mask(tmp_path):
    for name in ["a red thing", "a blue thing"]:
        make_image_folder(tmp_path / "set" / name, n=3)
    make_image_folder(tmp_path / "photos", n=2, size=(80, 60))
    photo = tmp_path / "photos" / "0000.jpg"
    Image.new("L", Image.open(photo).size, 255).save(tmp_path / "mask.png")
    r = run_script("deepfloyd_edit.py", "--images", tmp_path / "set", "--image", photo, tmp_path / "photos" / "0001.png",
                   "--mask", tmp_path / "mask.png", "--task", "inpaint", "--out", tmp_path / "out", "--steps-stride", 90)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(tmp_path / "out" / "inpaint.png")
    r = run_script("deepfloyd_edit.py", "--image", tmp_path / "nope.png", "--out", tmp_path / "bad")
    assert_user_error(r, "nope.png", "does not exist")
    assert not os.path.exists(tmp_path / "bad")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A local 'model id': a folder holding unet/ only (no text encoder), and an embeddings file of every default prompt."""
    root = tmp_path_factory.mktemp("if")
    tiny_if_unet().save_pretrained(root / "model" / "unet")
    prompts = ["", de.DEEPFLOYD_DEFAULTS["prompt"], de.DEEPFLOYD_DEFAULTS["edit_prompt"],
               *de.DEEPFLOYD_DEFAULTS["anagram"], *de.DEEPFLOYD_DEFAULTS["hybrid"]]
    torch.save({p: torch.randn(1, 77, EMB_DIM).half() for p in prompts}, root / "embeds.pth")
    return root


def test_cli_deepfloyd_backend_through_a_local_model(tiny_model, tmp_path):
    common_args = ["--backend", "deepfloyd", "--model-id", tiny_model / "model", "--embeds", tiny_model / "embeds.pth",
                   "--steps-stride", 495, "--samples", 1, "--out", tmp_path / "out"]
    r = run_script("deepfloyd_edit.py", *common_args, "--task", "cfg")
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(tmp_path / "out" / "cfg.png")
    before = (tiny_model / "embeds.pth").read_bytes()
    r = run_script("deepfloyd_edit.py", *common_args, "--task", "sample", "--prompt", "a cat")
    assert_user_error(r, "'a cat'", "no embedding", "huggingface-cli login")
    assert (tiny_model / "embeds.pth").read_bytes() == before


def test_unet_load_errors_say_what_went_wrong(tiny_model, tmp_path, monkeypatch):
    """A copy saved without *.fp16.safetensors loads in fp16 (retry with variant=None); a corrupt UNet names its error;
    only an access error (gated, 401/403, no such repo) gets the licence / login message."""
    from huggingface_hub.errors import GatedRepoError
    args = SimpleNamespace(model_id=str(tiny_model / "model"), embeds=str(tiny_model / "embeds.pth"), cpu_offload=False)
    model = de.load_deepfloyd(args, torch.device("cpu"), torch.float16, [""])
    assert next(model.unet.parameters()).dtype == torch.float16
    reference = de.DeepFloydDenoiser(tiny_if_unet(), model.embeds, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    eps, v = model(x, 500, [""])
    assert eps.shape == v.shape == (1, 3, 64, 64) and torch.allclose(eps, reference(x, 500, [""])[0], atol=0.05)

    (tmp_path / "bad" / "unet").mkdir(parents=True)
    (tmp_path / "bad" / "unet" / "config.json").write_bytes((tiny_model / "model" / "unet" / "config.json").read_bytes())
    (tmp_path / "bad" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage")
    for dtype in [torch.float32, torch.float16]:
        with pytest.raises(UserError) as e:
            de.load_deepfloyd(SimpleNamespace(**dict(vars(args), model_id=str(tmp_path / "bad"))), torch.device("cpu"), dtype, [""])
        assert "cannot load the IF stage-1 UNet" in str(e.value) and "Error" in str(e.value), str(e.value)
        assert "accept its licence" not in str(e.value) and "\n" not in str(e.value)

    def gated(*a, **k):  # diffusers wraps the hub's error (which needs an HTTP response to build, hence __new__)
        hub_error = GatedRepoError.__new__(GatedRepoError)
        raise OSError("DeepFloyd/IF-I-XL-v1.0 could not be loaded") from hub_error
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", gated)
    with pytest.raises(UserError, match="accept its licence.*huggingface-cli login"):
        de.load_deepfloyd(args, torch.device("cpu"), torch.float16, [""])


def main_error(tmp_path, *argv):
    with pytest.raises(UserError) as e:
        de.main([*map(str, argv), "--out", str(tmp_path / "out")])
    return str(e.value)


def test_bad_inputs(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (40, 30)).save(tmp_path / "photo.png")
    Image.new("L", (64, 64)).save(tmp_path / "mask.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pth").write_bytes(b"\x00garbage")
    assert "not a readable image" in main_error(tmp_path, "--image", tmp_path / "notes.png")
    assert "resize the mask" in main_error(tmp_path, "--image", tmp_path / "photo.png", "--mask", tmp_path / "mask.png")
    assert "names no image" in main_error(tmp_path, "--prompt", "a dragon")
    assert "holds no images" in main_error(tmp_path, "--images", tmp_path / "empty")
    assert "must be positive" in main_error(tmp_path, "--steps-stride", 0)
    assert "fp16 needs a CUDA GPU" in main_error(tmp_path, "--dtype", "fp16", "--device", "cpu")
    assert "--cpu-offload" in main_error(tmp_path, "--backend", "deepfloyd", "--cpu-offload", "--device", "cpu")
    assert not os.path.exists(tmp_path / "out")  # nothing written before the input is validated
    deepfloyd = ["--backend", "deepfloyd", "--device", "cpu", "--embeds", tiny_model / "embeds.pth"]
    message = main_error(tmp_path, *deepfloyd, "--model-id", tmp_path / "empty")  # a local folder is no licence problem
    assert "OSError" in message and "config.json" in message and "accept its licence" not in message
    assert "not a readable embeddings file" in main_error(tmp_path, "--backend", "deepfloyd", "--embeds", tmp_path / "corrupt.pth")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if diffusers were not installed
    assert "needs diffusers" in main_error(tmp_path, *deepfloyd, "--model-id", tiny_model / "model")
