"""JiT ("Back to Basics: Let Denoising Generative Models Denoise", Li & He 2025): a plain transformer on pixel patches that
predicts the clean image x and is trained with a velocity loss, by flow matching on CelebA; also class-conditional on MNIST/CIFAR-10.

Sources: moomou, "Building Flow Matching Models from Scratch" (CelebA 256, p=16 stride 12 overlapping patches), the official
JiT code (LTH14/JiT: bottleneck patch embedding, RMSNorm, QK-norm + 2D RoPE, SwiGLU, adaLN-Zero, in-context class tokens,
Heun sampler, CFG interval) and N. Day, "Generating images with Flow Matching" (a diffusion transformer with CFG on MNIST).

Conventions: t=0 is noise, t=1 is data; z_t = t*x + (1-t)*e with e = noise_scale * N(0, I). The network predicts x;
the loss compares velocities v = (x - z_t) / (1 - t), with 1 - t clamped at t_eps so the division stays finite near t=1.
CFG: v = v_uncond + w * (v_cond - v_uncond), only for t inside --cfg-interval. Images are in [-1, 1] inside the model.

    python celeba_jit.py --dataset celeba --data-dir ~/data/img_align_celeba          # the blog: 256 px, 12 x 768
    python celeba_jit.py --dataset celeba --data-dir ~/data/img_align_celeba --model B  # JiT-B/16
    python celeba_jit.py --dataset mnist --model mnist --epochs 8 --batch-size 64 --warmup-epochs 0.5 --t-mu -2.2
    torchrun --nproc_per_node=8 celeba_jit.py --dataset celeba --data-dir ...          # DDP
    python celeba_jit.py --sample runs/celeba_jit/last.pt --cfg 2 --save-samples s.npz --num-samples 1000
    python celeba_jit.py --model B --res 256 --benchmark
"""
import argparse
import copy
import hashlib
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common

SCRIPT = "celeba_jit"
LOG_EVERY = 20  # steps between averaging the losses over the ranks (a GPU sync; the progress line shows the last average)
# depth x dim, heads, patch p and stride s (s < p overlaps), bottleneck width of the patch embedding, in-context class tokens
# (count, first block), learning rate. "blog" is the write-up's 12x768 p=16 s=12 model; "B" is JiT-B/16 (131M params on ImageNet).
PRESETS = {
    "tiny": dict(depth=2, dim=32, heads=2, patch=4, stride=3, bottleneck=16, context=(0, 0), lr=1e-3),
    "mnist": dict(depth=4, dim=128, heads=4, patch=7, stride=7, bottleneck=32, context=(0, 0), lr=1e-3),
    "blog": dict(depth=12, dim=768, heads=12, patch=16, stride=12, bottleneck=128, context=(0, 0), lr=1e-4),
    "B": dict(depth=12, dim=768, heads=12, patch=16, stride=16, bottleneck=128, context=(32, 4), lr=2e-4),
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (img_align_celeba.zip, also on Kaggle as jessicali9530/celeba-dataset)"


# -------------------------------------------------------------------------------------------- data
def find_celeba(data_dir):
    """The folder of CelebA jpgs: DATA itself, DATA/img_align_celeba, or torchvision's DATA/celeba/img_align_celeba,
    downloaded by torchvision when none is there (its Google Drive link often hits a quota)."""
    for folder in (data_dir, os.path.join(data_dir, "img_align_celeba"), os.path.join(data_dir, "celeba", "img_align_celeba")):
        if os.path.isdir(folder) and any(f.lower().endswith(IMAGE_EXTS) for f in os.listdir(folder)):
            return folder
    try:
        import torchvision
        torchvision.datasets.CelebA(data_dir, split="all", download=True)
    except Exception as e:
        raise common.UserError(f"CelebA is not in {data_dir} and torchvision's Google Drive download failed ({type(e).__name__}); "
                        f"get img_align_celeba from {CELEBA_URL}, unzip it and pass --data-dir path/to/img_align_celeba")
    return os.path.join(data_dir, "celeba", "img_align_celeba")


def load_image(path, res, crop):
    """Centre square crop (CelebA: 178, the face region of the 178x218 aligned images), resize to res, uint8 CHW RGB."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except Exception as e:
        raise common.UserError(f"{path} is not a readable image ({type(e).__name__}); remove it from the folder and run again")
    side = min(img.width, img.height, crop or img.width)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((res, res), Image.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1)


def load_folder(folder, res, crop, out_dir, log):
    """Decode and resize every image once into a uint8 .npy cache next to the data (in the out dir when the data folder is
    read-only), named by a hash of the file list (names, sizes, times), so later runs (and every epoch) read only the cache."""
    if not os.path.isdir(folder):
        raise common.UserError(f"data folder {folder} does not exist; pass --data-dir DIR with your images")
    names = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    files = [f for f in names if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(folder, f))]
    if not files:
        raise common.UserError(f"no images (.jpg/.png/...) in {folder}; pass --data-dir DIR with your images")
    if len(files) < len(names):
        log(f"skipping {len(names) - len(files)} entries of {folder} that are not image files")
    stats = [os.stat(os.path.join(folder, f)) for f in files]  # a replaced image (new size or time) rebuilds the cache
    key = hashlib.sha1(repr([(f, st.st_size, st.st_mtime) for f, st in zip(files, stats)] + [res, crop]).encode()).hexdigest()
    cache_dir = folder if os.access(folder, os.W_OK) else out_dir
    cache = os.path.join(cache_dir, f".{SCRIPT}-cache-{res}px-{key[:12]}.npy")
    if os.path.isfile(cache):
        try:
            return np.load(cache, mmap_mode="r"), cache
        except (ValueError, OSError):
            log(f"cache {cache} is unreadable; rebuilding it")
    log(f"decoding {len(files)} images of {folder} at {res} px into {cache} (once)")
    tmp = f"{cache}.tmp-{os.getpid()}.npy"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), 3, res, res))
    try:
        def work(i):
            arr[i] = load_image(os.path.join(folder, files[i]), res, crop)
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL releases the GIL while decoding
            list(pool.map(work, range(len(files))))
        arr.flush()
        del arr
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return np.load(cache, mmap_mode="r"), cache


def load_data(args, log):
    """Returns (images uint8 N x C x H x W as a numpy array or tensor, labels int64 or None, class names)."""
    if args.dataset in ("mnist", "cifar10"):
        images, labels = common.load_dataset(args.dataset, args.data_dir, train=True)
        names = [str(k) for k in range(10)] if args.dataset == "mnist" else CIFAR_CLASSES
        return images, labels, names
    folder = find_celeba(args.data_dir) if args.dataset == "celeba" else args.data_dir
    images, _ = load_folder(folder, args.res, 178 if args.dataset == "celeba" else None, args.out, log)
    return images, None, []


def to_device(images, device):
    """The whole uint8 set on the device when it fits in a third of free memory; batches are then gathered there."""
    if device.type == "cuda" and images.nbytes < torch.cuda.mem_get_info(device)[0] / 3:
        out = torch.empty(images.shape, dtype=torch.uint8, device=device)
        for i in range(0, len(images), 4096):  # chunks, so a memory-mapped cache never sits in RAM whole
            out[i:i + 4096] = torch.from_numpy(np.ascontiguousarray(images[i:i + 4096])).to(device)
        return out
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))  # in RAM


# ------------------------------------------------------------------------------------------- model
def patchify(x, p, s):
    """(B, C, H, W) -> (B, T, C*p*p): p x p windows every s pixels (s < p overlaps). Equal to F.unfold(x, p, stride=s)
    transposed (a test checks it), but as strided views: F.unfold's CPU kernel is ~100x slower here."""
    windows = x.unfold(2, p, s).unfold(3, p, s)  # (B, C, n, n, p, p)
    return windows.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


def unpatchify(tokens, res, p, s):
    """Inverse of patchify: overlapping windows are summed by fold, then divided by how many windows cover each pixel
    (the fold of ones), so overlaps average instead of brightening and no pixel is dropped."""
    cols = tokens.transpose(1, 2)
    return F.fold(cols, res, p, stride=s) / F.fold(torch.ones_like(cols[:1]), res, p, stride=s)


def check_grid(res, p, s):
    """Every pixel must be covered: windows start at 0, s, 2s, ... and the last must end exactly at res."""
    if s > p or res < p or (res - p) % s:
        lo = max(p, p + (res - p) // s * s)
        q = max(d for d in range(1, min(p, res) + 1) if res % d == 0)  # the largest non-overlapping patch that fits
        raise common.UserError(f"--res {res} can't be tiled by {p}px patches every {s}px (needs stride <= patch and (res - patch) "
                               f"divisible by stride); use --res {lo} or {lo + s}, or e.g. --patch {q} --stride {q}")
    return (res - p) // s + 1


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in fp32 even under bf16 autocast, as the official code
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)


def rope_2d(n, head_dim, theta=10000.0):
    """cos, sin (T, head_dim/2) for an n x n grid: the first half of each head's channel pairs rotates with the row index,
    the second half with the column, so q.k depends on positions only through their 2D offset."""
    freqs = theta ** (-torch.arange(head_dim // 4) / (head_dim // 4))
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate channel pairs (x1, x2) of (B, heads, T, head_dim) by the position's angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)

    def forward(self, x, cos, sin):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)  # QK-norm, then RoPE
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        hidden = int(2 / 3 * 4 * dim)  # same parameters as a 4x GELU MLP
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: c sets shift/scale/gate of each branch; gates start at 0 (identity)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = RMSNorm(dim), Attention(dim, heads), RMSNorm(dim), SwiGLU(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight), nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


def timestep_embedding(t, dim=256, max_period=10000.0):
    """Sinusoids of t in [0, 1] (the official code feeds t unscaled), as in DiT."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class JiT(nn.Module):
    def __init__(self, res, channels, num_classes, depth, dim, heads, patch, stride, bottleneck, context, **_):
        super().__init__()
        self.res, self.patch, self.stride, self.num_classes = res, patch, stride, num_classes
        self.context, self.context_start = context
        n = check_grid(res, patch, stride)
        # bottleneck patch embedding p*p*C -> d' -> D (a stride-s conv pair in the official code)
        self.embed = nn.Sequential(nn.Linear(channels * patch * patch, bottleneck, bias=False), nn.Linear(bottleneck, dim))
        self.register_buffer("pos", sincos_2d(n, dim), persistent=False)
        cos, sin = rope_2d(n, dim // heads)
        if self.context:  # class tokens are not rotated (angle 0)
            cos, sin = F.pad(cos, (0, 0, self.context, 0), value=1.0), F.pad(sin, (0, 0, self.context, 0))
            self.context_pos = nn.Parameter(torch.randn(1, self.context, dim) * 0.02)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)  # the last row is the null label (CFG, unconditional data)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final_norm, self.final_ada = RMSNorm(dim), nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.head = nn.Linear(dim, channels * patch * patch)
        for m in (self.final_ada[1], self.head):  # zero output at init
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, z, t, y):
        """z: (B, C, H, W) noisy images, t: (B,) times, y: (B,) labels (num_classes = null) -> predicted clean x."""
        x = self.embed(patchify(z, self.patch, self.stride)) + self.pos
        y_emb = self.y_embed(y)
        c = self.t_embed(timestep_embedding(t)) + y_emb
        n_img = x.shape[1]
        cos, sin = self.cos[-n_img:], self.sin[-n_img:]
        for i, block in enumerate(self.blocks):
            if self.context and i == self.context_start:  # in-context class tokens join the sequence here
                x = torch.cat([y_emb[:, None] + self.context_pos, x], dim=1)
                cos, sin = self.cos, self.sin
            x = block(x, c, cos, sin)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        x = self.head(modulate(self.final_norm(x[:, -n_img:]), shift, scale))
        return unpatchify(x.float(), self.res, self.patch, self.stride)


def sincos_2d(n, dim):
    """Fixed 2D sin-cos absolute position embedding (n*n, dim), added on top of RoPE as in the official code."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    r, c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)


def macs_per_image(res, channels, depth, dim, patch, stride, bottleneck, context, **_):
    """Multiply-adds of one forward pass, counted from the architecture (the papers' "GFLOPs"; 25G for JiT-B/16 at 256)."""
    n_img = check_grid(res, patch, stride) ** 2
    hidden = int(2 / 3 * 4 * dim)
    per_token = 3 * dim * dim + dim * dim + dim * 2 * hidden + hidden * dim
    blocks = sum((n_img + (context[0] if i >= context[1] else 0)) * per_token
                 + 2 * (n_img + (context[0] if i >= context[1] else 0)) ** 2 * dim for i in range(depth))
    return blocks + n_img * (channels * patch * patch * bottleneck + bottleneck * dim + dim * channels * patch * patch)


# ---------------------------------------------------------------------------------- loss and sampler
def sample_t(n, res, mu=-0.8, sigma=0.8, device="cpu"):
    """t = sigmoid(N(mu, sigma^2)), mu shifted by -ln(res/256): larger images keep more signal at a given t, so they get more noise."""
    return torch.sigmoid(torch.randn(n, device=device) * sigma + mu - math.log(res / 256))


def x_to_v(x_pred, z, t, t_eps):
    """v = (x - z_t) / (1 - t), with 1 - t clamped at t_eps."""
    return (x_pred - z) / (1 - t).clamp_min(t_eps).view(-1, 1, 1, 1)


def jit_loss(model, x, y, args):
    t = sample_t(len(x), args.res, args.t_mu, args.t_sigma, x.device)
    e = torch.randn_like(x) * args.noise_scale
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * e
    v = x_to_v(x, z, t, args.t_eps)
    v_pred = x_to_v(model(z, t, y), z, t, args.t_eps)
    return F.mse_loss(v_pred, v)


def guided_velocity(model, z, t, y, cfg, interval, t_eps):
    """CFG u = u_uncond + w (u_cond - u_uncond), cond and uncond in one batched forward, only for t in (lo, hi]."""
    t_batch = torch.full((len(z),), t, device=z.device)
    if cfg == 1 or y is None or not interval[0] < t <= interval[1]:
        y = torch.full_like(t_batch, model.num_classes, dtype=torch.long) if y is None else y
        return x_to_v(model(z, t_batch, y), z, t_batch, t_eps)
    z2, t2 = torch.cat([z, z]), torch.cat([t_batch, t_batch])
    v_cond, v_uncond = x_to_v(model(z2, t2, torch.cat([y, torch.full_like(y, model.num_classes)])), z2, t2, t_eps).chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)


def solve(velocity, z, steps, solver="heun", on_step=None):
    """Integrate dz/dt = velocity(z, t) from t=0 to 1: Heun on every interval but the last, where Euler avoids evaluating
    at t=1 (the official sampler); or Euler throughout."""
    ts = torch.linspace(0, 1, steps + 1).tolist()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = velocity(z, t)
        if solver == "heun" and i < steps - 1:
            v = (v + velocity(z + (t_next - t) * v, t_next)) / 2
        z = z + (t_next - t) * v
        if on_step:
            on_step(z)
    return z


@torch.no_grad()
def generate(model, noise, y, args, on_step=None):
    with torch.autocast(noise.device.type, torch.bfloat16, enabled=noise.device.type == "cuda"):
        velocity = lambda z, t: guided_velocity(model, z, t, y, args.cfg, args.cfg_interval, args.t_eps)
        return solve(velocity, noise * args.noise_scale, args.steps, args.solver, on_step)


# ---------------------------------------------------------------------------------------- figures
def save_figures(model, info, args, device, tag, gif=False):
    """Samples from fixed noise: one row per class (or an 8 x 8 grid), and the sampling path z_t as a GIF."""
    classes = info["classes"]
    n = 8 * len(classes) if classes else 64
    noise = torch.randn(n, info["channels"], args.res, args.res, generator=torch.Generator().manual_seed(args.seed)).to(device)
    y = torch.arange(len(classes), device=device).repeat_interleave(8) if classes else None
    keep = slice(None, None, 8) if classes else slice(0, 8)  # the GIF shows one image per class (or 8 images)
    frames = []
    x = generate(model, noise, y, args, on_step=(lambda z: frames.append(z[keep].float().cpu())) if gif else None)
    scale = max(1, 96 // args.res)
    common.save_grid(x, os.path.join(args.out, f"{tag}.png"), nrow=8, scale=scale, row_labels=classes or None)
    if gif:  # about 20 frames at a smaller scale: noise compresses badly
        every = max(1, len(frames) // 20)
        common.save_gif([noise[keep].cpu()] + frames[len(frames) - 1::-every][::-1], os.path.join(args.out, "sampling.gif"),
                        nrow=len(classes) or 8, scale=max(1, 64 // args.res))
    return x


# ---------------------------------------------------------------------------------------- training
def build(args, info, device):
    model = JiT(args.res, info["channels"], len(info["classes"]), **preset_of(args)).to(device)
    return model, copy.deepcopy(model).requires_grad_(False).eval()


def preset_of(args):
    return dict(PRESETS[args.model], patch=args.patch, stride=args.stride)


def load_data_once(args, rank, world, log):
    """Rank 0 loads first (building the image cache), then tells the others: its UserError ends every rank, none waits forever."""
    error, result = [None], None
    try:
        result = load_data(args, log) if rank == 0 else None
    except common.UserError as e:
        error[0] = str(e)
    if world > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise common.UserError(error[0])
    return result or load_data(args, log)


def train(args, rank, world, device, log):
    ckpt = common.load_checkpoint(args.resume, SCRIPT, vars(args), must_match=MUST_MATCH) if args.resume else None
    images, labels, classes = load_data_once(args, rank, world, log)
    if args.batch_size > len(images):
        raise common.UserError(f"--batch-size {args.batch_size} is larger than the dataset ({len(images)} images); pass a smaller one")
    info = {"channels": int(images.shape[1]), "classes": classes}
    data, labels = to_device(images, device), None if labels is None else labels.to(device)
    model, ema = build(args, info, device)
    log(f"JiT-{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{check_grid(args.res, args.patch, args.stride) ** 2} tokens, {len(images)} training images")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda")
    steps_per_epoch = len(images) // args.batch_size
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    start_epoch, step, losses = 0, 0, []
    if ckpt:
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"]), sched.load_state_dict(ckpt["scheduler"])
        start_epoch, step, losses = ckpt["epoch"], ckpt["step"], list(ckpt["losses"])
        common.set_rank_rng_state(ckpt["rng"], args.seed + 1000 * step)  # every rank continues its own random stream
        log(f"resumed from {args.resume} at epoch {start_epoch}, step {step}")
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    net = torch.compile(net) if args.compile else net
    local = args.batch_size // world
    progress = common.Progress(args.epochs * steps_per_epoch, step, prefix=f"[{SCRIPT}] ", enabled=rank == 0)
    pending = []  # losses of the last steps, kept on the device
    for epoch in range(start_epoch, args.epochs):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + epoch))  # same on all ranks
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size + rank * local:][:local].to(data.device)
            x = data[idx].to(device, non_blocking=True).float() / 127.5 - 1
            y = torch.full((local,), len(classes), device=device) if labels is None else labels[idx]
            y = torch.where(torch.rand(local, device=device) < args.label_dropout, len(classes), y)  # to the null label
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = jit_loss(net, x, y, args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))  # warms up so short runs still get a useful EMA
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
            pending.append(loss.detach())
            if len(pending) == LOG_EVERY or i == steps_per_epoch - 1:  # averaged over the ranks: one sync per LOG_EVERY steps
                mean = torch.stack(pending).float()
                if world > 1:
                    dist.all_reduce(mean)
                losses.extend((mean / world).tolist())
                progress.update(step, losses[-1], len(pending) * args.batch_size)
                pending = []
        rng = common.all_rng_states()  # every rank takes part
        if rank == 0:
            common.save_checkpoint(os.path.join(args.out, "last.pt"), {
                "script": SCRIPT, "config": vars(args), "data": info, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1, "step": step,
                "rng": rng, "losses": losses})
            common.plot_curves(os.path.join(args.out, "loss.png"), {"v-loss": losses},
                               title=f"JiT-{args.model}, {args.dataset}: v-loss per step")
            last = epoch + 1 == args.epochs
            if last or (epoch + 1) % args.sample_every == 0:
                save_figures(ema, info, args, device, "samples" if last else f"samples_epoch{epoch + 1:03d}", gif=last)
    log(f"done: {args.out}/last.pt, samples.png, sampling.gif, loss.png")


def sample_only(args, device, log):
    """Load a checkpoint's EMA weights; write a sample grid, the sampling GIF and optionally an .npz of --num-samples."""
    ckpt = common.load_checkpoint(args.sample, SCRIPT)
    for key in ARCH + FROM_TRAINING:  # the architecture and the noise the model was trained on come from the checkpoint
        setattr(args, key, ckpt["config"][key])
    info = ckpt["data"]
    _, model = build(args, info, device)
    model.load_state_dict(ckpt["ema"])
    save_figures(model, info, args, device, "samples", gif=True)
    if args.save_samples:
        n_cls, batches, labels = len(info["classes"]), [], []
        g = torch.Generator().manual_seed(args.seed + 1)
        for start in range(0, args.num_samples, args.batch_size):
            b = min(args.batch_size, args.num_samples - start)
            y = torch.arange(start, start + b, device=device) % n_cls if n_cls else None  # classes in turn
            noise = torch.randn(b, info["channels"], args.res, args.res, generator=g).to(device)
            batches.append(generate(model, noise, y, args).cpu())
            labels += y.tolist() if n_cls else [-1] * b  # -1: unconditional
        common.save_samples_npz(args.save_samples, torch.cat(batches), labels)
        log(f"wrote {args.num_samples} samples to {args.save_samples}")


# --------------------------------------------------------------------------------------- benchmark
# dense bf16 tensor-core peaks in TFLOP/s; --peak-tflops overrides
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L4", 121), ("A10", 125),
               ("RTX 4090", 165)]


def benchmark(args, device, log):
    """Training img/s (forward + backward + AdamW), sampling img/s (the chosen solver and steps) and MFU, on random data."""
    info = {"channels": 1 if args.dataset == "mnist" else 3,
            "classes": [str(k) for k in range(10)] if args.dataset in ("mnist", "cifar10") else []}
    model, _ = build(args, info, device)
    net = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda")
    b = args.batch_size
    x = torch.randn(b, info["channels"], args.res, args.res, device=device).clamp(-1, 1)
    y = torch.randint(0, len(info["classes"]) + 1, (b,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, reps):
        fn(), sync()  # warm-up (and compilation)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - start) / reps

    def train_step():
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = jit_loss(net, x, y, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_ips = b / timed(train_step, 10)
    sample_ips = b / timed(lambda: generate(model, torch.randn_like(x), y % max(1, len(info["classes"])) if info["classes"]
                                            else None, args), 1)
    macs = macs_per_image(args.res, info["channels"], **preset_of(args))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((p for key, p in PEAK_TFLOPS if key in name and device.type == "cuda"), None)
    achieved = train_ips * 3 * 2 * macs / 1e12  # forward + backward = 3 forwards; 2 FLOPs per multiply-add
    mfu = f"MFU {100 * achieved / peak:.1f}% of {peak} TFLOP/s" if peak else "MFU unknown (peak of this device unknown; pass --peak-tflops)"
    log(f"benchmark JiT-{args.model} {args.res}px on {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{macs / 1e9:.3g} GMACs/img | train {train_ips:.1f} img/s ({achieved:.2f} TFLOP/s, {mfu}) | "
        f"sample {sample_ips:.2f} img/s ({args.solver} {args.steps} steps, cfg {args.cfg})")


# --------------------------------------------------------------------------------------------- CLI
ARCH = ("dataset", "model", "res", "patch", "stride")
FROM_TRAINING = ("noise_scale", "t_eps")  # --sample takes these from the checkpoint too
# --resume must continue the same run: everything but --epochs (and sampling, output and device flags) must agree
MUST_MATCH = ARCH + FROM_TRAINING + ("batch_size", "lr", "warmup_epochs", "grad_clip", "ema", "label_dropout", "t_mu", "t_sigma",
                                     "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["celeba", "folder", "mnist", "cifar10"], default="celeba",
                   help="celeba: CelebA jpgs (centre crop 178); folder: any images, unconditional; mnist/cifar10: class-conditional")
    p.add_argument("--data-dir", default="data", help="the image folder (celeba/folder) or the torchvision root (mnist/cifar10)")
    p.add_argument("--res", type=int, help="training resolution (default 256 for celeba/folder; mnist/cifar10 are 28/32)")
    p.add_argument("--model", choices=list(PRESETS), default="blog", help="architecture preset (see PRESETS at the top)")
    p.add_argument("--patch", type=int, help="patch size p (default: the preset's)")
    p.add_argument("--stride", type=int, help="patch stride s <= p; s < p overlaps the patches (default: the preset's)")
    p.add_argument("--epochs", type=int, default=100, help="training epochs (the blog: 100 on CelebA)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size, split over DDP ranks")
    p.add_argument("--lr", type=float, help="AdamW learning rate, betas (0.9, 0.95), no weight decay (default: the preset's)")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear learning-rate warm-up (official: 5 epochs)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off; the blog: 1.0)")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the weights used for sampling")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability of replacing a label by the null label (for CFG)")
    p.add_argument("--noise-scale", type=float, default=1.0, help="e = noise_scale * N(0, I) (official: 1 at 256 px, 2 at 512)")
    p.add_argument("--t-mu", type=float, default=-0.8, help="mean of logit(t) at 256 px; shifted by -ln(res/256)")
    p.add_argument("--t-sigma", type=float, default=0.8, help="std of logit(t)")
    p.add_argument("--t-eps", type=float, default=0.05, help="clamp of 1 - t when turning x into v")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (Heun: 2 * steps - 1 network evaluations)")
    p.add_argument("--solver", choices=["heun", "euler"], default="heun", help="ODE solver for sampling")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale w (1: off; class-conditional data only)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.1, 1.0], metavar=("LO", "HI"),
                   help="apply CFG only for LO < t <= HI")
    p.add_argument("--sample-every", type=int, default=1, help="write a sample grid every this many epochs")
    p.add_argument("--out", default=os.path.join("runs", SCRIPT), help="output folder")
    p.add_argument("--resume", metavar="CKPT", help="continue training from this checkpoint file (e.g. runs/celeba_jit/last.pt)")
    p.add_argument("--sample", metavar="CKPT", help="only sample from this checkpoint (EMA weights); no data needed")
    p.add_argument("--save-samples", metavar="FILE.npz", help="with --sample: also write --num-samples samples to this .npz")
    p.add_argument("--num-samples", type=int, default=1000, help="number of samples for --save-samples")
    p.add_argument("--benchmark", action="store_true", help="print training and sampling img/s and MFU on random data, then exit")
    p.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s for the MFU (default: known GPUs only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for training")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the fixed sample noise too)")
    return p.parse_args(argv)


def validate(args):
    """Fill preset defaults and reject impossible settings before anything is written."""
    preset = PRESETS[args.model]
    for key in ("patch", "stride", "lr"):  # `is None`, not `or`: an explicit 0 must reach check_positive
        setattr(args, key, preset[key] if getattr(args, key) is None else getattr(args, key))
    native = {"mnist": 28, "cifar10": 32}.get(args.dataset)
    if native and args.res not in (None, native):
        raise common.UserError(f"{args.dataset} images are {native} px; drop --res or pass --res {native}")
    args.res = (native or 256) if args.res is None else args.res
    common.check_positive(args, "res", "patch", "stride", "epochs", "batch_size", "lr", "steps", "num_samples", "sample_every",
                          "noise_scale", "t_sigma", "t_eps")
    if not 0 <= args.label_dropout < 1 or not 0 < args.ema < 1 or args.warmup_epochs < 0 or args.grad_clip < 0:
        raise common.UserError("need 0 <= --label-dropout < 1, 0 < --ema < 1, --warmup-epochs >= 0 and --grad-clip >= 0")
    if not 0 <= args.cfg_interval[0] < args.cfg_interval[1] <= 1:
        raise common.UserError(f"--cfg-interval {args.cfg_interval[0]} {args.cfg_interval[1]} must satisfy 0 <= LO < HI <= 1")
    if args.save_samples and not (args.sample and args.save_samples.endswith(".npz")):
        raise common.UserError("--save-samples FILE.npz needs --sample CKPT and a file name ending in .npz")
    if args.save_samples:
        common.check_output_file(args.save_samples, "--save-samples")
    if args.resume and args.sample:
        raise common.UserError("pass either --resume (continue training) or --sample (only sample), not both")
    if not args.sample:  # --sample takes the architecture from the checkpoint
        check_grid(args.res, args.patch, args.stride)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise common.UserError(f"--batch-size {args.batch_size} must be divisible by the {world} DDP processes")
    return args


def main(argv=None):
    args = validate(parse_args(argv))
    rank, world, device = common.setup_ddp(args.device)
    common.seed_everything(args.seed + rank)
    log = (lambda msg: print(f"[{SCRIPT}] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    if args.benchmark:
        return benchmark(args, device, log)
    common.prepare_out(args.out)  # on every rank: a bad --out then stops all of them, none waits for the others
    if args.sample:  # under torchrun, rank 0 alone samples and writes
        return sample_only(args, device, log) if rank == 0 else None
    train(args, rank, world, device, log)


if __name__ == "__main__":
    common.run(main)
