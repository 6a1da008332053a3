"""The DeepFloyd IF editing toolbox of CS180 Project 5 Part A, with every formula hand-written.

Part A of UC Berkeley CS180 Project 5 ("Diffusion Models & Flow Matching") on stage 1 of DeepFloyd IF (64x64
pixels): the forward process, blur, one-step and iterative denoising, sampling, classifier-free guidance,
SDEdit, inpainting (RePaint), image-to-image, visual anagrams and hybrid images. Two denoisers answer the same
call `model(x_t, t, prompts) -> (eps, v)` (v: IF's variance channels):
  --backend deepfloyd  the real IF-I UNet through diffusers (gated weights); prompts are T5 embeddings read
                       from the course's prompt_embeds_dict.pth (--embeds).
  --backend exact      the closed-form optimal denoiser E[x0 | x_t] of a small labelled image set (offline).
Time is IF's discrete DDPM time: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t = 999 noise, t = 0 data;
divided by sqrt(abar) + sqrt(1 - abar) it is the project's flow-matching x_s = s x + (1 - s) eps at
s = sqrt(abar) / (sqrt(abar) + sqrt(1 - abar)). Images are in [-1, 1]. The guidance scale w is the course's
gamma: eps = eps_u + w (eps_c - eps_u).

  python deepfloyd_edit.py                       # every task, exact backend on a CPU
  python deepfloyd_edit.py --task sdedit --image photo.jpg drawing.png
  python deepfloyd_edit.py --backend deepfloyd --model-id DeepFloyd/IF-I-L-v1.0 --task anagram \\
      --anagram "an oil painting of an old man" "an oil painting of people around a campfire"
"""
import argparse
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common
from common import UserError

T = 1000                                    # training timesteps of IF
SIZE = 64                                   # stage-1 resolution
FORWARD_TS = [250, 500, 750]                # 1.1-1.3
ONESTEP_TS = [250, 500, 750, 990]           # 1.3, plus t = 990 where almost no signal is left
ITERATIVE_T = 690                           # 1.4: i_start = 10 with stride 30
SDEDIT_TS = [960, 900, 840, 780, 690, 390]  # 1.7: i_start = 1, 3, 5, 7, 10, 20 with stride 30
DEEPFLOYD_DEFAULTS = dict(prompt="a high quality photo", cfg=7.0, edit_prompt="a rocket ship",
                          anagram=["an oil painting of an old man",
                                   "an oil painting of people around a campfire"],
                          hybrid=["a lithograph of a skull", "a lithograph of waterfalls"])


# ----------------------------------------------------------------------------------- noise schedule
def alphas_cumprod(steps=T):
    """squaredcos_cap_v2 as diffusers computes it: f(s) = cos^2((s + 0.008) / 1.008 * pi / 2), in float64
    beta_i = min(1 - f((i + 1) / T) / f(i / T), 0.999), then in float32 abar_t = prod_{i<=t} (1 - beta_i)."""
    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)]
    return torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64).float(), dim=0)


def strided_timesteps(stride):
    """990, 990 - stride, ..., 0 (the course's range(990, -1, -30)); 0 is appended if the stride misses it."""
    ts = list(range(990, -1, -stride))
    return ts if ts[-1] == 0 else ts + [0]


def start_index(ts, t):
    """The index i_start of the strided timestep nearest to t."""
    return min(range(len(ts)), key=lambda i: abs(ts[i] - t))


def add_noise(x0, abar_t, eps):
    """The forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps


def x0_from_eps(x_t, eps, abar_t):
    """The forward process solved for x0: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def learned_range_logvar(v, abar_t, abar_prev):
    """IF's learned variance of the step t -> t': log sigma^2 = frac log(beta) + (1 - frac) log(beta~),
    frac = (v + 1) / 2, beta = 1 - abar_t / abar_t', posterior beta~ = (1 - abar_t') / (1 - abar_t) beta."""
    beta = 1 - abar_t / abar_prev
    posterior_var = (1 - abar_prev) / (1 - abar_t) * beta
    frac = (v + 1) / 2
    return frac * beta.log() + (1 - frac) * posterior_var.log()


def ddpm_step(x_t, eps, v, abar_t, abar_prev, z):
    """One strided DDPM step t -> t' (DDPM eq. 7 with alpha = abar_t / abar_t'): x_t' = sigma z +
    sqrt(abar_t') (1 - alpha) / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_t') / (1 - abar_t) x_t."""
    x0 = x0_from_eps(x_t, eps, abar_t)
    alpha = abar_t / abar_prev
    mean = (abar_prev.sqrt() * (1 - alpha) / (1 - abar_t) * x0
            + alpha.sqrt() * (1 - abar_prev) / (1 - abar_t) * x_t)
    return mean + (0.5 * learned_range_logvar(v, abar_t, abar_prev)).exp() * z


# ----------------------------------------------------------------------- noise estimates (the tricks)
def guided_eps(model, x_t, t, prompts, w):
    """Classifier-free guidance: eps = eps_u + w (eps_c - eps_u), '' the unconditional prompt, both in one
    batch; v from the conditional half. At w = 1 it is eps_c itself, one pass."""
    if w == 1:
        return model(x_t, t, prompts)
    b = len(x_t)
    eps, v = model(torch.cat([x_t, x_t]), t, list(prompts) + [""] * b)
    eps_c, eps_u = eps.chunk(2)
    return eps_u + w * (eps_c - eps_u), v[:b]


# A view is an orthogonal map of pixels; its inverse brings a noise estimate made on the viewed image back
# (Geng et al. 2024). Inverting colours works as x_t = sqrt(abar) x0 + sqrt(1 - abar) eps negates termwise.
VIEWS = {"flip": (lambda x: x.flip(2), lambda x: x.flip(2)),  # upside down, the course's flip(dims=[2])
         "rot90": (lambda x: x.rot90(1, (2, 3)), lambda x: x.rot90(-1, (2, 3))),
         "invert": (lambda x: -x, lambda x: -x)}


def anagram_eps(model, x_t, t, p1, p2, view, w):
    """Visual anagrams: eps = (eps(x_t, p1) + view^-1(eps(view(x_t), p2))) / 2, each with CFG; v from p1."""
    fwd, inv = VIEWS[view]
    b = len(x_t)
    eps, v = guided_eps(model, torch.cat([x_t, fwd(x_t)]), t, [p1] * b + [p2] * b, w)
    return (eps[:b] + inv(eps[b:])) / 2, v[:b]


def gaussian_blur(x, kernel=33, sigma=2.0):
    """Separable Gaussian filter, reflect padding (torchvision's gaussian_blur): the hybrids' low-pass."""
    r = torch.arange(kernel, dtype=torch.float32, device=x.device) - (kernel - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, [kernel // 2] * 4, mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)


def hybrid_combine(eps_low, eps_high):
    """Factorized diffusion: the low frequencies of one estimate plus the high frequencies of the other."""
    return gaussian_blur(eps_low) + eps_high - gaussian_blur(eps_high)


def hybrid_eps(model, x_t, t, p_low, p_high, w):
    """Hybrid images: low-pass of eps(x_t, p_low) + high-pass of eps(x_t, p_high), each with CFG."""
    b = len(x_t)
    eps, v = guided_eps(model, torch.cat([x_t, x_t]), t, [p_low] * b + [p_high] * b, w)
    return hybrid_combine(eps[:b], eps[b:]), v[:b]


# ------------------------------------------------------------------------------------------ sampler
def randn(like, gen):
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)


def iterative_denoise(estimate, x_t, i_start, ts, abar, gen, x_orig=None, m=None):
    """From x_t at ts[i_start] to ts[-1] = 0, one ddpm_step per pair (t, t'); estimate(x_t, t) -> (eps, v).
    Inpainting with a mask m: after each step RePaint keeps x_t' = m x_t' + (1 - m) add_noise(x_orig, t'),
    so only m = 1 is regenerated. Returns the final image and every intermediate x_t."""
    xs = [x_t]
    for t, t_prev in zip(ts[i_start:-1], ts[i_start + 1:]):
        eps, v = estimate(x_t, t)
        x_t = ddpm_step(x_t, eps, v, abar[t], abar[t_prev], randn(x_t, gen))
        if m is not None:
            x_t = m * x_t + (1 - m) * add_noise(x_orig, abar[t_prev], randn(x_t, gen))
        xs.append(x_t)
    if m is not None:  # t' = 0 is the clean end: paste the original pixels themselves
        x_t = m * x_t + (1 - m) * x_orig
    return x_t, xs


def sdedit(estimate, x_orig, t_start, ts, abar, gen, m=None):
    """SDEdit: noise the image to t_start with the forward process, then denoise it (with a mask m, only
    m = 1 is regenerated: inpainting). Returns what iterative_denoise does."""
    i = start_index(ts, t_start)
    x_t = add_noise(x_orig, abar[ts[i]], randn(x_orig, gen))
    return iterative_denoise(estimate, x_t, i, ts, abar, gen, x_orig, m)


# ---------------------------------------------------------------------------------------- denoisers
class ExactDenoiser:
    """The MSE-optimal denoiser of a finite set {y_k}: with x_t = sqrt(abar) y + sqrt(1 - abar) eps and y
    uniform over the images a prompt names ('' = all), E[x0 | x_t] = sum_k p(k | x_t) y_k with
    p(k | x_t) = softmax_k(-|x_t - sqrt(abar) y_k|^2 / (2 (1 - abar))). It returns the eps this x0 implies."""

    def __init__(self, images, names, abar):
        self.images = images
        self.names = names
        self.abar = abar
        self.prompts = list(dict.fromkeys(names))

    def check(self, prompts):
        for p in prompts:
            if p and p not in self.prompts:
                raise UserError(f"prompt {p!r} names no image of the exact backend's set; use '' or one of "
                                f"{self.prompts}")

    def __call__(self, x_t, t, prompts):
        abar = self.abar[t]
        x = x_t.flatten(1).double()
        y = abar.sqrt().double() * self.images.flatten(1).double()
        dist2 = (x ** 2).sum(1, keepdim=True) - 2 * x @ y.T + (y ** 2).sum(1)  # |x_t - sqrt(abar) y_k|^2
        member = torch.tensor([[not p or p == n for n in self.names] for p in prompts], device=x_t.device)
        weights = (-dist2 / (2 * (1 - abar.double()))).masked_fill(~member, -math.inf).softmax(dim=1)
        x0 = (weights.float() @ self.images.flatten(1)).view_as(x_t)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        # Once p(k | x_t) is one image, q(x_t' | x_t, x0) is the exact reverse step: variance beta~, v = -1.
        return eps, -torch.ones_like(eps)


class DeepFloydDenoiser:
    """Stage 1 of DeepFloyd IF: unet(x_t, t, T5 embedding) has 6 channels, eps (first 3) and v (last 3)."""

    def __init__(self, unet, embeds, device, dtype):
        dim = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
        for p, e in embeds.items():
            if not (isinstance(e, torch.Tensor) and tuple(e.shape) == (1, 77, dim)):
                raise UserError(f"the embedding of {p!r} has shape {tuple(getattr(e, 'shape', ()))}, not "
                                f"(1, 77, {dim}); encode it again as docs/deepfloyd_edit.md shows")
        self.unet = unet
        self.dtype = dtype
        self.embeds = {p: e.to(device, dtype) for p, e in embeds.items()}

    @torch.no_grad()
    def __call__(self, x_t, t, prompts):
        emb = torch.cat([self.embeds[p] for p in prompts])
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=emb, return_dict=False)[0].float()
        return out[:, :3], out[:, 3:]


# -------------------------------------------------------------------------------------------- tasks
class Context(SimpleNamespace):
    """What every task needs, as keyword fields: the denoiser `model`, the schedule `abar` and `ts`, the
    `images` to edit and their `image_names` (the first, `image`, is the single-image tasks'), the inpainting
    `mask` (1 = regenerate), the `backend` name and the settings, named as the flags."""

    def __init__(self, **fields):
        super().__init__(**fields)
        self.image = self.images[:1]

    def gen(self):
        # each task restarts the noise from --seed, so a figure does not depend on the tasks run before it
        return torch.Generator(self.images.device).manual_seed(self.seed)

    def estimate(self, prompt, w):
        """The noise estimate (x_t, t) -> (eps, v) of one prompt with guidance w."""
        return lambda x_t, t: guided_eps(self.model, x_t, t, [prompt] * len(x_t), w)

    def sample(self, estimate, n):
        """n images from pure noise at t = 990."""
        g = self.gen()
        x_t = torch.randn(n, 3, SIZE, SIZE, generator=g, device=self.images.device)
        return iterative_denoise(estimate, x_t, 0, self.ts, self.abar, g)[0]

    def noisy_image(self, ts):
        """The first image at each t of ts, with the same noise in every task that shows it."""
        x = self.image.expand(len(ts), -1, -1, -1)
        return add_noise(x, self.abar[ts].view(-1, 1, 1, 1), randn(x, self.gen()))

    def one_step(self, x_t, ts):
        """x0 from a single noise estimate (w = 1) at each image's own t (1.3)."""
        estimate = self.estimate(self.prompt, 1.0)
        return torch.cat([x0_from_eps(x[None], estimate(x[None], t)[0], self.abar[t])
                          for x, t in zip(x_t, ts)])

    def save(self, name, images, nrow, title, **labels):
        common.save_grid(images.float(), os.path.join(self.out, f"{name}.png"), nrow, scale=2,
                         title=f"{title}  [{self.backend} backend]", **labels)


def quoted(prompt):
    return repr(prompt) if prompt else "'' (unconditional)"


def t_labels(ts):
    return [f"t={t}" for t in ts]


def task_forward(c):
    c.save("forward", torch.cat([c.image, c.noisy_image(FORWARD_TS)]), 4,
           "forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps",
           col_labels=["original"] + t_labels(FORWARD_TS))


def task_blur(c):
    noisy = c.noisy_image(FORWARD_TS)
    c.save("blur", torch.cat([noisy, gaussian_blur(noisy, 5, 2.0)]), 3,
           "classical denoising: Gaussian blur (kernel 5, sigma 2) of x_t",
           row_labels=["x_t", "blurred"], col_labels=t_labels(FORWARD_TS))


def task_onestep(c):
    noisy = c.noisy_image(ONESTEP_TS)
    panels = torch.cat([c.image, noisy, c.image, c.one_step(noisy, ONESTEP_TS)])
    c.save("onestep", panels, 1 + len(ONESTEP_TS),
           f"one-step denoising: x0 from one eps estimate, prompt {quoted(c.prompt)}, w=1",
           row_labels=["x_t", "1-step x0"], col_labels=["original"] + t_labels(ONESTEP_TS))


def task_iterative(c):
    """iterative.png, in denoising order: x_t every 5th step from t = 690, the clean result, then one-step
    denoising and a blur of the same start, and the original. Returns these panels and their labels."""
    i = start_index(c.ts, ITERATIVE_T)
    clean, xs = sdedit(c.estimate(c.prompt, 1.0), c.image, ITERATIVE_T, c.ts, c.abar, c.gen())
    x_t = xs[0]
    shown = range(0, len(xs) - 1, 5)
    panels = [xs[k] for k in shown] + [clean, c.one_step(x_t, [c.ts[i]]), gaussian_blur(x_t, 5, 2.0)]
    panels.append(c.image)
    labels = t_labels([c.ts[i + k] for k in shown]) + ["iterative", "1-step", "blur", "original"]
    c.save("iterative", torch.cat(panels), len(panels),
           f"iterative denoising, every 5th step shown, prompt {quoted(c.prompt)}, w=1", col_labels=labels)
    return panels, labels


def task_sample(c):
    images = c.sample(c.estimate(c.prompt, 1.0), c.samples)
    c.save("sample", images, c.samples, f"sampling from pure noise at t=990, prompt {quoted(c.prompt)}, w=1")


def task_cfg(c):
    prompt = c.prompt or c.edit_prompt  # '' leaves nothing to guide towards
    ws = sorted({1.0, 7.0, c.cfg})
    rows = [c.sample(c.estimate(prompt, w), c.samples) for w in ws]
    c.save("cfg", torch.cat(rows), c.samples,
           f"classifier-free guidance: prompt {quoted(prompt)} against the empty prompt ''",
           row_labels=[f"w={w:g}" for w in ws])


def sdedit_figure(c, name, what, prompt):
    estimate = c.estimate(prompt, c.cfg)
    g = c.gen()
    cols = [sdedit(estimate, c.images, t, c.ts, c.abar, g)[0] for t in SDEDIT_TS] + [c.images]
    c.save(name, torch.stack(cols, 1).flatten(0, 1), len(cols),
           f"{what}: noised to t, then denoised with prompt {quoted(prompt)}, w={c.cfg:g}",
           row_labels=c.image_names,
           col_labels=t_labels([c.ts[start_index(c.ts, t)] for t in SDEDIT_TS]) + ["original"])


def task_sdedit(c):
    sdedit_figure(c, "sdedit", "SDEdit", c.prompt)


def task_img2img(c):
    sdedit_figure(c, "img2img", "text-conditional image-to-image", c.edit_prompt)


def task_inpaint(c):
    m = c.mask[None]
    estimate = c.estimate(c.prompt, c.cfg)
    # from t = 990 as the course does; only the pixels where m = 1 are regenerated
    out, _ = sdedit(estimate, c.image, 990, c.ts, c.abar, c.gen(), m)
    panels = [c.image, (m * 2 - 1).expand(-1, 3, -1, -1), c.image * (1 - m), out]
    c.save("inpaint", torch.cat(panels), 4,
           f"inpainting (RePaint) from t=990, prompt {quoted(c.prompt)}, w={c.cfg:g}",
           col_labels=["original", "mask (white: new)", "kept", "inpainted"])


def task_anagram(c):
    p1, p2 = c.anagram
    rows = []
    for view, (fwd, _) in VIEWS.items():
        x = c.sample(lambda x_t, t: anagram_eps(c.model, x_t, t, p1, p2, view, c.cfg), 1)
        rows += [x, fwd(x)]
    c.save("anagram", torch.cat(rows), 2,
           f"visual anagrams, w={c.cfg:g}: {quoted(p1)} upright, {quoted(p2)} viewed",
           row_labels=list(VIEWS), col_labels=["upright", "viewed"])


def task_hybrid(c):
    far, near = c.hybrid
    x = c.sample(lambda x_t, t: hybrid_eps(c.model, x_t, t, far, near, c.cfg), 2)
    low = gaussian_blur(x)
    c.save("hybrid", torch.stack([x, low, x - low], 1).flatten(0, 1), 3,
           f"hybrid images, w={c.cfg:g}: {quoted(far)} from afar, {quoted(near)} up close",
           col_labels=["hybrid", "low-pass (far)", "high-pass (near)"])


TASKS = {"forward": task_forward, "blur": task_blur, "onestep": task_onestep, "iterative": task_iterative,
         "sample": task_sample, "cfg": task_cfg, "sdedit": task_sdedit, "inpaint": task_inpaint,
         "img2img": task_img2img, "anagram": task_anagram, "hybrid": task_hybrid}


# ----------------------------------------------------------------------- images: built-in and files
def to_tensor(img):
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1


def drawing(paint, *variant):
    """paint(ImageDraw, *variant) on a 256 px canvas, shrunk to 64 px (smooth edges), as a tensor."""
    img = Image.new("RGB", (256, 256))
    paint(ImageDraw.Draw(img), *variant)
    return to_tensor(img.resize((SIZE, SIZE), Image.LANCZOS))


def draw_builtin():
    """The exact backend's built-in set: 5 prompts, each a PIL drawing in 3 variants k."""
    def rocket(d, k):
        cx = [128, 90, 166][k]
        d.rectangle([0, 0, 256, 256], fill=[(10, 15, 60), (45, 10, 60), (5, 45, 70)][k])
        for i in range(14):
            x, y = (i * 73) % 250, (i * 131) % 250
            d.ellipse([x, y, x + 5, y + 5], fill="white")
        d.polygon([(cx - 16, 190), (cx + 16, 190), (cx, 245)], fill=(255, 150, 0))
        d.polygon([(cx - 28, 80), (cx + 28, 80), (cx, 18)], fill=(220, 30, 30))
        d.polygon([(cx - 28, 140), (cx - 55, 200), (cx - 28, 190)], fill=(220, 30, 30))
        d.polygon([(cx + 28, 140), (cx + 55, 200), (cx + 28, 190)], fill=(220, 30, 30))
        d.rectangle([cx - 28, 80, cx + 28, 192], fill=(225, 225, 235))
        d.ellipse([cx - 14, 100, cx + 14, 128], fill=(60, 140, 230), outline="black", width=4)

    def smiley(d, k):
        d.rectangle([0, 0, 256, 256], fill=[(80, 160, 230), (240, 120, 160), (110, 200, 120)][k])
        o = [0, -30, 30][k]
        d.ellipse([38 + o, 38, 218 + o, 218], fill=(255, 215, 0), outline="black", width=6)
        d.ellipse([85 + o, 85, 110 + o, 120], fill="black")
        d.ellipse([146 + o, 85, 171 + o, 120], fill="black")
        d.arc([75 + o, 90, 181 + o, 180], 20, 160, fill="black", width=10)

    def house(d, k):
        d.rectangle([0, 0, 256, 256], fill=[(135, 200, 250), (250, 190, 140), (175, 175, 230)][k])
        d.rectangle([0, 200, 256, 256], fill=(50, 150, 50))
        o = [0, -40, 40][k]
        d.polygon([(40 + o, 120), (216 + o, 120), (128 + o, 45)], fill=(100, 50, 20))
        d.rectangle([60 + o, 120, 196 + o, 205], fill=[(200, 60, 50), (235, 215, 120), (120, 90, 200)][k])
        d.rectangle([112 + o, 150, 144 + o, 205], fill=(70, 40, 20))
        d.rectangle([75 + o, 135, 100 + o, 160], fill=(200, 230, 255), outline="black", width=3)

    def sunset(d, k):
        for y in range(150):
            sky = (250, 90 + y, 60 + y // 3) if k != 1 else (120 + y // 2, 60, 140 + y // 2)
            d.line([0, y, 256, y], fill=sky)
        cx = [128, 70, 186][k]
        d.ellipse([cx - 45, 105, cx + 45, 195], fill=(255, 240, 120))
        d.rectangle([0, 150, 256, 256], fill=(20, 40, 110))
        for y in range(160, 256, 14):
            d.line([cx - 50 + y // 5, y, cx + 50 - y // 5, y], fill=(240, 200, 90), width=4)

    def tree(d, k):
        d.rectangle([0, 0, 256, 256], fill=[(200, 235, 255), (255, 245, 210), (220, 220, 220)][k])
        d.rectangle([0, 210, 256, 256], fill=(120, 80, 40))
        cx = [128, 85, 171][k]
        d.rectangle([cx - 14, 140, cx + 14, 215], fill=(110, 60, 20))
        d.ellipse([cx - 75, 30, cx + 75, 165], fill=[(30, 130, 40), (200, 120, 20), (60, 170, 60)][k])

    painters = {"a rocket ship": rocket, "a smiley face": smiley, "a house": house,
                "a sunset over the sea": sunset, "a tree": tree}
    images = [drawing(paint, k) for paint in painters.values() for k in range(3)]
    names = [name for name in painters for _ in range(3)]
    return torch.stack(images), names


def builtin_photos():
    """The default --image: two pictures NOT in the built-in set, the course's campanile and a drawing."""
    def tower(d):
        d.rectangle([0, 0, 256, 256], fill=(120, 180, 240))
        d.rectangle([0, 215, 256, 256], fill=(40, 110, 40))
        d.rectangle([105, 70, 151, 235], fill=(215, 205, 185))
        d.rectangle([117, 85, 139, 115], fill=(60, 60, 70))
        d.polygon([(100, 72), (156, 72), (128, 15)], fill=(90, 110, 100))
        for x in range(0, 256, 45):
            d.ellipse([x - 30, 190, x + 30, 240], fill=(30, 120, 45))

    def sketch(d):
        d.rectangle([0, 0, 256, 256], fill="white")
        d.line([(50, 125), (128, 55), (206, 125), (50, 125)], fill="black", width=6)
        d.rectangle([65, 125, 191, 205], outline="black", width=6)
        d.rectangle([112, 150, 142, 205], outline="black", width=5)
        d.ellipse([180, 20, 235, 75], outline=(230, 150, 0), width=6)
        d.line([0, 205, 256, 205], fill=(0, 130, 0), width=5)

    return [drawing(tower), drawing(sketch)], ["tower (built-in)", "sketch (built-in)"]


def open_square64(path, what, mode="RGB"):
    """An image file as IF's stage-1 input: centre-cropped to a square, resized to 64x64 (bicubic like IF's
    training data; nearest for a mask, mode L). Returns it and the file's own size."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} is not a file (a folder, or missing); pass a PNG or JPEG")
    try:
        with Image.open(path) as file:
            img = file.convert(mode)
    except Exception as e:  # hostile files raise OSError, ValueError, DecompressionBombError, ...
        raise UserError(f"{what} {path} is not a readable image ({type(e).__name__}); pass a PNG or JPEG")
    s = min(img.size)
    left = (img.width - s) // 2
    top = (img.height - s) // 2
    resample = Image.BICUBIC if mode == "RGB" else Image.NEAREST
    return img.crop((left, top, left + s, top + s)).resize((SIZE, SIZE), resample), img.size


def load_inputs(image_paths, mask_path):
    """The images to edit (N, 3, 64, 64) with their names, and the inpainting mask (1, 64, 64), 1 = new."""
    if image_paths:
        opened = [open_square64(path, "--image") for path in image_paths]
        images = [to_tensor(img) for img, _ in opened]
        names = [os.path.basename(p)[:18] for p in image_paths]
        size = opened[0][1]
    else:
        images, names = builtin_photos()
        size = (SIZE, SIZE)
    if mask_path:
        mask, mask_size = open_square64(mask_path, "--mask", "L")
        if mask_size != size:
            raise UserError(f"--mask is {mask_size[0]}x{mask_size[1]} but the image is {size[0]}x{size[1]}; "
                            f"resize the mask to the image's size")
        mask = (torch.from_numpy(np.array(mask)) > 127).float()[None]
    else:
        mask = torch.zeros(1, SIZE, SIZE)
        mask[:, 2:24, 22:42] = 1  # a box at the top centre: the tower's top, like the course's campanile mask
    return torch.stack(images), names, mask


# --------------------------------------------------------------------------- Hugging Face loading
def load_embeds(path, prompts):
    """The course's prompt_embeds_dict.pth, {prompt: (1, 77, 4096) tensor}, which must hold every prompt."""
    how = "pass the course's prompt_embeds_dict.pth or make one as docs/deepfloyd_edit.md shows"
    if not os.path.isfile(path):
        raise UserError(f"--embeds {path} is not a file (a folder, or missing); {how}")
    try:
        embeds = torch.load(path, map_location="cpu", weights_only=True)  # refuses pickled code
    except Exception:
        embeds = None
    if not isinstance(embeds, dict):
        raise UserError(f"--embeds {path} is not a readable file of embeddings (prompt -> tensor); {how}")
    missing = [p for p in dict.fromkeys(prompts) if p not in embeds]
    if missing:
        raise UserError(f"{len(missing)} prompt(s) ({', '.join(map(repr, missing))}) have no embedding in "
                        f"--embeds {path} (every task's prompts are needed, defaults included); add them as "
                        f"docs/deepfloyd_edit.md shows, or pass prompts it holds")
    return embeds


def load_deepfloyd(model_id, embeds_path, prompts, device, dtype):
    """IF stage 1's UNet from the hub or a local copy, with the T5 embedding of every prompt."""
    try:
        import diffusers
    except ImportError:
        raise UserError("--backend deepfloyd needs diffusers: pip install diffusers (or use --backend exact)")
    embeds = load_embeds(embeds_path, prompts)
    # in fp16 or bf16, IF's published *.fp16.* files: half the download of the full fp32 ones
    variant = "fp16" if dtype != torch.float32 else None
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype,
                                                              variant=variant)
    except Exception as e:  # one message: the two usual causes, and the error itself for a broken local copy
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"cannot load the IF stage-1 UNet from {model_id} ({type(e).__name__}: {reason}): "
                        f"the model is gated (accept its licence at huggingface.co/DeepFloyd/IF-I-XL-v1.0, "
                        f"then `hf auth login`) or there is no network; or pass --model-id a local "
                        f"copy (in fp16 or bf16 it needs IF's *.fp16.* files; else pass --precision fp32)")
    if unet.config.out_channels != 6:
        raise UserError(f"{model_id} has a UNet with {unet.config.out_channels} output channels, not IF "
                        f"stage 1's 6 (eps and variance); pass --model-id DeepFloyd/IF-I-M-v1.0, -L- or -XL-")
    unet = unet.eval().to(device)
    return DeepFloydDenoiser(unet, {p: embeds[p] for p in set(prompts)}, device, dtype)


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    d = DEEPFLOYD_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("--task", choices=[*TASKS, "all"], default="all", help="which figure to make")
    add("--backend", choices=["deepfloyd", "exact"], help="IF stage 1, or the exact denoiser of a small "
        "image set (default: deepfloyd on CUDA, exact elsewhere)")
    add("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    add("--precision", choices=common.PRECISIONS, default="auto", help="deepfloyd's weights and compute: "
        "auto is fp16 on CUDA (IF's published weights) and fp32 elsewhere; exact always computes in fp32")
    add("--model-id", default="DeepFloyd/IF-I-XL-v1.0", help="IF stage 1 on the Hub or a local copy")
    add("--embeds", default="prompt_embeds_dict.pth", help="deepfloyd's T5 prompt embeddings, the course's "
        "file: a dict prompt -> (1, 77, 4096) tensor holding every prompt of the run")
    add("--image", nargs="+", help="image(s) to edit; the first is used by forward, blur, onestep, iterative "
        "and inpaint (default: a built-in tower and a sketch)")
    add("--mask", help="inpainting mask as big as the first --image, white = regenerate (default: a top box)")
    add("--prompt", help="prompt of denoising, sampling, CFG, SDEdit and inpainting; '' is unconditional, "
        f"for which cfg uses --edit-prompt (default: {d['prompt']!r} on deepfloyd, '' on exact)")
    add("--edit-prompt", help="image-to-image prompt "
        f"(default: {d['edit_prompt']!r} on deepfloyd, the set's first prompt on exact)")
    add("--anagram", nargs=2, metavar=("UPRIGHT", "VIEWED"), help="visual anagram prompts (default: "
        f"{d['anagram'][0]!r} {d['anagram'][1]!r} on deepfloyd, the set's 2nd and 3rd prompts on exact)")
    add("--hybrid", nargs=2, metavar=("FAR", "NEAR"), help="hybrid image prompts, low and high frequencies "
        f"(default: {d['hybrid'][0]!r} {d['hybrid'][1]!r} on deepfloyd, the set's 2nd and 3rd on exact)")
    add("--cfg", type=float, help="guidance scale w of the editing tasks, 0 to 100 "
        f"(default: {d['cfg']:g} on deepfloyd, 1 on exact)")
    add("--steps-stride", type=int, default=30, help="timestep stride: 990, 990-stride, ..., 0; 1 to 990")
    add("--samples", type=int, default=5, help="images per sampling figure, 1 to 64")
    add("--seed", type=int, default=189, help="random seed")
    add("--out", default=os.path.join("runs", "deepfloyd_edit"), help="output folder")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.check_finite(args)
    common.check_seed(args)
    common.check_range(args, "steps_stride", 1, 990)
    common.check_range(args, "samples", 1, 64)
    common.check_range(args, "cfg", 0, 100)
    device = common.get_device(args.device)
    backend = args.backend or ("deepfloyd" if device.type == "cuda" else "exact")
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    # auto is fp16 on CUDA as IF's published weights are; common refuses what the device cannot run
    flag = "fp16" if args.precision == "auto" and device.type == "cuda" else args.precision
    precision = common.choose_precision(flag, device.type, capability) if backend == "deepfloyd" else "fp32"
    images, image_names, mask = load_inputs(args.image, args.mask)
    abar = alphas_cumprod()
    defaults = DEEPFLOYD_DEFAULTS
    if backend == "exact":
        set_images, set_names = draw_builtin()
        model = ExactDenoiser(set_images.to(device), set_names, abar.to(device))
        pair = model.prompts[1:3]
        # w = 1: the exact denoiser is already exactly conditional; w > 1 extrapolates past its images
        defaults = dict(prompt="", cfg=1.0, edit_prompt=model.prompts[0], anagram=pair, hybrid=pair)
    chosen = {key: getattr(args, key) if getattr(args, key) is not None else value
              for key, value in defaults.items()}
    prompts = ["", chosen["prompt"], chosen["edit_prompt"], *chosen["anagram"], *chosen["hybrid"]]
    if backend == "exact":
        model.check(prompts)
    tasks = list(TASKS) if args.task == "all" else [args.task]
    common.prepare_out(args.out)
    note = " (the exact backend always computes in fp32)" if backend == "exact" else ""
    print(f"precision: {precision}{note}")
    if backend == "deepfloyd":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        model = load_deepfloyd(args.model_id, args.embeds, prompts, device, dtype)
    ts = strided_timesteps(args.steps_stride)
    ctx = Context(model=model, abar=abar.to(device), ts=ts, images=images.to(device), image_names=image_names,
                  mask=mask.to(device), samples=args.samples, seed=args.seed, out=args.out, backend=backend,
                  **chosen)
    print(f"backend {backend} on {device} | {len(ts) - 1} steps of stride {args.steps_stride} | "
          f"out {args.out}")
    for name in tasks:
        start = time.time()
        TASKS[name](ctx)
        print(f"{name:9s} {time.time() - start:6.1f} s  -> {os.path.join(args.out, name + '.png')}")


if __name__ == "__main__":
    common.run(main)
