"""JiT ("Back to Basics: Let Denoising Generative Models Denoise", Li & He 2025): a plain transformer on pixel
patches trained by flow matching with a velocity loss; unconditional on CelebA or any image folder,
class-conditional with classifier-free guidance on MNIST, Fashion-MNIST and CIFAR-10.

Sources: moomou, "Building Flow Matching Models from Scratch" (CelebA 256, 16 px patches every 12 px), the
official JiT code (LTH14/JiT: bottleneck patch embedding, RMSNorm, QK-norm + 2D RoPE, SwiGLU, adaLN-Zero,
in-context class tokens, Heun sampler, CFG interval) and N. Day, "Generating images with Flow Matching" (a
diffusion transformer with CFG on MNIST, predicting the velocity: --pred v).

Conventions: t=0 is noise, t=1 is data; z_t = t x + (1-t) e, e = noise_scale * N(0, I); the velocity is x - e.
The network's output is read as the clean image x (--pred x, the paper), the velocity or the noise, and turned
into v at (z_t, t); the loss is the MSE of velocities for every --pred.
CFG: v = v_uncond + w (v_cond - v_uncond) inside --cfg-interval. Images are in [-1, 1] inside the model.

    python celeba_jit.py --dataset celeba --data-dir ~/data/img_align_celeba       # the blog: 256 px
    python celeba_jit.py --dataset celeba --data-dir ~/data/img_align_celeba --model B  # JiT-B/16
    python celeba_jit.py --dataset fashion --model mnist --epochs 8 --batch-size 64 --warmup-epochs 0.5 \\
        --ema-warmup 22 --cfg 3.5 --cfg-interval 0.2 0.9 --compile --save-samples s.npz  # CPU preset: 8 min
    python celeba_jit.py --dataset fashion --model mnist --patch 14 --stride 14 --pred v  # x/v/eps experiment
    torchrun --nproc_per_node=8 celeba_jit.py --dataset celeba --data-dir ...       # DDP
    python celeba_jit.py --sample runs/celeba_jit/last.pt --save-samples s.npz --num-samples 1000
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
LOG_EVERY = 20  # steps between averaging the losses over the ranks (one GPU sync per group)
# depth x dim, heads, patch p and stride s (s < p overlaps), bottleneck of the patch embedding, in-context
# class tokens (count, first block). "blog": the write-up's 12x768 p=16 s=12 model; "B": JiT-B/16 (131M).
PRESETS = {
    "tiny": dict(depth=2, dim=32, heads=2, patch=4, stride=3, bottleneck=16, context=(0, 0)),
    # the CPU preset (with the docstring's flags: FD 4.3-4.4, 94.5% on Fashion-MNIST in 8 min on 2 cores,
    # README); its 64-wide bottleneck passes all 49 numbers of a 7 x 7 patch (32: worse FD)
    "mnist": dict(depth=4, dim=128, heads=4, patch=7, stride=7, bottleneck=64, context=(0, 0)),
    "blog": dict(depth=12, dim=768, heads=12, patch=16, stride=12, bottleneck=128, context=(0, 0)),
    "B": dict(depth=12, dim=768, heads=12, patch=16, stride=16, bottleneck=128, context=(32, 4)),
}
LR = {"tiny": 1e-3, "mnist": 1e-3, "blog": 1e-4, "B": 2e-4}  # AdamW learning rate per preset
GPU_PRESETS = ("blog", "B")  # on a CPU, these first time 2 steps and say how long the run would take
FLIPPED = ("celeba", "folder", "cifar10")  # random horizontal flips as the official training; none for the
# centred 28 px digits and garments (a mirrored digit is no digit, and the MNIST source uses none)
SOLVER, CFG, CFG_INTERVAL = "heun", 3.0, (0.1, 1.0)  # the official sampler (JiT-B's w); the CLI's defaults
# --resume must continue the same run: all but --epochs (and sampling, output and device flags) must agree
TRAINING_KEYS = ("dataset", "model", "res", "patch", "stride", "pred", "noise_scale", "t_eps", "batch_size",
                 "lr", "warmup_epochs", "grad_clip", "ema", "ema_warmup", "label_dropout", "t_mu", "t_sigma",
                 "no_flip", "seed")
NATIVE_RES = {"mnist": 28, "fashion": 28, "cifar10": 32}  # the datasets of one size; others default to 256
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CELEBA_URL = ("https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (img_align_celeba.zip; on Kaggle: "
              "jessicali9530/celeba-dataset)")


# ------------------------------------------------------------------------------------------- model
def patchify(x, p, s):
    """(B, C, H, W) -> (B, T, C*p*p): p x p windows every s pixels (s < p overlaps). F.unfold(x, p, stride=s)
    transposed (a test checks it), as strided views: F.unfold's CPU kernel is ~100x slower here."""
    windows = x.unfold(2, p, s).unfold(3, p, s)  # (B, C, n, n, p, p)
    return windows.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


def unpatchify(tokens, res, p, s):
    """Inverse of patchify: overlapping windows are summed by fold, then divided by how many windows cover
    each pixel (the fold of ones), so overlaps average instead of brightening and no pixel is dropped."""
    cols = tokens.transpose(1, 2)
    return F.fold(cols, res, p, stride=s) / F.fold(torch.ones_like(cols[:1]), res, p, stride=s)


def check_grid(res, p, s):
    """Every pixel must be covered: windows start at 0, s, 2s, ... and the last must end exactly at res."""
    if s > p or res < p or (res - p) % s:
        lo = max(p, p + (res - p) // s * s)
        q = max(d for d in range(1, min(p, res) + 1) if res % d == 0)  # the largest non-overlapping patch
        raise common.UserError(f"--res {res} can't be tiled by {p}px patches every {s}px (needs stride <= "
                               f"patch and (res - patch) divisible by stride); use --res {lo} or {lo + s}, "
                               f"or --patch {q} --stride {q}")
    return (res - p) // s + 1


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in fp32 even under autocast, as the official code
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)


def rope_2d(n, head_dim, theta=10000.0):
    """cos, sin (T, head_dim/2) for an n x n grid: the first half of each head's channel pairs rotates with
    the row index, the second half with the column, so q.k depends on positions only through their offset."""
    freqs = theta ** (-torch.arange(head_dim // 4) / (head_dim // 4))
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate channel pairs (x1, x2) of (B, heads, T, head_dim) by the position's angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


def sincos_2d(n, dim):
    """Fixed 2D sin-cos absolute positions (n*n, dim), added on top of RoPE as in the official code."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    r, c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = RMSNorm(dim // heads), RMSNorm(dim // heads)

    def forward(self, x, cos, sin):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)  # QK-norm, RoPE
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
    """Pre-norm transformer block with adaLN: c sets shift/scale/gate of each branch (adaLN-Zero at init)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = RMSNorm(dim), SwiGLU(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

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
    """pred, noise_scale and t_eps tell generate() how to read the output and which noise the model was
    trained with (the official Denoiser holds them the same way)."""

    def __init__(self, res, channels, num_classes, depth, dim, heads, patch, stride, bottleneck, context,
                 pred, noise_scale, t_eps):
        super().__init__()
        self.res, self.channels, self.num_classes = res, channels, num_classes
        self.patch, self.stride = patch, stride
        self.context, self.context_start = context  # in-context class tokens: how many, from which block
        self.pred, self.noise_scale, self.t_eps = pred, noise_scale, t_eps
        n = check_grid(res, patch, stride)
        # bottleneck patch embedding p*p*C -> d' -> D (a pair of convolutions in the official code)
        self.embed = nn.Sequential(nn.Linear(channels * patch * patch, bottleneck, bias=False),
                                   nn.Linear(bottleneck, dim))
        self.register_buffer("pos", sincos_2d(n, dim), persistent=False)
        cos, sin = rope_2d(n, dim // heads)
        if self.context:  # class tokens are not rotated (angle 0)
            cos, sin = F.pad(cos, (0, 0, self.context, 0), value=1.0), F.pad(sin, (0, 0, self.context, 0))
            self.context_pos = nn.Parameter(torch.empty(1, self.context, dim))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)  # the last row: the null label (CFG, unconditional)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final_norm, self.final_ada = RMSNorm(dim), nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.head = nn.Linear(dim, channels * patch * patch)
        self.initialize_weights()

    def initialize_weights(self):
        """As the official code: xavier-uniform weights and zero biases on every Linear (its patch
        convolutions are initialised as Linears), N(0, 0.02) label and time embeddings and in-context
        positions, zero adaLN modulations and output head: each block starts as the identity, the output 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for weight in [self.y_embed.weight, self.t_embed[0].weight, self.t_embed[2].weight]:
            nn.init.normal_(weight, std=0.02)
        if self.context:
            nn.init.normal_(self.context_pos, std=0.02)
        for layer in [block.ada[1] for block in self.blocks] + [self.final_ada[1], self.head]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z, t, y):
        """z: (B, C, H, W) noisy images, t: (B,) times, y: (B,) labels (num_classes = null) -> the output
        image, read as x, v or e (to_velocity)."""
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


# ------------------------------------------------------------------------------------------ the method
def effective_t_mu(t_mu, res):
    """The paper's rule mu - ln(res/256) above 256 px: larger images keep more signal at a given t, so they
    get more noise. Below 256 px the rule would shift up (+1.4 at 28 px: t mostly near 0.8) and leave the
    noisy start of sampling, where a small image's class and layout are settled, rarely trained: no shift."""
    return t_mu - math.log(max(res, 256) / 256)


def sample_t(n, mu, sigma, device):
    return torch.sigmoid(torch.randn(n, device=device) * sigma + mu)  # logit-normal t


def to_velocity(out, z, t, pred, t_eps):
    """The output read as x, v or e, turned into v = x - e at (z_t, t) through z_t = t x + (1 - t) e; the
    divisor is clamped at t_eps so it stays finite at its end (x: t -> 1, e: t -> 0)."""
    t = t.view(-1, 1, 1, 1)
    if pred == "x":
        return (out - z) / (1 - t).clamp_min(t_eps)  # v = (x - z_t) / (1 - t)
    if pred == "eps":
        return (z - out) / t.clamp_min(t_eps)  # v = (z_t - e) / t
    return out


def flow_matching_loss(model, x, y, pred, mu, sigma, noise_scale, t_eps, label_dropout, null):
    """The v-loss for every pred: the target goes through the output's conversion (the official x-loss)."""
    y = torch.where(torch.rand(len(y), device=y.device) < label_dropout, null, y)  # dropped to null for CFG
    t = sample_t(len(x), mu, sigma, x.device)
    e = torch.randn_like(x) * noise_scale
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * e
    target = {"x": x, "v": x - e, "eps": e}[pred]
    return F.mse_loss(to_velocity(model(z, t, y), z, t, pred, t_eps), to_velocity(target, z, t, pred, t_eps))


def guided_velocity(model, z, t, y, w, interval, pred, t_eps):
    """CFG v = v_uncond + w (v_cond - v_uncond), cond and uncond in one batched forward, for lo < t < hi as
    the official sampler (lo = 0 takes t = 0 in too); elsewhere, or unconditional (y None), v_cond alone."""
    lo, hi = interval
    t32 = torch.tensor(t)  # compared in float32 as the official sampler: a grid point at lo is outside
    t_batch = torch.full((len(z),), t, device=z.device)
    if y is None or w == 1 or not (t32 < hi and (lo == 0 or t32 > lo)):
        y = torch.full_like(t_batch, model.num_classes, dtype=torch.long) if y is None else y
        return to_velocity(model(z, t_batch, y), z, t_batch, pred, t_eps)
    z2, t2 = torch.cat([z, z]), torch.cat([t_batch, t_batch])
    out = model(z2, t2, torch.cat([y, torch.full_like(y, model.num_classes)]))
    v_cond, v_uncond = to_velocity(out, z2, t2, pred, t_eps).chunk(2)
    return v_uncond + w * (v_cond - v_uncond)


def ode_solve(velocity, x, steps, solver, on_step=None):
    """Integrate dx/dt = velocity(x, t) from t=0 to 1: Heun on every interval but the last, where Euler avoids
    evaluating at t=1 (the official sampler: 2 * steps - 1 evaluations); or Euler throughout."""
    ts = torch.linspace(0, 1, steps + 1).tolist()
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = velocity(x, t)
        if solver == "heun" and i < steps - 1:
            v = (v + velocity(x + (t_next - t) * v, t_next)) / 2
        x = x + (t_next - t) * v
        if on_step is not None:
            on_step(x)
    return x


@torch.no_grad()
def generate(model, noise, y, cfg, steps, solver=SOLVER, interval=CFG_INTERVAL, precision="fp32",
             on_step=None):
    """Images in [-1, 1], on the model's device, from N(0, I) noise scaled by the model's noise_scale;
    y: labels or None."""
    device = next(model.parameters()).device
    noise, y = noise.to(device), None if y is None else y.to(device)
    velocity = lambda z, t: guided_velocity(model, z, t, y, cfg, interval, model.pred, model.t_eps)
    with common.autocast(device, precision):
        x = ode_solve(velocity, noise * model.noise_scale, steps, solver, on_step)
    return x.clamp(-1, 1)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * theta, for every parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


# ------------------------------------------------------------------------------ a model from its settings
def make_model(config, channels, num_classes):
    arch = dict(PRESETS[config["model"]], patch=config["patch"], stride=config["stride"])
    return JiT(config["res"], channels, num_classes, **arch, pred=config["pred"],
               noise_scale=config["noise_scale"], t_eps=config["t_eps"])


def load_model(path, device="cpu", ema=True):
    """A trained model (EMA weights by default) and its settings with the class names, e.g. in a notebook:
    model, config = load_model("runs/celeba_jit/last.pt"); generate(model, noise, labels, cfg=2, steps=49)"""
    ckpt = common.load_checkpoint(path, SCRIPT)
    config = dict(ckpt["config"], **ckpt["data"], epoch=ckpt["epoch"])
    model = make_model(config, config["channels"], len(config["classes"]))
    model.load_state_dict(ckpt["ema" if ema else "model"])
    return model.to(device).eval(), config


# ---------------------------------------------------------------------------------------- training
def loss_settings(args, null):
    """flow_matching_loss()'s settings from the command line."""
    return dict(pred=args.pred, mu=effective_t_mu(args.t_mu, args.res), sigma=args.t_sigma,
                noise_scale=args.noise_scale, t_eps=args.t_eps, label_dropout=args.label_dropout, null=null)


def train_step(net, opt, scaler, x, y, loss_kwargs, grad_clip, precision):
    """One AdamW step on the v-loss; net is the model opt updates, or its DDP or compiled wrapper."""
    with common.autocast(x.device, precision):
        loss = flow_matching_loss(net, x, y, **loss_kwargs)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def train(args, rank, world, device, precision, log):
    ckpt = common.load_checkpoint(args.resume, SCRIPT, vars(args), TRAINING_KEYS) if args.resume else None
    def lock_and_load():
        if rank == 0:
            common.lock_out(args.out)
        return load_data(args.dataset, args.data_dir, args.res, args.out, log)
    images, labels, classes = common.rank0_first(lock_and_load, rank, world)
    if args.batch_size > len(images):
        raise common.UserError(f"--batch-size {args.batch_size} is larger than the dataset ({len(images)} "
                               f"images); pass a smaller one")
    info = {"channels": int(images.shape[1]), "classes": classes}
    data, labels = to_device(images, device), None if labels is None else labels.to(device)
    sampling = sampling_settings(args, classes, precision, log)
    model = make_model(vars(args), info["channels"], len(classes)).to(device)
    null = len(classes)
    loss_kwargs = loss_settings(args, null)
    flip = args.dataset in FLIPPED and not args.no_flip
    log(f"JiT-{args.model}, {args.pred}-prediction: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, {check_grid(args.res, args.patch, args.stride) ** 2} tokens, {len(images)} images; "
        f"t-mu {loss_kwargs['mu']:.3g} at {args.res} px; {'random horizontal flips' if flip else 'no flips'}")
    steps_per_epoch = len(images) // args.batch_size
    if device.type == "cpu" and args.model in GPU_PRESETS and rank == 0:
        estimate_on_cpu(model, args.batch_size, args.epochs * steps_per_epoch, log)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    net = model
    if world > 1:  # DDP broadcasts rank 0's weights here
        ids = [device] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # after the broadcast: rank 0's weights on all
    net = torch.compile(net) if args.compile else net
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")
    scaler = common.grad_scaler(device, precision)
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    start_epoch, step, losses = 0, 0, []
    if ckpt:
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, losses = ckpt["epoch"], ckpt["step"], list(ckpt["losses"])
        common.set_rank_rng_state(ckpt["rng"], args.seed + 1000 * step)  # each rank continues its own stream
        log(f"resumed from {args.resume} at epoch {start_epoch}, step {step}")
    if start_epoch >= args.epochs:
        log(f"nothing to do: {args.resume} already has {start_epoch} epochs; pass a larger --epochs to go on")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    metrics = common.Metrics(metrics_path, fresh=not args.resume) if rank == 0 else None  # rank 0 writes
    local = args.batch_size // world
    progress = common.Progress(args.epochs * steps_per_epoch, step, prefix="step", enabled=rank == 0)
    pending = []  # losses of the last steps, kept on the device
    for epoch in range(start_epoch, args.epochs):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + epoch))
        epoch_start = time.time()
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size + rank * local:][:local].to(data.device)
            x = data[idx].to(device, non_blocking=True).float() / 127.5 - 1
            if flip:
                x = torch.where(torch.rand(local, 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            y = torch.full((local,), null, device=device) if labels is None else labels[idx]
            loss = train_step(net, opt, scaler, x, y, loss_kwargs, args.grad_clip, precision)
            sched.step()
            step += 1
            ema_update(ema, model, min(args.ema, (1 + step) / (args.ema_warmup + step)))
            pending.append(loss)
            if len(pending) == LOG_EVERY or i == steps_per_epoch - 1:  # averaged over the ranks
                group = torch.stack(pending).float()
                if world > 1:
                    dist.all_reduce(group)
                group = (group / world).tolist()
                bad = [v for v in group if not math.isfinite(v)]
                if bad:  # before a checkpoint of NaN weights is written
                    raise common.UserError(f"the loss became {bad[0]} by step {step} (epoch {epoch + 1}); "
                                           f"stopped without writing a checkpoint; try a lower --lr (now "
                                           f"{args.lr:g}), --grad-clip 1 or --precision fp32")
                losses.extend(group)
                progress.update(step, len(pending) * args.batch_size, epoch=f"{epoch + 1}/{args.epochs}",
                                loss=group[-1])
                if metrics:
                    metrics.log(step=step, epoch=epoch + 1, loss=sum(group) / len(group),
                                lr=opt.param_groups[0]["lr"])
                pending = []
        rng = common.all_rng_states()  # every rank takes part
        if rank == 0:
            common.save_checkpoint(os.path.join(args.out, "last.pt"), {
                "script": SCRIPT, "config": vars(args), "data": info, "model": model.state_dict(),
                "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step, "rng": rng,
                "losses": losses})
            seconds = time.time() - epoch_start
            metrics.log(epoch=epoch + 1, loss=sum(losses[-steps_per_epoch:]) / steps_per_epoch,
                        lr=opt.param_groups[0]["lr"], img_per_s=steps_per_epoch * args.batch_size / seconds,
                        seconds=seconds)
            every = max(1, (epoch + 1) // 10)  # at most about 10 epoch marks
            marks = [(e * steps_per_epoch, f"epoch {e}") for e in range(every, epoch + 2, every)]
            common.plot_curves(os.path.join(args.out, "loss.png"), {"v-loss": losses}, marks=marks,
                               title=f"JiT-{args.model}, {args.pred}-pred, {args.dataset}: v-loss per step")
            last = epoch + 1 == args.epochs
            if last or (epoch + 1) % args.sample_every == 0:
                title = figure_title(vars(args), sampling, epoch + 1)
                tag = "samples" if last else f"samples_epoch{epoch + 1:03d}"
                save_figures(ema, args.out, tag, classes, args.seed, sampling, title, gif=last)
    log(f"done: {args.out}/last.pt, samples.png, sampling.gif, loss.png, metrics.jsonl")
    if args.save_samples:
        write_samples(ema, args, classes, sampling, args.dataset, args.data_dir, log)


def estimate_on_cpu(model, batch_size, total_steps, log):
    """A GPU-sized recipe on a CPU: time 2 steps of 4 images on a copy (drawing no random numbers) and say how
    long the whole run would take."""
    log("timing 2 steps to estimate the run time...")
    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters())
    z, t = torch.zeros(4, probe.channels, probe.res, probe.res), torch.full((4,), 0.5)
    seconds = []
    for _ in range(3):  # the first warms up
        start = time.perf_counter()
        probe(z, t, torch.zeros(4, dtype=torch.long)).square().mean().backward()
        opt.step()
        seconds.append(time.perf_counter() - start)
    total = (seconds[1] + seconds[2]) / 8 * batch_size * total_steps
    log(f"this recipe ({total_steps:,} steps of {batch_size} images) would take about "
        f"{common.format_time(total)} on this CPU; for a CPU run use --model mnist with --dataset mnist or "
        f"fashion (minutes), or a GPU")


# ------------------------------------------------------------------------------------- figures and samples
def sampling_settings(args, classes, precision, log):
    """generate()'s settings from the command line; guidance needs a class-conditional model."""
    if args.cfg is not None and not classes:
        log("note: --cfg and --cfg-interval are ignored: this model is unconditional (no classes)")
    cfg = (CFG if args.cfg is None else args.cfg) if classes else 1.0
    return dict(cfg=cfg, steps=args.steps, solver=args.solver, interval=tuple(args.cfg_interval),
                precision=precision)


def figure_title(config, sampling, epoch):
    lo, hi = sampling["interval"]
    guidance = f"w={sampling['cfg']:g} for {lo:g} < t < {hi:g}" if sampling["cfg"] != 1 else "no guidance"
    return (f"JiT-{config['model']} patch {config['patch']}/{config['stride']} {config['pred']}-pred, "
            f"{config['dataset']}, epoch {epoch}: {guidance}, {sampling['solver']} {sampling['steps']} steps")


def save_figures(model, out, tag, classes, seed, sampling, title, gif=False):
    """Samples from fixed noise (one row per class, or an 8 x 8 grid) and the sampling path z_t as a GIF."""
    device = next(model.parameters()).device
    n = 8 * len(classes) if classes else 64
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, model.channels, model.res, model.res, generator=g)
    y = torch.arange(len(classes), device=device).repeat_interleave(8) if classes else None
    keep = slice(None, None, 8) if classes else slice(0, 8)  # the GIF shows one image per class (or 8 images)
    frames, done, progress = [], 0, common.Progress(sampling["steps"], prefix=f"{tag}.png: sampling step")

    def on_step(z):
        nonlocal done
        done += 1
        progress.update(done, n)
        if gif:
            frames.append(z[keep].float().cpu())
    x = generate(model, noise.to(device), y, **sampling, on_step=on_step)
    scale = max(1, 96 // model.res)
    common.save_grid(x, os.path.join(out, f"{tag}.png"), nrow=8, scale=scale, row_labels=classes or None,
                     title=title)
    if gif:  # about 20 frames at a smaller scale: noise compresses badly
        every = max(1, len(frames) // 20)
        frames = [noise[keep]] + frames[len(frames) - 1::-every][::-1]
        common.save_gif(frames, os.path.join(out, "sampling.gif"), nrow=len(classes) or 8,
                        scale=max(1, 64 // model.res), title=f"z_t, t = 0 to 1: {title}")
    return x


def sample_only(args, device, precision, log):
    """A checkpoint's EMA weights: a sample grid and the sampling GIF (rank 0), and with --save-samples
    an .npz of --num-samples images made by all ranks together."""
    model, config = load_model(args.sample, device)
    classes = config["classes"]
    sampling = sampling_settings(args, classes, precision, log)
    if common.rank_and_world()[0] == 0:
        title = figure_title(config, sampling, config["epoch"])
        save_figures(model, args.out, "samples", classes, args.seed, sampling, title, gif=True)
    if args.save_samples:
        write_samples(model, args, classes, sampling, config["dataset"], config["data_dir"], log)


def write_samples(model, args, classes, sampling, dataset, data_dir, log):
    """--save-samples: --num-samples samples by all ranks together; then the command that scores them."""
    path, n = args.save_samples, args.num_samples
    save_samples(model, path, n, args.batch_size, classes, args.seed, sampling)
    if dataset == "celeba":  # evaluate.py scores CelebA as a folder of images (FID)
        dataset, data_dir = "folder", find_celeba(data_dir)
    log(f"wrote {n} samples to {path}; evaluate them with: python evaluate.py {path} "
        f"--dataset {dataset} --data-dir {data_dir}")


def sample_noise(seed, j, shape):
    """The starting noise of sample j of an .npz, from its own generator: the file is the same for any
    --batch-size and number of ranks. torch's CPU generator keeps only the low 32 bits of a seed, so numpy's
    SeedSequence hashes (seed, j) into them (seed << 32 + j would give every --seed the same noise)."""
    state = np.random.SeedSequence([seed, j]).generate_state(1)[0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state)))


def save_samples(model, path, n, batch, classes, seed, sampling):
    """Chunk i of the n samples (classes in turn) is made by rank i % world, so any number of ranks writes the
    .npz of one process; rank 0 gathers and writes it (-1: unconditional)."""
    rank, world = common.rank_and_world()
    device = next(model.parameters()).device
    chunks, progress = {}, common.Progress(n, prefix="sampling", enabled=rank == 0)
    shape = (model.channels, model.res, model.res)
    for i, start in enumerate(range(0, n, batch)):
        b = min(batch, n - start)
        if i % world == rank:
            noise = torch.stack([sample_noise(seed, j, shape) for j in range(start, start + b)]).to(device)
            y = torch.arange(start, start + b, device=device) % len(classes) if classes else None
            chunks[i] = common.to_uint8(generate(model, noise, y, **sampling)).numpy()
            progress.update(min(n, (i + world) * batch), b * world)  # all ranks' work, as rank 0 sees it
    images = common.gather_chunks(chunks)
    if rank == 0:
        labels = np.arange(n) % len(classes) if classes else np.full(n, -1)
        # uint8 as made: save_samples_npz's float round trip would need 4x the memory at 50k x 256 px
        common.atomic_write(path, lambda tmp: np.savez(tmp, images=images, labels=labels.astype(np.int64)))


# -------------------------------------------------------------------------------------------- data
def load_data(dataset, data_dir, res, out, log):
    """(images uint8 N x C x H x W as a numpy array or tensor, labels int64 or None, class names)."""
    if dataset in ("mnist", "fashion", "cifar10"):
        images, labels = common.load_dataset(dataset, data_dir, train=True)
        return images, labels, common.CLASS_NAMES[dataset]
    folder = find_celeba(data_dir) if dataset == "celeba" else data_dir
    images, _ = load_folder(folder, res, 178 if dataset == "celeba" else None, out, log)
    return images, None, []


def find_celeba(data_dir):
    """The folder of CelebA jpgs: DATA, DATA/img_align_celeba or torchvision's DATA/celeba/img_align_celeba,
    downloaded by torchvision when none is there (its Google Drive link often hits a quota)."""
    for folder in (data_dir, os.path.join(data_dir, "img_align_celeba"),
                   os.path.join(data_dir, "celeba", "img_align_celeba")):
        if os.path.isdir(folder) and any(f.lower().endswith(IMAGE_EXTS) for f in os.listdir(folder)):
            return folder
    try:
        import torchvision
        torchvision.datasets.CelebA(data_dir, split="all", download=True)
    except Exception as e:
        raise common.UserError(f"CelebA is not in {data_dir} and torchvision's Google Drive download failed "
                               f"({type(e).__name__}); get img_align_celeba from {CELEBA_URL}, unzip it and "
                               f"pass --data-dir path/to/img_align_celeba")
    return os.path.join(data_dir, "celeba", "img_align_celeba")


def load_image(path, res, crop):
    """Centre square crop (CelebA: 178, the face in the 178x218 aligned images), resized: uint8 CHW RGB."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
        side = min(img.width, img.height, crop or img.width)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((res, res), Image.BICUBIC)
    except Exception as e:  # any decoder failure, PIL's DecompressionBombError included
        raise common.UserError(f"{path} is not a readable image ({type(e).__name__}: {e}); remove it from "
                               f"the folder and run again")
    return np.asarray(img).transpose(2, 0, 1)


def load_folder(folder, res, crop, out_dir, log):
    """Decode and resize every image once into a uint8 .npy cache next to the data (in the out dir when the
    data folder is read-only), named by a hash of the file list (names, sizes, times); later runs read it."""
    if not os.path.isdir(folder):
        raise common.UserError(f"data folder {folder} does not exist; pass --data-dir DIR with your images")
    names = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    files = [f for f in names if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(folder, f))]
    if not files:
        raise common.UserError(f"no images (.jpg/.png/...) in {folder}; pass --data-dir DIR with your images")
    if len(files) < len(names):
        log(f"skipping {len(names) - len(files)} entries of {folder} that are not image files")
    stats = [os.stat(os.path.join(folder, f)) for f in files]  # a replaced image (size, time): a new cache
    listing = repr([(f, s.st_size, s.st_mtime) for f, s in zip(files, stats)] + [res, crop])
    key = hashlib.sha1(listing.encode()).hexdigest()[:12]
    cache_dir = folder if os.access(folder, os.W_OK) else out_dir
    prefix = f".{SCRIPT}-cache-"
    for name in os.listdir(cache_dir):  # temps of killed cache builds (SIGKILL skips every cleanup)
        match = common.TEMP.search(name)
        if name.startswith(prefix) and match and not common.pid_alive(int(match.group(1))):
            os.remove(os.path.join(cache_dir, name))
    cache = os.path.join(cache_dir, f"{prefix}{res}px-{key}.npy")
    shape = (len(files), 3, res, res)
    if os.path.isfile(cache):
        try:  # copy-on-write: writable for torch (no NumPy warning), never written back to the file
            images = np.load(cache, mmap_mode="c")
            if images.shape == shape and images.dtype == np.uint8:
                return images, cache
        except (EOFError, ValueError, OSError):
            pass
        log(f"the cache {cache} is unreadable (truncated?); rebuilding it")
    log(f"decoding {len(files)} images of {folder} at {res} px into {cache} (once)")

    def write(tmp):
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        pool = ThreadPoolExecutor(os.cpu_count())  # PIL releases the GIL while decoding
        try:
            paths = [os.path.join(folder, f) for f in files]
            for i, image in enumerate(pool.map(lambda path: load_image(path, res, crop), paths)):
                arr[i] = image
        finally:
            pool.shutdown(cancel_futures=True)  # an error or Ctrl-C does not wait for the remaining images
        arr.flush()
    common.atomic_write(cache, write)  # the temp goes on every exit path
    return np.load(cache, mmap_mode="c"), cache


def to_device(images, device):
    """The whole uint8 set on the device when it fits in a third of its free memory; batches gather there."""
    if device.type == "cuda" and images.nbytes < torch.cuda.mem_get_info(device)[0] / 3:
        out = torch.empty(images.shape, dtype=torch.uint8, device=device)
        for i in range(0, len(images), 4096):  # chunks, so a memory-mapped cache never sits in RAM whole
            out[i:i + 4096] = torch.as_tensor(np.asarray(images[i:i + 4096])).to(device)
        return out
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(images)  # paged in on use


# --------------------------------------------------------------------------------------- benchmark
# dense bf16 tensor-core peaks in TFLOP/s; --peak-tflops overrides
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362), ("L4", 121),
               ("A10", 125), ("RTX 4090", 165)]


def macs_per_image(res, channels, arch):
    """Multiply-adds of one forward pass from the architecture (the papers' "GFLOPs": 25G for JiT-B/16)."""
    dim, hidden, token = arch["dim"], int(2 / 3 * 4 * arch["dim"]), channels * arch["patch"] ** 2
    n_img = check_grid(res, arch["patch"], arch["stride"]) ** 2
    per_token = 4 * dim * dim + 3 * dim * hidden  # qkv and projection; SwiGLU
    tokens = [n_img + (arch["context"][0] if i >= arch["context"][1] else 0) for i in range(arch["depth"])]
    embed_and_head = n_img * (token * arch["bottleneck"] + arch["bottleneck"] * dim + dim * token)
    return sum(n * per_token + 2 * n * n * dim for n in tokens) + embed_and_head


def benchmark(args, device, precision, log):
    """Training img/s (forward + backward + AdamW) eager, then compiled; sampling img/s; MFU; random data."""
    channels = 1 if args.dataset in ("mnist", "fashion") else 3
    classes = common.CLASS_NAMES.get(args.dataset, [])
    model = make_model(vars(args), channels, len(classes)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    scaler = common.grad_scaler(device, precision)
    x = torch.randn(args.batch_size, channels, args.res, args.res, device=device).clamp(-1, 1)
    y = torch.randint(0, len(classes) + 1, (args.batch_size,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(fn, reps):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - start) / reps

    loss_kwargs = loss_settings(args, len(classes))
    step = lambda net: train_step(net, opt, scaler, x, y, loss_kwargs, args.grad_clip, precision)
    seconds(lambda: step(model), 1)  # warm-up
    eager = args.batch_size / seconds(lambda: step(model), 10)
    log("compiling the network (torch.compile)...")
    compiled = torch.compile(model)
    compile_s = seconds(lambda: step(compiled), 1)  # the first call compiles
    fast = args.batch_size / seconds(lambda: step(compiled), 10)
    sampling = sampling_settings(args, classes, precision, log)
    labels = y % len(classes) if classes else None
    sample = args.batch_size / seconds(lambda: generate(model, torch.randn_like(x), labels, **sampling), 1)
    macs = macs_per_image(args.res, channels, dict(PRESETS[args.model], patch=args.patch, stride=args.stride))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((p for k, p in PEAK_TFLOPS if k in name and device.type == "cuda"), None)
    achieved = max(eager, fast) * 3 * 2 * macs / 1e12  # forward + backward = 3 forwards; 2 FLOPs per MAC
    mfu = f"MFU {100 * achieved / peak:.1f}% of {peak} TFLOP/s" if peak else "MFU unknown (--peak-tflops)"
    log(f"benchmark JiT-{args.model} {args.res}px {precision} on {name}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {macs / 1e9:.3g} GMACs/img | train "
        f"eager {eager:.1f} img/s, compiled {fast:.1f} img/s after {compile_s:.0f} s of compiling "
        f"({achieved:.2f} TFLOP/s, {mfu}) | sample {sample:.2f} img/s ({sampling['solver']} "
        f"{sampling['steps']} steps, w {sampling['cfg']:g})")


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    presets = []
    for name, q in PRESETS.items():
        context = f", {q['context'][0]} class tokens from block {q['context'][1]}" if q["context"][0] else ""
        presets.append(f"{name}: {q['depth']} x {q['dim']}, {q['heads']} heads, patch {q['patch']} stride "
                       f"{q['stride']}, bottleneck {q['bottleneck']}, lr {LR[name]:g}{context}")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("--dataset", choices=["celeba", "folder", "mnist", "fashion", "cifar10"], default="celeba",
        help="celeba: CelebA jpgs (centre crop 178); folder: any images, unconditional; mnist, fashion "
             "(Fashion-MNIST) and cifar10: class-conditional with CFG")
    add("--data-dir", default="data", help="the image folder (celeba/folder) or the torchvision root")
    add("--res", type=int, help="training resolution (default: 256; mnist and fashion 28, cifar10 32)")
    add("--model", choices=list(PRESETS), default="blog", help="architecture preset; " + "; ".join(presets))
    add("--patch", type=int, help="patch size p (default: the preset's)")
    add("--stride", type=int, help="patch stride s <= p; s < p overlaps (default: the preset's)")
    add("--pred", choices=["x", "v", "eps"], default="x",
        help="the network predicts the clean image (the paper), the velocity (the usual flow-matching "
             "transformer) or the noise; the loss is on v for all three")
    add("--epochs", type=int, default=100, help="training epochs, as the blog on CelebA")
    add("--batch-size", type=int, default=128, help="global batch size, split over DDP ranks")
    add("--lr", type=float, help="AdamW learning rate, betas (0.9, 0.95), no decay (default: the preset's)")
    add("--warmup-epochs", type=float, default=5, help="linear learning-rate warm-up, as the official code")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm, as the blog (0: off)")
    add("--ema", type=float, default=0.9999, help="EMA decay of the weights used for sampling (official)")
    add("--ema-warmup", type=float, default=10, metavar="K",
        help="the EMA decay at step s is min(--ema, (1 + s) / (K + s)); in a run of fewer than 10,000 K "
             "steps this decides the EMA: it reaches back about the last 1/K of the steps (10: the usual "
             "warm-up; the CPU preset's 22 measured better there, README)")
    add("--label-dropout", type=float, default=0.1, help="probability of the null label (for CFG)")
    add("--no-flip", action="store_true",
        help="no random horizontal flips (default: flips for celeba, folder and cifar10, as official)")
    add("--noise-scale", type=float, default=1.0,
        help="e = noise_scale * N(0, I). The official code sets 2 at 512 px instead of shifting t; the "
             "--t-mu shift above 256 px already gives that signal-to-noise ratio: don't use both")
    add("--t-mu", type=float,
        help="mean of logit(t) (default: -0.8, the paper's, for celeba and folder; 0 for the 28-32 px "
             "mnist, fashion and cifar10, measured best there). Above 256 px it is shifted by -ln(res/256) "
             "(the paper's rule; -ln 2 at 512 px equals --noise-scale 2); never shifted up below 256 px; "
             "the value used is printed at start")
    add("--t-sigma", type=float, default=0.8, help="std of logit(t)")
    add("--t-eps", type=float, default=0.05,
        help="clamp of the divisor 1 - t (--pred x) or t (--pred eps) when the output becomes v")
    add("--steps", type=int, default=50, help="sampler steps (Heun: 2 * steps - 1 network calls)")
    add("--solver", choices=["heun", "euler"], default=SOLVER, help="ODE solver for sampling")
    add("--cfg", type=float,
        help=f"classifier-free guidance scale w (default: {CFG:g}, JiT-B's; 1: off; class-conditional only)")
    add("--cfg-interval", type=float, nargs=2, default=list(CFG_INTERVAL), metavar=("LO", "HI"),
        help="guide only for LO < t < HI, as the official sampler (LO = 0 includes t = 0; the CPU preset's "
             "0.2 0.9 measured better on Fashion-MNIST, README)")
    add("--sample-every", type=int, default=1, help="write a sample grid every this many epochs")
    add("--out", default=os.path.join("runs", SCRIPT), help="output folder")
    add("--resume", metavar="CKPT", help="continue training from this checkpoint (runs/celeba_jit/last.pt)")
    add("--overwrite", action="store_true", help="start afresh in an --out that holds a checkpoint")
    add("--sample", metavar="CKPT", help="only sample from this checkpoint (EMA weights); no data needed")
    add("--save-samples", metavar="FILE.npz",
        help="after training (or with --sample) write --num-samples samples to this .npz for evaluate.py "
             "(split over torchrun ranks)")
    add("--num-samples", type=int, default=1000, help="number of samples for --save-samples")
    add("--benchmark", action="store_true",
        help="print training img/s (eager and compiled), sampling img/s and MFU on random data, then exit")
    add("--peak-tflops", type=float, help="the device's peak TFLOP/s for the MFU (default: known GPUs)")
    add("--compile", action="store_true", help="torch.compile the network for training")
    add("--precision", choices=common.PRECISIONS, default="auto",
        help="auto: bf16 on GPUs of compute capability >= 8.0, fp16 with a gradient scaler on older GPUs, "
             "fp32 on a CPU; weights and checkpoints stay fp32")
    add("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    add("--seed", type=int, default=0, help="random seed, also of the fixed sample noise")
    first = p.parse_args(argv)  # --model and --dataset decide the defaults of five flags
    native = NATIVE_RES.get(first.dataset)
    preset = PRESETS[first.model]
    # at 28 px on Fashion-MNIST, 3 epochs: FD 14.1 at t-mu 0, 19.9 at the paper's -0.8, 113.7 at its +1.41
    p.set_defaults(patch=preset["patch"], stride=preset["stride"], lr=LR[first.model], res=native or 256,
                   t_mu=0.0 if native else -0.8)
    return p.parse_args(argv)


def validate(args):
    """Refuse impossible settings before anything is written; args is read-only from here on."""
    common.check_finite(args)
    common.check_seed(args)
    common.check_range(args, "num_samples", 1, 1_000_000)
    native = NATIVE_RES.get(args.dataset)
    if native and args.res != native:
        raise common.UserError(f"{args.dataset} images are {native} px; drop --res or pass --res {native}")
    common.check_positive(args, "res", "patch", "stride", "epochs", "batch_size", "lr", "steps",
                          "sample_every", "noise_scale", "t_sigma", "t_eps", "peak_tflops")
    common.check_range(args, "res", 1, 4096)
    common.check_range(args, "steps", 1, 10_000)
    if not 0 <= args.label_dropout < 1 or not 0 < args.ema < 1 or not args.t_eps < 1 or args.ema_warmup < 1:
        raise common.UserError("need 0 <= --label-dropout < 1, 0 < --ema < 1, --ema-warmup >= 1 and "
                               "--t-eps < 1")
    if args.warmup_epochs < 0 or args.grad_clip < 0 or (args.cfg or 0) < 0:
        raise common.UserError("--warmup-epochs, --grad-clip and --cfg can't be negative")
    if not 0 <= args.cfg_interval[0] < args.cfg_interval[1] <= 1:
        raise common.UserError(f"--cfg-interval {args.cfg_interval[0]} {args.cfg_interval[1]} must satisfy "
                               f"0 <= LO < HI <= 1")
    if args.save_samples and not args.save_samples.endswith(".npz"):
        raise common.UserError(f"--save-samples {args.save_samples}: pass a file name ending in .npz")
    if args.save_samples:
        common.check_output_file(args.save_samples, "--save-samples", out=args.out)
    if args.no_flip and args.dataset not in FLIPPED:
        raise common.UserError(f"--no-flip: {args.dataset} images are never flipped; drop --no-flip")
    if args.resume and args.sample:
        raise common.UserError("pass either --resume (continue training) or --sample (only sample), not both")
    if not args.sample:  # --sample takes the architecture from the checkpoint
        check_grid(args.res, args.patch, args.stride)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if not (args.sample or args.benchmark) and args.batch_size % world:
        raise common.UserError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    return args


def main(argv=None):
    args = validate(parse_args(argv))
    rank, world, device = common.setup_ddp(args.device)
    common.seed_everything(args.seed + rank)
    log = (lambda msg: print(f"[{SCRIPT}] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    precision = common.precision_for(args.precision, device, log)
    if args.benchmark:
        return benchmark(args, device, precision, log)
    common.prepare_out(args.out)  # on every rank: a bad --out stops all of them, none waits for the others
    if args.sample:
        return sample_only(args, device, precision, log)
    common.check_fresh_run(os.path.join(args.out, "last.pt"), args.resume, args.overwrite, SCRIPT)
    train(args, rank, world, device, precision, log)


if __name__ == "__main__":
    common.run(main)
