"""The DeepFloyd IF editing toolbox of CS180 Project 5 Part A, with every formula hand-written.

Reproduces the course's Part A on stage 1 of DeepFloyd IF (64x64 pixels): the forward process, Gaussian-blur denoising,
one-step and iterative denoising over strided timesteps, sampling, classifier-free guidance, SDEdit, inpainting (RePaint),
text-conditional image-to-image, visual anagrams (flip, 90-degree rotation, colour inversion) and hybrid images.
Source: UC Berkeley CS180 Project 5 "Diffusion Models & Flow Matching", Part A; formulas from the course spec and diffusers' DDPMScheduler.

Two denoisers answer the same call `model(x_t, t, prompts) -> (eps, v)` (v: IF's predicted-variance channels in [-1, 1]):
  --backend deepfloyd  the real IF-I UNet through diffusers (gated weights; fp16 on CUDA); prompts are T5 embeddings.
  --backend exact      the closed-form optimal denoiser E[x0 | x_t] of a small labelled image set; runs offline in seconds.
Conventions: this script keeps IF's discrete DDPM time, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with t = 999 noise and
t = 0 data; it equals (sqrt(abar) + sqrt(1 - abar)) times the project's flow-matching x_s = s x + (1 - s) eps at
s = sqrt(abar) / (sqrt(abar) + sqrt(1 - abar)). Images are in [-1, 1]; figures go to runs/deepfloyd_edit/.

  python deepfloyd_edit.py                                    # every task, exact backend on a CPU (< 1 min)
  python deepfloyd_edit.py --task sdedit --image photo.jpg drawing.png
  python deepfloyd_edit.py --backend deepfloyd --model-id DeepFloyd/IF-I-L-v1.0 --task anagram \\
      --anagram "an oil painting of an old man" "an oil painting of people around a campfire"
"""
import argparse
import importlib.util
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError

import common
from common import UserError

T = 1000                                   # training timesteps of IF
SIZE = 64                                  # stage-1 resolution
FORWARD_TS = [250, 500, 750]               # 1.1-1.3
ITERATIVE_T = 690                          # 1.4: i_start = 10 with stride 30
SDEDIT_TS = [960, 900, 840, 780, 690, 390]  # 1.7: i_start = 1, 3, 5, 7, 10, 20 with stride 30
TASKS = ["forward", "blur", "onestep", "iterative", "sample", "cfg", "sdedit", "inpaint", "img2img", "anagram", "hybrid"]
DEEPFLOYD_DEFAULTS = dict(prompt="a high quality photo", cfg=7.0, edit_prompt="a rocket ship",
                         anagram=["an oil painting of an old man", "an oil painting of people around a campfire"],
                         hybrid=["a lithograph of a skull", "a lithograph of waterfalls"])
GATED = ("DeepFloyd IF is gated: accept its licence at https://huggingface.co/DeepFloyd/IF-I-XL-v1.0 (or -M-, -L-) and run "
         "`huggingface-cli login`, or pass --model-id a local copy (a folder with unet/, and text_encoder/ + tokenizer/ for new prompts)")


# ------------------------------------------------------------------------------- noise schedule
def alphas_cumprod(steps=T):
    """squaredcos_cap_v2 (Nichol & Dhariwal): abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2); beta_i = 1 - abar((i+1)/T) / abar(i/T)
    capped at 0.999, in float64 then cast to float32; abar_t = prod_{i<=t} (1 - beta_i) in float32, exactly as diffusers does."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas.float(), dim=0)


def strided_timesteps(stride):
    """990, 990 - stride, ..., 0 (the course's range(990, -1, -30)); 0 is appended when the stride does not reach it."""
    ts = list(range(990, -1, -stride))
    return ts if ts[-1] == 0 else ts + [0]


def start_index(ts, t):
    """The index i_start of the strided timestep nearest to t."""
    return min(range(len(ts)), key=lambda i: abs(ts[i] - t))


def forward(x0, abar_t, eps):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps


def x0_from_eps(x_t, eps, abar_t):
    """The forward process solved for x0: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def dynamic_threshold(x0, ratio=0.95, max_value=1.5):
    """Imagen's dynamic thresholding, as IF's scheduler config has it: s = the 0.95 quantile of |x0| per image, clamped
    to [1, 1.5]; x0 <- clamp(x0, -s, s) / s. Keeps strong CFG from pushing x0 far outside [-1, 1]."""
    s = torch.quantile(x0.flatten(1).abs().float(), ratio, dim=1).clamp(1, max_value).to(x0.dtype)[:, None, None, None]
    return x0.clamp(-s, s) / s


def learned_range_logvar(v, abar_t, abar_prev):
    """IF's learned-range variance for the step t -> t': log sigma^2 = frac log(beta) + (1 - frac) log(beta~), frac = (v + 1) / 2,
    between beta = 1 - abar_t / abar_t' and the posterior variance beta~ = (1 - abar_t') / (1 - abar_t) beta."""
    beta = 1 - abar_t / abar_prev
    posterior_var = (1 - abar_prev) / (1 - abar_t) * beta
    frac = (v + 1) / 2
    return frac * beta.log() + (1 - frac) * posterior_var.log()


def ddpm_step(x_t, eps, v, abar_t, abar_prev, z, threshold=False):
    """One strided DDPM step t -> t' (DDPM eq. 7 with alpha = abar_t / abar_t'):
    x_t' = sqrt(abar_t') beta / (1 - abar_t) x0 + sqrt(alpha) (1 - abar_t') / (1 - abar_t) x_t + sigma z."""
    x0 = x0_from_eps(x_t, eps, abar_t)
    if threshold:
        x0 = dynamic_threshold(x0)
    alpha = abar_t / abar_prev
    mean = abar_prev.sqrt() * (1 - alpha) / (1 - abar_t) * x0 + alpha.sqrt() * (1 - abar_prev) / (1 - abar_t) * x_t
    return mean + (0.5 * learned_range_logvar(v, abar_t, abar_prev)).exp() * z


# ---------------------------------------------------------------------------------- filters, views
def gaussian_blur(x, kernel=33, sigma=2.0):
    """Separable Gaussian filter with reflect padding (torchvision's gaussian_blur): the low-pass of hybrid images."""
    r = torch.arange(kernel, dtype=torch.float32, device=x.device) - (kernel - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, [kernel // 2] * 4, mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)


# A view is an orthogonal map of pixels; its inverse brings a noise estimate made on the viewed image back (Geng et al. 2024).
VIEWS = {"flip": (lambda x: x.flip(2), lambda x: x.flip(2)),  # upside down, as the course's torch.flip(dims=[2])
         "rot90": (lambda x: x.rot90(1, (2, 3)), lambda x: x.rot90(-1, (2, 3))),
         "invert": (lambda x: -x, lambda x: -x)}  # colour inversion: x_t = sqrt(abar) x0 + sqrt(1-abar) eps negates term by term


# ---------------------------------------------------------------------------------------- images
def draw_builtin():
    """The exact backend's built-in set: 5 prompts x 3 variants drawn with PIL (at 256 px, then downsampled to 64)."""
    def rocket(d, k):
        cx = [128, 90, 166][k]
        d.rectangle([0, 0, 256, 256], fill=[(10, 15, 60), (45, 10, 60), (5, 45, 70)][k])
        for i in range(14):
            d.ellipse([(i * 73) % 250, (i * 131) % 250, (i * 73) % 250 + 5, (i * 131) % 250 + 5], fill="white")
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
            d.line([0, y, 256, y], fill=(250, 90 + y, 60 + y // 3) if k != 1 else (120 + y // 2, 60, 140 + y // 2))
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

    sets = {"a rocket ship": rocket, "a smiley face": smiley, "a house": house, "a sunset over the sea": sunset, "a tree": tree}
    images, names = [], []
    for name, draw in sets.items():
        for k in range(3):
            img = Image.new("RGB", (256, 256))
            draw(ImageDraw.Draw(img), k)
            images.append(to_tensor(img.resize((SIZE, SIZE), Image.LANCZOS)))
            names.append(name)
    return torch.stack(images), names


def builtin_photos():
    """The default --image: two pictures NOT in the built-in set, the course's campanile photo and a hand drawing."""
    tower = Image.new("RGB", (256, 256), (120, 180, 240))
    d = ImageDraw.Draw(tower)
    d.rectangle([0, 215, 256, 256], fill=(40, 110, 40))
    d.rectangle([105, 70, 151, 235], fill=(215, 205, 185))
    d.rectangle([117, 85, 139, 115], fill=(60, 60, 70))
    d.polygon([(100, 72), (156, 72), (128, 15)], fill=(90, 110, 100))
    for x in range(0, 256, 45):
        d.ellipse([x - 30, 190, x + 30, 240], fill=(30, 120, 45))
    sketch = Image.new("RGB", (256, 256), "white")
    d = ImageDraw.Draw(sketch)
    d.line([(50, 125), (128, 55), (206, 125), (50, 125)], fill="black", width=6)
    d.rectangle([65, 125, 191, 205], outline="black", width=6)
    d.rectangle([112, 150, 142, 205], outline="black", width=5)
    d.ellipse([180, 20, 235, 75], outline=(230, 150, 0), width=6)
    d.line([0, 205, 256, 205], fill=(0, 130, 0), width=5)
    return [to_tensor(im.resize((SIZE, SIZE), Image.LANCZOS)) for im in (tower, sketch)], ["tower (built-in)", "sketch (built-in)"]


def to_tensor(img):
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1


def open_image(path, what, mode="RGB"):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist; pass the path of a PNG/JPEG file")
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{what} {path} is not a readable image ({type(e).__name__}); pass a PNG or JPEG file")


def square64(img, resample=Image.BICUBIC):
    """Centre-crop to a square and resize to 64x64 (IF's stage-1 input; bicubic like IF's training data)."""
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((SIZE, SIZE), resample)


def load_image_set(folder):
    """--images DIR: one subfolder per prompt (the folder's name is the prompt), any number of images in each."""
    if not os.path.isdir(folder):
        raise UserError(f"--images {folder} is not a folder; pass a folder with one subfolder of images per prompt")
    images, names = [], []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        for f in sorted(os.listdir(sub)) if os.path.isdir(sub) else []:
            images.append(to_tensor(square64(open_image(os.path.join(sub, f), "image in --images"))))
            names.append(name)
    if not images:
        raise UserError(f"--images {folder} holds no images; put them in one subfolder per prompt, e.g. {folder}/a dog/1.png")
    return torch.stack(images), names


# -------------------------------------------------------------------------------------- denoisers
class ExactDenoiser:
    """The MSE-optimal denoiser of a finite set {y_k}: with x_t = sqrt(abar) y + sqrt(1 - abar) eps and y uniform over the
    images a prompt names ('' = all), p(k | x_t) = softmax_k(-|x_t - sqrt(abar) y_k|^2 / (2 (1 - abar))) and
    E[x0 | x_t] = sum_k p(k | x_t) y_k. It returns the eps that this x0 implies, so the samplers use it like IF's UNet."""

    def __init__(self, images, names, abar):
        self.images, self.names, self.abar = images, names, abar
        self.prompts = list(dict.fromkeys(names))

    def check(self, prompts):
        for p in prompts:
            if p and p not in self.prompts:
                raise UserError(f"prompt {p!r} names no image of the exact backend's set; use '' or one of {self.prompts}")

    def __call__(self, x_t, t, prompts):
        abar = self.abar[t]
        x, y = x_t.flatten(1).double(), abar.sqrt().double() * self.images.flatten(1).double()
        dist2 = (x ** 2).sum(1, keepdim=True) - 2 * x @ y.T + (y ** 2).sum(1)  # |x_t - sqrt(abar) y_k|^2, in float64
        member = torch.tensor([[not p or p == n for n in self.names] for p in prompts], device=x_t.device)
        w = (-dist2 / (2 * (1 - abar.double()))).masked_fill(~member, -math.inf).softmax(dim=1)
        x0 = (w.float() @ self.images.flatten(1)).view_as(x_t)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        # Once p(k | x_t) is one image, q(x_t' | x_t, x0) is the exact reverse step: its variance is beta~, i.e. v = -1.
        return eps, -torch.ones_like(eps)


class DeepFloydDenoiser:
    """Stage 1 of DeepFloyd IF: unet(x_t, t, T5 embedding) has 6 channels, eps (first 3) and v (last 3)."""

    def __init__(self, unet, embeds, device, dtype):
        dim = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
        for p, e in embeds.items():
            if not (isinstance(e, torch.Tensor) and tuple(e.shape) == (1, 77, dim)):
                raise UserError(f"the embedding of {p!r} has shape {tuple(getattr(e, 'shape', ()))}, not (1, 77, {dim}); "
                                f"delete it from the --embeds file so it is encoded again")
        self.unet, self.device, self.dtype = unet, device, dtype
        self.embeds = {p: e.to(device, dtype) for p, e in embeds.items()}

    @torch.no_grad()
    def __call__(self, x_t, t, prompts):
        emb = torch.cat([self.embeds[p] for p in prompts])
        t = torch.full((len(x_t),), t, device=self.device)
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=emb, return_dict=False)[0].float()
        return out[:, :3], out[:, 3:]


def load_embeds(path, prompts, args, device, dtype):
    """The course's prompt_embeds_dict.pth: {prompt: (1, 77, 4096) tensor}. Prompts it lacks are encoded once with IF's T5
    (transformers) and added to the file, so the 11 GiB text encoder is not loaded on the next run."""
    embeds = {}
    if os.path.exists(path):
        try:
            embeds = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise UserError(f"--embeds {path} is not a readable embeddings file; delete it to encode the prompts again")
        if not isinstance(embeds, dict):
            raise UserError(f"--embeds {path} does not hold a dict prompt -> embedding; delete it or pass another file")
    missing = [p for p in dict.fromkeys(prompts) if p not in embeds]
    if not missing:
        return embeds
    try:
        from transformers import T5EncoderModel, T5Tokenizer
        tokenizer = T5Tokenizer.from_pretrained(args.model_id, subfolder="tokenizer")
        encoder = T5EncoderModel.from_pretrained(args.model_id, subfolder="text_encoder", torch_dtype=dtype,
                                                 variant="fp16" if dtype == torch.float16 else None)
    except Exception as e:
        names = ", ".join(map(repr, missing[:3])) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"{len(missing)} prompt(s) ({names}) have no embedding in {path} and IF's T5 encoder could not be loaded "
                        f"from {args.model_id} ({type(e).__name__}); add them to the file, pip install transformers sentencepiece, "
                        f"or: {GATED}")
    encoder = place(encoder, device, args.cpu_offload)
    # IF's pipeline.encode_prompt without caption cleaning: lower-case, strip, pad to 77 T5 tokens.
    tokens = tokenizer([p.lower().strip() for p in missing], padding="max_length", max_length=77, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        out = encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]
    embeds.update({p: out[i:i + 1].half().cpu() for i, p in enumerate(missing)})
    common.save_checkpoint(path, embeds)
    print(f"encoded {len(missing)} prompt(s) into {path}")
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return embeds


def place(module, device, cpu_offload):
    """Move to the device, or with --cpu-offload keep the weights in RAM and stream each layer to the GPU (accelerate)."""
    if not cpu_offload:
        return module.to(device)
    from accelerate import cpu_offload as offload
    offload(module, execution_device=device)
    return module


def is_access_error(error):
    """True when a hub download failed for want of access: a gated repo, 401/403, not logged in, or no such repo."""
    try:
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError  # GatedRepoError is a RepositoryNotFoundError
    except ImportError:
        HfHubHTTPError = RepositoryNotFoundError = ()
    while error is not None:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(error, RepositoryNotFoundError) or (isinstance(error, HfHubHTTPError) and status in (401, 403)):
            return True
        text = str(error).lower()
        if any(k in text for k in ("gated repo", "401 client error", "403 client error", "is not a valid model identifier")):
            return True
        error = error.__cause__ or error.__context__
    return False


def load_deepfloyd(args, device, dtype, prompts):
    try:
        import diffusers
    except ImportError:
        raise UserError("--backend deepfloyd needs diffusers: pip install diffusers transformers sentencepiece (or use --backend exact)")
    embeds = load_embeds(args.embeds, prompts, args, device, dtype)
    unet = None
    for variant in ["fp16", None] if dtype == torch.float16 else [None]:
        try:
            unet = diffusers.UNet2DConditionModel.from_pretrained(args.model_id, subfolder="unet", torch_dtype=dtype,
                                                                  variant=variant)
            break
        except Exception as e:
            error = e
            if not (variant and "fp16" in str(e)):  # retry without the variant only for a copy saved without *.fp16.*
                break
    if unet is None:
        if is_access_error(error):
            raise UserError(f"cannot load the IF stage-1 UNet from {args.model_id} ({type(error).__name__}); " + GATED)
        text = " ".join(str(error).split())[:300]
        raise UserError(f"cannot load the IF stage-1 UNet from {args.model_id} ({type(error).__name__}: {text}); check that "
                        f"{args.model_id}/unet holds config.json and diffusion_pytorch_model*.safetensors, re-download it, "
                        f"or pass another --model-id")
    if unet.config.out_channels != 6:
        raise UserError(f"{args.model_id} has a UNet with {unet.config.out_channels} output channels, not IF stage 1's 6 "
                        f"(eps and variance); pass --model-id DeepFloyd/IF-I-M-v1.0, -L- or -XL-")
    return DeepFloydDenoiser(place(unet.eval(), device, args.cpu_offload), {p: embeds[p] for p in set(prompts)}, device, dtype)


# ------------------------------------------------------------------------ noise estimates (the tricks)
def cfg_estimate(model, x_t, t, prompts, gamma):
    """eps = eps_u + gamma (eps_c - eps_u) with '' as the unconditional prompt, both in one batch; v from the conditional run."""
    b = len(x_t)
    eps, v = model(torch.cat([x_t, x_t]), t, list(prompts) + [""] * b)
    eps_c, eps_u = eps.chunk(2)
    return eps_u + gamma * (eps_c - eps_u), v[:b]


def anagram_estimate(model, x_t, t, p1, p2, view, gamma):
    """Visual anagrams: eps = (eps(x_t, p1) + view^-1(eps(view(x_t), p2))) / 2, each with CFG; v from p1."""
    fwd, inv = VIEWS[view]
    b = len(x_t)
    eps, v = cfg_estimate(model, torch.cat([x_t, fwd(x_t)]), t, [p1] * b + [p2] * b, gamma)
    return (eps[:b] + inv(eps[b:])) / 2, v[:b]


def hybrid_combine(eps_low, eps_high):
    """Factorized diffusion: the low frequencies of one estimate plus the high frequencies of the other (kernel 33, sigma 2)."""
    return gaussian_blur(eps_low) + eps_high - gaussian_blur(eps_high)


def hybrid_estimate(model, x_t, t, p_low, p_high, gamma):
    b = len(x_t)
    eps, v = cfg_estimate(model, torch.cat([x_t, x_t]), t, [p_low] * b + [p_high] * b, gamma)
    return hybrid_combine(eps[:b], eps[b:]), v[:b]


# ------------------------------------------------------------------------------------------ sampler
def iterative_denoise(estimate, x_t, i_start, ts, abar, gen, threshold=False, inpaint=None):
    """From x_t at ts[i_start] down to ts[-1] = 0, one ddpm_step per strided pair (t, t'). estimate(x_t, t) -> (eps, v).
    inpaint = (x_orig, mask): after every step, RePaint keeps x_t' = m x_t' + (1 - m) forward(x_orig, t') (m = 1: regenerate).
    Returns the final image and every intermediate x_t."""
    xs = [x_t]
    for i in range(i_start, len(ts) - 1):
        t, t_prev = ts[i], ts[i + 1]
        eps, v = estimate(x_t, t)
        x_t = ddpm_step(x_t, eps, v, abar[t], abar[t_prev], randn(x_t, gen), threshold)
        if inpaint is not None:
            x_orig, m = inpaint
            x_t = m * x_t + (1 - m) * forward(x_orig, abar[t_prev], randn(x_t, gen))
        xs.append(x_t)
    if inpaint is not None:  # t' = 0 is the clean end: paste the original pixels themselves
        x_t = inpaint[1] * x_t + (1 - inpaint[1]) * inpaint[0]
    return x_t, xs


def randn(like, gen):
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)


def sdedit(estimate, x_orig, t_start, ts, abar, gen, threshold=False):
    """SDEdit: noise the image to t_start with the forward process, then denoise it."""
    i = start_index(ts, t_start)
    return iterative_denoise(estimate, forward(x_orig, abar[ts[i]], randn(x_orig, gen)), i, ts, abar, gen, threshold)[0]


# -------------------------------------------------------------------------------------------- tasks
# Each task writes one figure from the Context `c` (defined below).
def noisy_image(c):
    """The first image at t = 250, 500, 750, with the same noise in every task that shows it."""
    x = c.image[None].expand(3, -1, -1, -1)
    return forward(x, c.abar[FORWARD_TS].view(-1, 1, 1, 1), randn(x, c.gen()))


def task_forward(c):
    c.save("forward", torch.cat([c.image[None], noisy_image(c)]), 4, col_labels=["original"] + [f"t={t}" for t in FORWARD_TS])


def task_blur(c):
    noisy = noisy_image(c)
    c.save("blur", torch.cat([noisy, gaussian_blur(noisy, 5, 2.0)]), 3, row_labels=["x_t", "blur"],
           col_labels=[f"t={t}" for t in FORWARD_TS])


def one_step(c, noisy, ts):
    """x0 from a single CFG-free noise estimate at each image's own t (1.3)."""
    return torch.cat([x0_from_eps(n[None], c.cfg_est(n[None], t, 1.0)[0], c.abar[t]) for n, t in zip(noisy, ts)])


def task_onestep(c):
    noisy = noisy_image(c)
    c.save("onestep", torch.cat([c.image[None], noisy, c.image[None], one_step(c, noisy, FORWARD_TS)]), 4,
           row_labels=["x_t", "1-step"], col_labels=["original"] + [f"t={t}" for t in FORWARD_TS])


def task_iterative(c):
    i, g = start_index(c.ts, ITERATIVE_T), c.gen()
    x_t = forward(c.image[None], c.abar[c.ts[i]], randn(c.image[None], g))
    clean, xs = iterative_denoise(lambda x, t: c.cfg_est(x, t, 1.0), x_t, i, c.ts, c.abar, g, c.args.threshold)
    shown = list(range(0, len(xs) - 1, 5))[::-1]  # every 5th step, least noisy first as in the course's figure
    panels = [xs[k] for k in shown] + [clean, one_step(c, x_t, [c.ts[i]]), gaussian_blur(x_t, 5, 2.0), c.image[None]]
    c.save("iterative", torch.cat(panels), len(panels),
           col_labels=[f"t={c.ts[i + k]}" for k in shown] + ["iterative", "1-step", "blur", "original"])


def task_sample(c):
    c.save("sample", c.sample(c.args.prompt, 1.0), c.args.samples, row_labels=[c.args.prompt or "''"])


def task_cfg(c):
    gammas = sorted({1.0, 7.0, c.args.cfg})
    prompt = c.args.prompt or c.args.edit_prompt  # '' leaves nothing to guide towards
    c.save("cfg", torch.cat([c.sample(prompt, g) for g in gammas]), c.args.samples,
           row_labels=[f"gamma {g:g}" for g in gammas])


def sdedit_figure(c, name, prompt):
    est = lambda x, t: c.cfg_est(x, t, c.args.cfg, prompt)
    g = c.gen()
    cols = [sdedit(est, c.images, t, c.ts, c.abar, g, c.args.threshold) for t in SDEDIT_TS] + [c.images]
    grid = torch.stack(cols, 1).flatten(0, 1)
    c.save(name, grid, len(cols), row_labels=c.image_names,
           col_labels=[f"t={c.ts[start_index(c.ts, t)]}" for t in SDEDIT_TS] + ["original"])


def task_sdedit(c):
    sdedit_figure(c, "sdedit", c.args.prompt)


def task_img2img(c):
    sdedit_figure(c, "img2img", c.args.edit_prompt)


def task_inpaint(c):
    x_orig, m, g = c.image[None], c.mask[None], c.gen()
    x_t = forward(x_orig, c.abar[c.ts[0]], randn(x_orig, g))  # from t = 990, nearly pure noise, as the course does
    out, _ = iterative_denoise(lambda x, t: c.cfg_est(x, t, c.args.cfg), x_t, 0, c.ts, c.abar, g, c.args.threshold, (x_orig, m))
    panels = [x_orig, (m * 2 - 1).expand(-1, 3, -1, -1), x_orig * (1 - m), out]
    c.save("inpaint", torch.cat(panels), 4, col_labels=["original", "mask", "kept", "inpainted"])


def task_anagram(c):
    p1, p2 = c.args.anagram
    rows = []
    for view, (fwd, _) in VIEWS.items():
        x = c.run(lambda x, t: anagram_estimate(c.model, x, t, p1, p2, view, c.args.cfg), 1)
        rows += [x, fwd(x)]
    c.save("anagram", torch.cat(rows), 2, row_labels=list(VIEWS), col_labels=[p1[:20], f"{p2[:20]} (viewed)"])


def task_hybrid(c):
    lo, hi = c.args.hybrid
    x = c.run(lambda x, t: hybrid_estimate(c.model, x, t, lo, hi, c.args.cfg), 2)
    far = gaussian_blur(x)
    c.save("hybrid", torch.stack([x, far, x - far], 1).flatten(0, 1), 3,
           col_labels=["hybrid", f"far: {lo[:16]}", f"near: {hi[:15]}"])


class Context:
    """What every task needs: the flags, the denoiser, the schedule, the images to edit and the mask."""

    def __init__(self, args, model, abar, images, image_names, mask, device):
        self.args, self.model, self.abar, self.device = args, model, abar.to(device), device
        self.images, self.image_names, self.mask = images.to(device), image_names, mask.to(device)
        self.image, self.ts = self.images[0], strided_timesteps(args.steps_stride)

    def gen(self):
        """Each task restarts the noise stream from --seed, so a task's figure does not depend on which ran before it."""
        return torch.Generator(self.device).manual_seed(self.args.seed)

    def cfg_est(self, x_t, t, gamma, prompt=None):
        """The CFG estimate for one prompt (default --prompt); gamma = 1 is the conditional estimate alone, one pass."""
        prompts = [self.args.prompt if prompt is None else prompt] * len(x_t)
        if gamma == 1:
            return self.model(x_t, t, prompts)
        return cfg_estimate(self.model, x_t, t, prompts, gamma)

    def run(self, estimate, n):
        """Sample n images from pure noise at t = 990 with a given noise estimate."""
        g = self.gen()
        x_t = randn(torch.empty(n, 3, SIZE, SIZE, device=self.device), g)
        return iterative_denoise(estimate, x_t, 0, self.ts, self.abar, g, self.args.threshold)[0]

    def sample(self, prompt, gamma):
        return self.run(lambda x, t: self.cfg_est(x, t, gamma, prompt), self.args.samples)

    def save(self, name, images, nrow, **labels):
        common.save_grid(images.float(), os.path.join(self.args.out, f"{name}.png"), nrow, scale=2, **labels)


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS + ["all"], default="all", help="which figure to make (default: all of them)")
    p.add_argument("--backend", choices=["deepfloyd", "exact"], help="denoiser: IF stage 1 (default on CUDA) or the exact "
                   "denoiser of a small image set (default elsewhere)")
    p.add_argument("--device", help="cuda, cpu, ... (default: the best available)")
    p.add_argument("--dtype", choices=["fp16", "fp32"], help="deepfloyd weights' precision (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--model-id", default="DeepFloyd/IF-I-XL-v1.0", help="IF stage 1 on the Hub (IF-I-M/L/XL-v1.0) or a local copy")
    p.add_argument("--cpu-offload", action="store_true", help="deepfloyd on CUDA: keep weights in RAM and stream them to the GPU "
                   "layer by layer (needs accelerate; fits small GPUs, several times slower)")
    p.add_argument("--embeds", help="prompt -> (1, 77, 4096) T5 embeddings file, the course's format; missing prompts are encoded "
                   "and added (default: OUT/prompt_embeds_dict.pth)")
    p.add_argument("--images", help="exact backend: a folder with one subfolder of images per prompt, named as the prompt "
                   "(default: a built-in set of 15 drawings, 3 for each of 5 prompts)")
    p.add_argument("--image", nargs="+", help="image(s) to edit; the first is used by forward/blur/onestep/iterative/inpaint "
                   "(default: a built-in tower and a sketch)")
    p.add_argument("--mask", help="inpainting mask, the same size as the first --image; white = regenerate (default: a top-centre box)")
    p.add_argument("--prompt", help="prompt of denoising, sampling, CFG, SDEdit and inpainting ('' = unconditional; default: "
                   f"{DEEPFLOYD_DEFAULTS['prompt']!r} on deepfloyd, '' on exact; the cfg figure uses --edit-prompt instead of '')")
    p.add_argument("--edit-prompt", help="text-conditional image-to-image prompt (default: 'a rocket ship')")
    p.add_argument("--anagram", nargs=2, metavar=("UPRIGHT", "VIEWED"), help="visual anagram prompts")
    p.add_argument("--hybrid", nargs=2, metavar=("FAR", "NEAR"), help="hybrid image prompts: low frequencies, high frequencies")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale gamma of the editing tasks (default: 7 on deepfloyd "
                   "as in the course; 1 on exact, which is already exactly conditional and overshoots when extrapolated)")
    p.add_argument("--steps-stride", type=int, default=30, help="stride of the timesteps 990, 990-stride, ..., 0 (default 30: 33 steps)")
    p.add_argument("--samples", type=int, default=5, help="images per sampling figure (default 5)")
    p.add_argument("--threshold", action="store_true", help="IF pipeline's dynamic thresholding of x0 (the course's loop has none)")
    p.add_argument("--seed", type=int, default=189, help="random seed (default 189, the write-up's)")
    p.add_argument("--out", default=os.path.join("runs", "deepfloyd_edit"), help="output folder")
    return p.parse_args(argv)


def load_inputs(args):
    """The images to edit (3, 64, 64 each) and the inpainting mask (1, 64, 64), validated before anything is written."""
    pils = [open_image(path, "--image") for path in args.image or []]
    images, names = ([to_tensor(square64(im)) for im in pils], [os.path.basename(p)[:18] for p in args.image]) if pils \
        else builtin_photos()
    size = pils[0].size if pils else (SIZE, SIZE)
    if args.mask:
        mask = open_image(args.mask, "--mask", "L")
        if mask.size != size:
            raise UserError(f"--mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; "
                            f"resize the mask to the image's size")
        mask = (torch.from_numpy(np.asarray(square64(mask, Image.NEAREST))) > 127).float()[None]
    else:
        mask = torch.zeros(1, SIZE, SIZE)
        mask[:, 2:24, 22:42] = 1  # a box at the top centre: the built-in tower's top, like the course's campanile mask
    return torch.stack(images), names, mask


def main(argv=None):
    args = parse_args(argv)
    common.check_positive(args, "steps_stride", "samples")
    if args.steps_stride > 990:
        raise UserError(f"--steps-stride must be at most 990, got {args.steps_stride}")
    device = common.get_device(args.device)
    args.backend = args.backend or ("deepfloyd" if device.type == "cuda" else "exact")
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError(f"--dtype fp16 needs a CUDA GPU (half precision on {device.type} is unsupported or very slow); use --dtype fp32")
    if args.cpu_offload and (device.type != "cuda" or args.backend != "deepfloyd" or not importlib.util.find_spec("accelerate")):
        raise UserError("--cpu-offload needs --backend deepfloyd, a CUDA GPU and accelerate (pip install accelerate); drop it otherwise")
    images, image_names, mask = load_inputs(args)
    abar = alphas_cumprod()
    if args.backend == "exact":
        set_images, set_names = load_image_set(args.images) if args.images else draw_builtin()
        model = ExactDenoiser(set_images.to(device), set_names, abar.to(device))
        names = model.prompts  # the defaults are the set's first prompts
        pair = [names[1 % len(names)], names[2 % len(names)]]
        defaults = dict(prompt="", cfg=1.0, edit_prompt=names[0], anagram=pair, hybrid=pair)
    else:
        defaults = DEEPFLOYD_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    prompts = ["", args.prompt, args.edit_prompt, *args.anagram, *args.hybrid]
    if args.backend == "exact":
        model.check(prompts)
    common.prepare_out(args.out)
    if args.backend == "deepfloyd":
        args.embeds = args.embeds or os.path.join(args.out, "prompt_embeds_dict.pth")
        model = load_deepfloyd(args, device, dtype, prompts)
    ctx = Context(args, model, abar, images, image_names, mask, device)
    print(f"backend {args.backend} on {device} | {len(ctx.ts) - 1} steps of stride {args.steps_stride} | out {args.out}")
    for name in TASKS if args.task == "all" else [args.task]:
        start = time.time()
        with torch.no_grad():
            globals()[f"task_{name}"](ctx)
        print(f"{name:9s} {time.time() - start:6.1f} s  -> {os.path.join(args.out, name + '.png')}", flush=True)


if __name__ == "__main__":
    common.run(main)
