"""JiT ("Back to Basics: Let Denoising Generative Models Denoise", Li & He 2025): a plain transformer on pixel
patches trained by flow matching; unconditional on CelebA or any image folder, class-conditional with
classifier-free guidance (CFG) on MNIST, Fashion-MNIST and CIFAR-10. Sources: moomou, "Building Flow Matching
Models from Scratch" (CelebA 256 px, 16 px patches every 12 px), the official JiT code (LTH14/JiT) and
N. Day, "Generating images with Flow Matching" (a transformer on MNIST that predicts the velocity: --pred v).

Conventions: t=0 is noise, t=1 is data; z_t = t x + (1-t) e with e = noise_scale * N(0, I); the velocity is
v = x - e. The network's output is read as the clean image x (--pred x, the paper), as v or as e, and turned
into v at (z_t, t); the loss is the MSE of velocities for every --pred. CFG: v = v_uncond + w (v_cond -
v_uncond) inside --cfg-interval. Images are in [-1, 1] inside the model.

    python celeba_jit.py --dataset celeba --data-dir ~/data/img_align_celeba    # the blog's run (a GPU)
    python celeba_jit.py --quick --dataset fashion --save-samples s.npz       # the CPU recipe (see --quick)
    torchrun --nproc_per_node=8 celeba_jit.py --dataset celeba --model B --data-dir ~/data/img_align_celeba
In a notebook:
    model, config = load_model("runs/celeba_jit/last.pt")
    images = generate(model, torch.randn(10, 1, 28, 28), torch.arange(10), cfg=2.0, steps=49)
"""
import argparse
import copy
import functools
import hashlib
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "celeba_jit"
# depth x dim, heads, patch p and stride s (s < p overlaps), bottleneck of the patch embedding, in-context
# class tokens (how many, from which block). "blog": the write-up's 12 x 768 p=16 s=12 model; "B": JiT-B/16.
PRESETS = {
    "tiny": dict(depth=2, dim=32, heads=2, patch=4, stride=3, bottleneck=16, context=(0, 0)),
    # the CPU recipe's: its 64-wide bottleneck passes all 49 numbers of a 7 x 7 grey patch
    "mnist": dict(depth=4, dim=128, heads=4, patch=7, stride=7, bottleneck=64, context=(0, 0)),
    "blog": dict(depth=12, dim=768, heads=12, patch=16, stride=12, bottleneck=128, context=(0, 0)),
    "B": dict(depth=12, dim=768, heads=12, patch=16, stride=16, bottleneck=128, context=(32, 4)),
}
LR = {"tiny": 1e-3, "mnist": 1e-3, "blog": 1e-4, "B": 2e-4}  # AdamW learning rate per preset
GPU_PRESETS = ("blog", "B")  # on a CPU, these first say how long the run would take
FLIPPED = ("celeba", "folder", "cifar10")  # as the official training; a mirrored digit is no digit
NATIVE_RES = {"mnist": 28, "fashion": 28, "cifar10": 32}  # the datasets of one size; others default to 256
CFG = 3.0  # our default w; the official JiT-B/16 command samples with w = 2.9 in the same interval
CFG_INTERVAL = (0.1, 1.0)  # the official JiT-B/16 command's
# --quick, the CPU recipe: the mnist preset, a short warm-up, an EMA of about the last 1/22 of the steps,
# and 10 Heun steps (19 network calls instead of 99; the steps-and-solver curve is in docs/celeba_jit.md)
QUICK = dict(model="mnist", epochs=8, batch_size=64, warmup_epochs=0.5, ema_warmup=22, cfg=3.5,
             cfg_interval=[0.2, 0.9], compile=True, steps=10)
# --resume must continue the same run: all but --epochs (and sampling, output and device flags) must agree
TRAINING_KEYS = ("dataset", "model", "res", "patch", "stride", "pred", "noise_scale", "t_eps", "batch_size",
                 "lr", "warmup_epochs", "grad_clip", "ema", "ema_warmup", "label_dropout", "t_mu", "t_sigma",
                 "no_flip", "seed")


# ------------------------------------------------------------------------------------------ the method
def effective_t_mu(t_mu, res):
    """mu - ln(res/256) above 256 px (the paper's); not shifted up, so small images still see much noise."""
    return t_mu - math.log(max(res, 256) / 256)


def sample_t(n, mu, sigma, device):
    return torch.sigmoid(torch.randn(n, device=device) * sigma + mu)  # logit-normal t


def to_velocity(out, z_t, t, pred, t_eps):
    """The output read as x, v or e, turned into v = x - e through z_t = t x + (1 - t) e; the divisor is
    clamped at t_eps, so it stays finite at its end (x: t -> 1, e: t -> 0)."""
    t = t.view(-1, 1, 1, 1)
    if pred == "x":
        return (out - z_t) / (1 - t).clamp_min(t_eps)
    if pred == "eps":
        return (z_t - out) / t.clamp_min(t_eps)
    return out


def flow_matching_loss(model, x, y, pred, mu, sigma, noise_scale, t_eps, label_dropout, null):
    """The v-loss for every pred: the target goes through the output's conversion (the official x-loss)."""
    y = torch.where(torch.rand(len(y), device=y.device) < label_dropout, null, y)  # dropped to null for CFG
    t = sample_t(len(x), mu, sigma, x.device)
    e = torch.randn_like(x) * noise_scale
    z_t = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * e
    target = {"x": x, "v": x - e, "eps": e}[pred]
    v_pred = to_velocity(model(z_t, t, y), z_t, t, pred, t_eps)
    return F.mse_loss(v_pred, to_velocity(target, z_t, t, pred, t_eps))


def guided_velocity(model, z_t, t, y, w, interval, pred, t_eps):
    """CFG v = v_uncond + w (v_cond - v_uncond), cond and uncond in one batched forward, for lo < t < hi as
    the official sampler (lo = 0 takes t = 0 in too); elsewhere, or unconditional (y None), v_cond alone."""
    lo, hi = interval
    t32 = torch.tensor(t)  # compared in float32 as the official sampler: a grid point at lo is outside
    t_batch = torch.full((len(z_t),), t, device=z_t.device)
    if y is None or w == 1 or not (t32 < hi and (lo == 0 or t32 > lo)):
        y = torch.full_like(t_batch, model.num_classes, dtype=torch.long) if y is None else y
        return to_velocity(model(z_t, t_batch, y), z_t, t_batch, pred, t_eps)
    z2 = torch.cat([z_t, z_t])
    t2 = torch.cat([t_batch, t_batch])
    out = model(z2, t2, torch.cat([y, torch.full_like(y, model.num_classes)]))
    v_cond, v_uncond = to_velocity(out, z2, t2, pred, t_eps).chunk(2)
    return v_uncond + w * (v_cond - v_uncond)


def ode_solve(velocity, x, steps, solver, on_step=None):
    """Integrate dx/dt = velocity(x, t) from t=0 to 1: Heun on every interval but the last, where Euler avoids
    evaluating at t=1 (the official sampler: 2 * steps - 1 evaluations); or Euler throughout."""
    ts = torch.linspace(0, 1, steps + 1).tolist()
    for i in range(steps):
        h = ts[i + 1] - ts[i]
        v = velocity(x, ts[i])
        if solver == "heun" and i < steps - 1:
            v = (v + velocity(x + h * v, ts[i + 1])) / 2
        x = x + h * v
        if on_step is not None:
            on_step(x)
    return x


@torch.no_grad()
def generate(model, noise, y, cfg, steps, solver="heun", interval=CFG_INTERVAL, precision="fp32",
             on_step=None):
    """Images in [-1, 1] from N(0, I) noise (times model.noise_scale), labels y (None: unconditional)."""
    device = next(model.parameters()).device
    y = None if y is None else y.to(device)
    velocity = lambda z_t, t: guided_velocity(model, z_t, t, y, cfg, interval, model.pred, model.t_eps)
    with common.autocast(device, precision):
        x = ode_solve(velocity, noise.to(device) * model.noise_scale, steps, solver, on_step)
    return x.clamp(-1, 1)


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)  # e <- decay * e + (1 - decay) * p


# ------------------------------------------------------------------------------------------- network
def patchify(x, p, s):
    """(B, C, H, W) -> (B, T, C*p*p): F.unfold(x, p, stride=s) transposed, as faster strided views."""
    windows = x.unfold(2, p, s).unfold(3, p, s)  # (B, C, n, n, p, p)
    return windows.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)


def unpatchify(tokens, res, p, s):
    """Inverse of patchify: fold sums overlapping windows; dividing by their count averages them."""
    cols = tokens.transpose(1, 2)
    return F.fold(cols, res, p, stride=s) / F.fold(torch.ones_like(cols[:1]), res, p, stride=s)


def check_grid(res, p, s):
    """Windows per side; every pixel must be covered, so the last window ends exactly at res."""
    if s > p or res < p or (res - p) % s:
        fits = max(p, p + (res - p) // s * s)
        raise common.UserError(f"--res {res} can't be tiled by {p}px patches every {s}px; use --res {fits} "
                               f"or {fits + s}, or other --patch and --stride")
    return (res - p) // s + 1


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in fp32 even under autocast, as the official code
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), 1e-6).to(x.dtype)


def rope_2d(n, head_dim, theta=10000.0):
    """cos, sin (T, head_dim/2) of an n x n grid: half the pairs turn with the row, half the column."""
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
    r = rows.reshape(-1, 1) * omega
    c = cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)


class Block(nn.Module):
    """Pre-norm attention (QK-norm, 2D RoPE) and SwiGLU MLP; c sets each branch's shift, scale and gate."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.norm2 = RMSNorm(dim)
        hidden = int(2 / 3 * 4 * dim)  # SwiGLU with the parameters of a 4x GELU MLP
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        x = x + gate1 * self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        a, b = self.w12(self.norm2(x) * (1 + scale2) + shift2).chunk(2, dim=-1)
        return x + gate2 * self.w3(F.silu(a) * b)


def timestep_embedding(t, dim=256, max_period=10000.0):
    """Sinusoids of t in [0, 1] (the official code feeds t unscaled), as in DiT."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class JiT(nn.Module):
    """Its pred, noise_scale and t_eps tell generate() how to read the output (as the official Denoiser)."""

    def __init__(self, res, channels, num_classes, depth, dim, heads, patch, stride, bottleneck, context,
                 pred, noise_scale, t_eps):
        super().__init__()
        self.res = res
        self.channels = channels
        self.num_classes = num_classes
        self.patch = patch
        self.stride = stride
        self.pred = pred
        self.noise_scale = noise_scale
        self.t_eps = t_eps
        self.context, self.context_start = context  # in-context class tokens: how many, from which block
        n = check_grid(res, patch, stride)
        # bottleneck patch embedding p*p*C -> d' -> D (a pair of convolutions in the official code)
        self.embed = nn.Sequential(nn.Linear(channels * patch * patch, bottleneck, bias=False),
                                   nn.Linear(bottleneck, dim))
        self.register_buffer("pos", sincos_2d(n, dim), persistent=False)
        cos, sin = rope_2d(n, dim // heads)
        if self.context:  # the class tokens are not rotated (angle 0)
            cos = F.pad(cos, (0, 0, self.context, 0), value=1.0)
            sin = F.pad(sin, (0, 0, self.context, 0))
            self.context_pos = nn.Parameter(torch.empty(1, self.context, dim))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)  # the last row: the null label (CFG, unconditional)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final_norm = RMSNorm(dim)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.head = nn.Linear(dim, channels * patch * patch)
        # the official init; adaLN-Zero: zero modulations and head, so each block starts as the identity
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

    def forward(self, z_t, t, y):
        """z_t (B, C, H, W), t (B,), labels y (B,) (num_classes: null) -> the output, read as x, v or e."""
        x = self.embed(patchify(z_t, self.patch, self.stride)) + self.pos
        n_img = x.shape[1]
        y_emb = self.y_embed(y)
        c = self.t_embed(timestep_embedding(t)) + y_emb
        cos, sin = self.cos[-n_img:], self.sin[-n_img:]
        for i, block in enumerate(self.blocks):
            if self.context and i == self.context_start:  # the class tokens join the sequence here
                x = torch.cat([y_emb[:, None] + self.context_pos, x], dim=1)
                cos, sin = self.cos, self.sin
            x = block(x, c, cos, sin)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        x = self.head(self.final_norm(x[:, -n_img:]) * (1 + scale) + shift)
        return unpatchify(x.float(), self.res, self.patch, self.stride)


def make_model(config):
    arch = dict(PRESETS[config["model"]], patch=config["patch"], stride=config["stride"])
    channels = 1 if config["dataset"] in ("mnist", "fashion") else 3
    return JiT(config["res"], channels, len(common.CLASS_NAMES.get(config["dataset"], [])), **arch,
               pred=config["pred"], noise_scale=config["noise_scale"], t_eps=config["t_eps"])


def load_model(path, device="cpu", ema=True):
    """A trained model (the EMA weights unless ema=False) in eval mode, and the flags it was trained with."""
    ckpt = common.load_checkpoint(path, SCRIPT)
    model = make_model(ckpt["config"])
    common.load_state(model, ckpt["ema" if ema else "model"], f"the weights of {path}")
    return model.to(device).eval(), dict(ckpt["config"], epoch=ckpt["epoch"])


# ---------------------------------------------------------------------------------------- training
def log(message):
    if common.rank_and_world()[0] == 0:  # rank 0 speaks for the job
        print(message, flush=True)


def loss_settings(args):
    return dict(pred=args.pred, mu=effective_t_mu(args.t_mu, args.res), sigma=args.t_sigma,
                noise_scale=args.noise_scale, t_eps=args.t_eps, label_dropout=args.label_dropout,
                null=len(common.CLASS_NAMES.get(args.dataset, [])))


def train_step(model, opt, scaler, x, y, loss_kwargs, grad_clip, precision):
    with common.autocast(x.device, precision):
        loss = flow_matching_loss(model, x, y, **loss_kwargs)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # clip the true gradients (the scaler is a pass-through unless fp16)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss


def train(args, device, precision):
    rank, world = common.rank_and_world()
    sampling = sampling_settings(args, len(common.CLASS_NAMES.get(args.dataset, [])), precision)
    run = common.Run(SCRIPT, args, TRAINING_KEYS, log_every=20)  # a GPU sync every 20 steps
    images, labels = run.load(lambda: load_data(args.dataset, args.data_dir, args.res, args.out))
    if device.type == "cuda" and images.nbytes < torch.cuda.mem_get_info(device)[0] / 3:
        images = images.to(device)  # the whole uint8 set on the GPU when it fits in a third of its memory
    labels = labels.to(images.device)
    flip = args.dataset in FLIPPED and not args.no_flip
    steps_per_epoch = len(images) // args.batch_size  # no last partial batch: every step sees a full batch
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))
    if warmup > args.epochs * steps_per_epoch:
        log(f"note: --warmup-epochs {args.warmup_epochs:g} is longer than the run: the LR never reaches --lr")
    if args.ema_warmup > args.epochs * steps_per_epoch:
        log(f"note: --ema-warmup {args.ema_warmup:g} is longer than the run: the EMA stays near the weights")

    torch.manual_seed(args.seed + rank)  # each rank its own noise, times and label drops
    net = make_model(vars(args)).to(device)
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net  # broadcasts rank 0's weights
    ema = copy.deepcopy(net).requires_grad_(False).eval()  # after DDP's broadcast: all EMAs = rank 0's
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    scaler = common.grad_scaler(device, precision)
    run.restore(model=net, ema=ema, optimizer=opt, scheduler=sched, scaler=scaler)
    model = torch.compile(model) if args.compile else model
    loss_kwargs = loss_settings(args)
    log(f"JiT-{args.model}, {args.pred}-prediction: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
        f"parameters, {len(images)} images; t-mu {loss_kwargs['mu']:.3g} at {args.res} px; flips: {flip}")
    if rank == 0 and device.type == "cpu" and args.model in GPU_PRESETS:
        trial = copy.deepcopy(net)
        x = images[:args.batch_size // world].float() / 127.5 - 1
        probe = functools.partial(train_step, trial, torch.optim.AdamW(trial.parameters()), scaler, x,
                                  labels[:len(x)], loss_kwargs, args.grad_clip, precision)
        common.estimate_time(probe, (args.epochs - run.epoch) * steps_per_epoch, "for CPU runs pass --quick")

    for epoch in run.epochs(args.epochs, steps_per_epoch, args.batch_size):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + epoch))
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size][rank::world].to(images.device)
            x = images[idx].to(device, non_blocking=True).float() / 127.5 - 1
            if flip:
                x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            y = labels[idx].to(device)
            loss = train_step(model, opt, scaler, x, y, loss_kwargs, args.grad_clip, precision)
            sched.step()
            step = run.step + 1  # the EMA warm-up counts steps from 1
            ema_update(ema, net, min(args.ema, (1 + step) / (args.ema_warmup + step)))
            run.log(loss, opt.param_groups[0]["lr"])
        run.save()
        if rank == 0:
            common.plot_curves(os.path.join(args.out, "loss.png"), {"v-loss": run.losses},
                               title=f"JiT-{args.model}, {args.pred}-pred, {args.dataset}: v-loss per step")
            save_figures(ema, vars(args), run.epoch, sampling, gif=run.epoch == args.epochs)
    if args.save_samples:
        write_samples(ema, args, sampling, args.dataset, args.data_dir)


def benchmark(args, device, precision):
    """Training img/s (forward, backward, AdamW) and sampling img/s on random data, eager and compiled."""
    sampling = sampling_settings(args, len(common.CLASS_NAMES.get(args.dataset, [])), precision)
    net = make_model(vars(args)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, fused=device.type == "cuda")
    x = torch.randn(args.batch_size, net.channels, args.res, args.res, device=device).clamp(-1, 1)
    y = torch.randint(0, max(1, net.num_classes), (args.batch_size,), device=device)  # unconditional: null
    rows = {}
    for name, model in [("eager", net), ("compiled", torch.compile(net))]:
        step = functools.partial(train_step, model, opt, common.grad_scaler(device, precision), x, y,
                                 loss_settings(args), args.grad_clip, precision)
        sample = functools.partial(generate, model, torch.randn_like(x), y, **sampling)
        rows[f"JiT-{args.model} {args.res} px {precision}, {name}"] = (step, sample, args.batch_size)
    return common.benchmark(rows, device, log=log)


# ------------------------------------------------------------------------------------- figures and samples
def sampling_settings(args, num_classes, precision):
    if args.cfg is not None and not num_classes:
        raise common.UserError("--cfg: this model is unconditional (no classes to guide); drop --cfg")
    cfg = (CFG if args.cfg is None else args.cfg) if num_classes else 1.0
    return dict(cfg=cfg, steps=args.steps, solver=args.solver, interval=tuple(args.cfg_interval),
                precision=precision)


def save_figures(model, config, epoch, sampling, gif=False):
    """samples.png from fixed noise (one row per class, or an 8 x 8 grid); sampling.gif: the path z_t."""
    classes = common.CLASS_NAMES.get(config["dataset"], [])
    lo, hi = sampling["interval"]
    guidance = f"w={sampling['cfg']:g} for {lo:g} < t < {hi:g}" if sampling["cfg"] != 1 else "no guidance"
    title = (f"JiT-{config['model']} patch {config['patch']}/{config['stride']} {config['pred']}-pred, "
             f"{config['dataset']}, epoch {epoch}: {guidance}, "
             f"{sampling['solver']} {sampling['steps']} steps")
    n = 8 * len(classes) if classes else 64
    seeded = torch.Generator().manual_seed(config["seed"])
    noise = torch.randn(n, model.channels, model.res, model.res, generator=seeded)
    y = torch.arange(len(classes)).repeat_interleave(8) if classes else None
    keep = slice(None, None, 8) if classes else slice(0, 8)  # the GIF shows one image per class (or 8 images)
    frames = []
    x = generate(model, noise, y, **sampling, on_step=lambda z_t: frames.append(z_t[keep].float().cpu()))
    common.save_grid(x, os.path.join(config["out"], "samples.png"), nrow=8, scale=max(1, 96 // model.res),
                     row_labels=classes or None, title=title)
    if gif:  # about 20 frames at a smaller scale: noise compresses badly
        frames = [noise[keep]] + frames[len(frames) - 1::-max(1, len(frames) // 20)][::-1]
        common.save_gif(frames, os.path.join(config["out"], "sampling.gif"), nrow=len(classes) or 8,
                        scale=max(1, 64 // model.res), title=f"z_t, t = 0 to 1: {title}")


def write_samples(model, args, sampling, dataset, data_dir):
    """--num-samples samples for evaluate.py, classes in turn (-1: unconditional), made by all ranks."""
    labels = [j % model.num_classes if model.num_classes else -1 for j in range(args.num_samples)]
    if dataset == "celeba":  # evaluate.py scores CelebA as a folder of images
        dataset = "folder"
        data_dir = find_celeba(data_dir, must=False)
    common.save_samples(args.save_samples, lambda noise, y: generate(model, noise, y, **sampling),
                        args.num_samples, args.batch_size, (model.channels, model.res, model.res), labels,
                        args.seed, f"--dataset {dataset} --data-dir {data_dir}")


# -------------------------------------------------------------------------------------------- data
def load_data(dataset, data_dir, res, out):
    """Images uint8 N x C x H x W and int64 labels (unconditional: all the null label, 0), as tensors."""
    if dataset in NATIVE_RES:
        return common.load_dataset(dataset, data_dir, train=True)
    folder = find_celeba(data_dir) if dataset == "celeba" else data_dir
    images = torch.as_tensor(load_folder(folder, res, 178 if dataset == "celeba" else None, out)[0])
    return images, torch.zeros(len(images), dtype=torch.long)


def find_celeba(data_dir, must=True):
    for folder in (data_dir, os.path.join(data_dir, "img_align_celeba"),
                   os.path.join(data_dir, "celeba", "img_align_celeba")):
        if os.path.isdir(folder) and any(f.lower().endswith(common.IMAGE_EXTS) for f in os.listdir(folder)):
            return folder
    if must:
        raise common.UserError(f"no CelebA images in {data_dir}; unzip img_align_celeba.zip from "
                               f"https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and pass its folder")
    return data_dir


def load_folder(folder, res, crop, out_dir):
    """Decode and resize every image once into a uint8 .npy cache next to the data (in the out dir when the
    data folder is read-only), named by a hash of the file list (names, sizes, times); later runs read it."""
    if not os.path.isdir(folder):
        raise common.UserError(f"data folder {folder} does not exist; pass --data-dir DIR with your images")
    names = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    files = [f for f in names
             if f.lower().endswith(common.IMAGE_EXTS) and os.path.isfile(os.path.join(folder, f))]
    if not files:
        raise common.UserError(f"no images (.jpg/.png/...) in {folder}; pass --data-dir DIR with your images")
    stats = [os.stat(os.path.join(folder, f)) for f in files]  # a replaced image (size, time): a new cache
    listing = repr([(f, s.st_size, s.st_mtime) for f, s in zip(files, stats)] + [res, crop])
    cache_dir = folder if os.access(folder, os.W_OK) else out_dir
    key = hashlib.sha1(listing.encode()).hexdigest()[:12]
    cache = os.path.join(cache_dir, f".{SCRIPT}-cache-{res}px-{key}.npy")

    def write(tmp):
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), 3, res, res))
        for i, f in enumerate(files):
            arr[i] = common.load_image(os.path.join(folder, f), (res, res), crop)
        arr.flush()
    if not os.path.isfile(cache):  # a cache that is there is whole: atomic_write renames it into place
        log(f"decoding {len(files)} images of {folder} at {res} px into {cache} (once)")
        common.atomic_write(cache, write)
    return np.load(cache, mmap_mode="c"), cache  # read as batches need it; copy-on-write, never written


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    presets = "; ".join(f"{name}: {q['depth']} x {q['dim']}, {q['heads']} heads, patch {q['patch']} stride "
                        f"{q['stride']}, lr {LR[name]:g}" for name, q in PRESETS.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("--dataset", choices=["celeba", "folder", "mnist", "fashion", "cifar10"], default="celeba",
        help="celeba (centre crop 178), folder (any images): unconditional; mnist, fashion, cifar10: CFG")
    add("--data-dir", default="data", help="the image folder (celeba/folder) or the torchvision root")
    common.add_run_flags(p, SCRIPT, num_samples=1000)
    add("--quick", action="store_true", help="the CPU recipe: --model mnist --epochs 8 --batch-size 64 "
        "--warmup-epochs 0.5 --ema-warmup 22 --cfg 3.5 --cfg-interval 0.2 0.9 --compile --steps 10; "
        "flags given win")
    add("--res", type=int, help="training resolution (default: 256; mnist and fashion 28, cifar10 32)")
    add("--model", choices=list(PRESETS), default="blog", help=f"architecture preset; {presets}")
    add("--patch", type=int, help="patch size p (default: the preset's)")
    add("--stride", type=int, help="patch stride s <= p; s < p overlaps (default: the preset's)")
    add("--pred", choices=["x", "v", "eps"], default="x", help="the output: image (the paper), v or noise")
    add("--epochs", type=int, default=100, help="training epochs")
    add("--batch-size", type=int, default=128, help="global batch size, split over DDP ranks")
    add("--lr", type=float, help="AdamW learning rate, betas (0.9, 0.95), no decay (default: the preset's)")
    add("--warmup-epochs", type=float, default=5, help="linear learning-rate warm-up")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    add("--ema", type=float, default=0.9999, help="EMA decay of the weights used for sampling")
    add("--ema-warmup", type=float, default=10, metavar="K", help="the EMA decay at step s is min(--ema, "
        "(1 + s) / (K + s)): in a short run the EMA reaches back about the last 1/K of the steps")
    add("--label-dropout", type=float, default=0.1, help="probability of the null label (for CFG)")
    add("--no-flip", action="store_true", help="no random horizontal flips of celeba, folder and cifar10")
    add("--noise-scale", type=float, default=1.0, help="e = noise_scale * N(0, I); the --t-mu shift above "
        "256 px already gives the official 2 at 512 px: don't use both")
    add("--t-mu", type=float, help="mean of logit(t) (default: 0 at --res 32 and below, else the paper's "
        "-0.8), minus ln(res/256) above 256 px; the value used is printed at the start")
    add("--t-sigma", type=float, default=0.8, help="std of logit(t)")
    add("--t-eps", type=float, default=0.05, help="clamp of the divisor 1 - t (x) or t (eps) of v")
    add("--steps", type=int, default=50, help="sampler steps (Heun: 2 * steps - 1 network calls)")
    add("--solver", choices=["heun", "euler"], default="heun", help="ODE solver (Heun: the official)")
    add("--cfg", type=float, help=f"guidance scale w, class-conditional data only (default: {CFG:g}; 1: off)")
    add("--cfg-interval", type=float, nargs=2, default=list(CFG_INTERVAL), metavar=("LO", "HI"),
        help="guide only for LO < t < HI (LO = 0 includes t = 0)")
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    res = args.res or NATIVE_RES.get(args.dataset, 256)  # --model, --dataset and --res decide five defaults
    preset = PRESETS[args.model]
    p.set_defaults(patch=preset["patch"], stride=preset["stride"], lr=LR[args.model], res=res,
                   t_mu=0.0 if res <= 32 else -0.8)
    return p.parse_args(argv)


def validate(args):
    common.check_run_flags(args)
    common.check_positive(args, "patch", "stride", "lr", "noise_scale", "t_sigma", "t_eps")
    common.check_range(args, "res", 1, 4096)
    if NATIVE_RES.get(args.dataset, args.res) != args.res:
        raise common.UserError(f"{args.dataset} images are {NATIVE_RES[args.dataset]} px; drop --res")
    if not 0 <= args.label_dropout < 1 or not 0 < args.ema < 1 or not args.t_eps < 1 or args.ema_warmup < 1:
        raise common.UserError("need 0 <= --label-dropout < 1, 0 < --ema < 1, --ema-warmup >= 1, --t-eps < 1")
    if args.warmup_epochs < 0 or args.grad_clip < 0 or (args.cfg or 0) < 0:
        raise common.UserError("--warmup-epochs, --grad-clip and --cfg can't be negative")
    if not 0 <= args.cfg_interval[0] < args.cfg_interval[1] <= 1:
        raise common.UserError("--cfg-interval LO HI must satisfy 0 <= LO < HI <= 1")
    if args.no_flip and args.dataset not in FLIPPED:
        raise common.UserError(f"--no-flip: {args.dataset} images are never flipped; drop --no-flip")
    if args.sample:  # the architecture comes from the checkpoint
        return args
    check_grid(args.res, args.patch, args.stride)
    data = os.path.realpath(args.data_dir)
    if args.dataset not in NATIVE_RES and os.path.commonpath([data, os.path.realpath(args.out)]) == data:
        raise common.UserError(f"--out {args.out} is in the data folder (its figures would be trained on)")
    return args


def main(argv=None):
    args = validate(parse_args(argv))
    device = common.setup_ddp(args.device)[2]
    precision = common.precision_for(args.precision, device, log)
    if args.benchmark:
        return benchmark(args, device, precision)
    if not args.sample:
        return train(args, device, precision)
    model, config = load_model(args.sample, device)  # --sample: the figures and the .npz of the EMA weights
    sampling = sampling_settings(args, model.num_classes, precision)
    common.prepare_out(args.out)
    if common.rank_and_world()[0] == 0:
        save_figures(model, dict(config, out=args.out, seed=args.seed), config["epoch"], sampling, gif=True)
    if args.save_samples:
        write_samples(model, args, sampling, config["dataset"], config["data_dir"])


if __name__ == "__main__":
    common.run(main)
