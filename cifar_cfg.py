"""Class-conditional flow matching with classifier-free guidance (CFG) on CIFAR-10, MNIST or Fashion-MNIST,
on a hand-written U-Net equal to the diffusers UNet2DModel of the source write-up ("Diffusion & Flow Matching
Part 11: Building an Image Generator").

The recipe (defaults): CondOT path x_t = t*x + (1-t)*eps with t ~ U[0, 1] (t=0 noise, t=1 data), velocity
target x - eps, MSE; labels dropped per sample to a null class (index 10) with probability 0.1; AdamW 2e-4,
gradient clip 1.0, batch 128, 50 epochs of CIFAR-10; Euler on the write-up's grid torch.linspace(0, 1, 50)
(49 steps) with guidance w = 2:
    u = u_uncond + w * (u_cond - u_uncond)          (cond and uncond in one batched forward)
Beyond the write-up, as TorchCFM / EDM / JiT do: an EMA of the weights (used for sampling unless
--raw-weights), random horizontal flips (CIFAR-10 only), a linear LR warm-up, and Heun as a second solver.
MNIST and Fashion-MNIST (28 px, grey) train the same network with one channel in and out.

    python cifar_cfg.py --data-dir data                       # train; writes runs/cifar_cfg/
    torchrun --nproc_per_node=4 cifar_cfg.py --data-dir data  # same global batch of 128, split over 4 GPUs
    python cifar_cfg.py --sample runs/cifar_cfg/last.pt --cfg 4 --solver heun --steps 25 --save-samples s.npz
    python cifar_cfg.py --resume runs/cifar_cfg/last.pt --epochs 100
    python cifar_cfg.py --benchmark --batch-size 32 --compile # ours vs diffusers, eager vs compiled, img/s
A CPU-sized run on Fashion-MNIST (2 cores: 80 img/s, 12.5 min of training; accuracy 91%, see the README):
    python cifar_cfg.py --dataset fashion --channels 32 32 64 64 --epochs 1 --batch-size 64 --lr 1e-3 \\
        --warmup 100 --ema-decay 0.995 --out runs/cifar_cfg_fashion
In a notebook:
    model, config = load_model("runs/cifar_cfg/last.pt")
    images = generate(model, torch.randn(10, 3, 32, 32), torch.arange(10), cfg=2.0, steps=49)
"""
import argparse
import copy
import itertools
import math
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "cifar_cfg"
WRITEUP_CHANNELS = (64, 128, 256, 256)  # the write-up's UNet2DModel widths: a network sized for a GPU
NULL = 10  # the null class of CFG: label 10 of the 11 class embeddings (each dataset here has 10 classes)
RES = 32  # the U-Net's input size: its three 2x down-samplings need a multiple of 8
TITLES = {"cifar10": "CIFAR-10", "mnist": "MNIST", "fashion": "Fashion-MNIST"}
GUIDANCE_SWEEP = (0, 1, 2, 4, 8)  # the write-up's table of guidance scales
LOG_EVERY = 50  # steps per line of metrics.jsonl
CPU_RUN = ("python cifar_cfg.py --dataset fashion --channels 32 32 64 64 --epochs 1 --batch-size 64 "
           "--lr 1e-3 --warmup 100 --ema-decay 0.995 --out runs/cifar_cfg_fashion")
# the settings that define a training run: --resume refuses a checkpoint trained otherwise (--epochs may grow)
TRAINING_KEYS = ("dataset", "channels", "batch_size", "lr", "warmup", "grad_clip", "label_dropout",
                 "ema_decay", "no_flip", "seed")


# ------------------------------------------------------------------------------------------- model
def timestep_embedding(t, dim):
    """diffusers' positional embedding (flip_sin_to_cos=True, freq_shift=0) of 1000*t: [cos(a), sin(a)],
    a_k = 1000 t 10000^(-k/(dim/2)). The write-up passed (t * 1000).long(), quantising t to 1000 levels;
    we keep t continuous."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm/SiLU/conv twice, the embedding projected and added in between; a 1x1 conv shortcut when the
    width changes."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(32, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb_act):
        # in place: a conv's output is not kept for its backward, so this saves an activation-sized tensor
        h = self.conv1(F.silu(self.norm1(x))).add_(self.time_proj(emb_act)[:, :, None, None])
        h = self.conv2(F.silu(self.norm2(h)))
        return h.add_(self.skip(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions (heads of 8 channels), residual around it."""

    def __init__(self, channels, head_dim=8):
        super().__init__()
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Linear(channels, 3 * channels)  # diffusers' to_q, to_k, to_v stacked: one matmul
        self.out = nn.Linear(channels, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.out(h).transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """One resolution of the U-Net: ResBlocks (each with attention at 8x8), then a down- or upsampler."""

    def __init__(self, res, attn, resample):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


class UNet(nn.Module):
    """UNet2DModel(sample_size=32, layers_per_block=2, block_out_channels=channels,
    down=(Down, Down, AttnDown, Down), up=(Up, AttnUp, Up, Up), num_class_embeds=11), written out; in and out
    channels: the data's. 25,307,779 parameters at the write-up's widths on RGB."""

    def __init__(self, channels=WRITEUP_CHANNELS, image_channels=3, num_classes=NULL + 1):
        super().__init__()
        c0, emb_dim = channels[0], 4 * channels[0]
        self.time_embed = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes, emb_dim)  # added to the time embedding
        self.conv_in = nn.Conv2d(image_channels, c0, 3, padding=1)
        skips, c_prev, last = [c0], c0, len(channels) - 1
        self.encoder = nn.ModuleList()
        for i, c in enumerate(channels):  # 32x32 -> 16 -> 8 (attention) -> 4
            res = [ResBlock(c_prev if j == 0 else c, c, emb_dim) for j in range(2)]
            attn = [SelfAttention(c) for _ in range(2)] if i == 2 else []
            down = nn.Conv2d(c, c, 3, stride=2, padding=1) if i < last else None
            self.encoder.append(Level(res, attn, down))
            skips += [c] * (3 if i < last else 2)  # one skip per ResBlock, one after the downsampler
            c_prev = c
        self.mid_res1 = ResBlock(c_prev, c_prev, emb_dim)
        self.mid_attn = SelfAttention(c_prev)
        self.mid_res2 = ResBlock(c_prev, c_prev, emb_dim)
        self.decoder = nn.ModuleList()
        for i, c in enumerate(reversed(channels)):  # 4x4 -> 8 (attention) -> 16 -> 32; a skip per ResBlock
            res = []
            for _ in range(3):
                res.append(ResBlock(c_prev + skips.pop(), c, emb_dim))
                c_prev = c
            attn = [SelfAttention(c) for _ in range(3)] if i == 1 else []
            up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))
            self.decoder.append(Level(res, attn, up if i < last else None))
        self.out_norm = nn.GroupNorm(32, c0)
        self.conv_out = nn.Conv2d(c0, image_channels, 3, padding=1)

    def forward(self, x, t, y):
        """x: (B, C, 32, 32) in [-1, 1]; t: (B,) floats in [0, 1]; y: (B,) labels, NULL = unconditional."""
        emb = self.time_embed(timestep_embedding(t, self.conv_in.out_channels)) + self.class_embed(y)
        emb_act = F.silu(emb)  # every ResBlock starts its projection with SiLU: apply it once here
        h = self.conv_in(x)
        skips = [h]
        for level in self.encoder:
            for i, res in enumerate(level.res):
                h = res(h, emb_act)
                h = level.attn[i](h) if len(level.attn) else h
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb_act)), emb_act)
        for level in self.decoder:
            for i, res in enumerate(level.res):
                h = res(torch.cat([h, skips.pop()], dim=1), emb_act)
                h = level.attn[i](h) if len(level.attn) else h
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.out_norm(h)))


class DiffusersUNet(nn.Module):
    """The write-up's diffusers UNet2DModel behind our forward(x, t, y): for --benchmark and parity tests."""

    def __init__(self, channels=WRITEUP_CHANNELS, image_channels=3):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise common.UserError("diffusers is not installed; `pip install diffusers` to compare with it")
        self.unet = UNet2DModel(
            sample_size=RES, in_channels=image_channels, out_channels=image_channels, layers_per_block=2,
            block_out_channels=tuple(channels), num_class_embeds=NULL + 1,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))

    def forward(self, x, t, y):
        return self.unet(x, t * 1000, class_labels=y).sample


# ------------------------------------------------------------------------------------------ method
def flow_matching_loss(model, x, y, label_dropout):
    """CFM loss: x_t = t*x + (1-t)*eps, target dx_t/dt = x - eps; labels dropped to NULL per sample (CFG)."""
    t = torch.rand(len(x), device=x.device)
    eps = torch.randn_like(x)
    x_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * eps
    y = torch.where(torch.rand(len(y), device=y.device) < label_dropout, NULL, y)
    return F.mse_loss(model(x_t, t, y).float(), x - eps)


def guided_velocity(model, x_t, t, y, w):
    """The CFG velocity u = u_uncond + w (u_cond - u_uncond), both halves in one batched forward.
    w is a number or a per-sample tensor (the guidance sweep samples every w in one batch)."""
    w = torch.as_tensor(w, dtype=torch.float32, device=x_t.device).reshape(-1, 1, 1, 1)
    t2 = torch.full((2 * len(x_t),), t, device=x_t.device)
    y2 = torch.cat([y, torch.full_like(y, NULL)])
    u_cond, u_uncond = model(torch.cat([x_t, x_t]), t2, y2).float().chunk(2)
    return u_uncond + w * (u_cond - u_uncond)


def ode_solve(velocity, x, steps, solver="euler", on_step=None):
    """Integrate dx/dt = velocity(x, t) from t=0 (noise) to t=1 (data) on a uniform grid of steps+1 points.
    Euler: x += h u(x, t). Heun: the trapezoid of u(x, t) and u at the Euler guess (second order, 2 calls).
    on_step(x) is called after every step (GIF frames, progress)."""
    ts = torch.linspace(0, 1, steps + 1).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        u = velocity(x, t)
        if solver == "heun":
            u = (u + velocity(x + h * u, t_next)) / 2
        x = x + h * u
        if on_step is not None:
            on_step(x)
    return x


@torch.no_grad()
def generate(model, noise, y, cfg, steps, solver="euler", precision="fp32", on_step=None):
    """Samples of the classes y from noise (N, C, 32, 32), as images in [-1, 1] on the model's device.
    cfg: the guidance scale w, a number or one per sample."""
    device = next(model.parameters()).device
    y = y.to(device)

    def velocity(x_t, t):
        return guided_velocity(model, x_t, t, y, cfg)
    with common.autocast(device, precision):
        x = ode_solve(velocity, noise.to(device), steps, solver, on_step)
    return x.clamp(-1, 1)


# -------------------------------------------------------------------------------------------- data
def load_data(dataset, data_dir):
    """The training split as uint8 (N, C, 32, 32), its labels, and the data's own shape (C, H, W)."""
    images, labels = common.load_dataset(dataset, data_dir)
    # 28 px images are padded with 2 px of black (the background of digits and clothes), not resized:
    # every pixel stays exact (no resampling blur) and 32 divides by the U-Net's 8x down-sampling
    pad = (RES - images.shape[2]) // 2
    return F.pad(images, (pad, pad, pad, pad)), labels, list(images.shape[1:])


def crop(x, shape):
    """Samples at the data's own size (C, H, W): cut off the padding load_data added."""
    top, left = (RES - shape[1]) // 2, (RES - shape[2]) // 2
    return x[:, :, top:top + shape[1], left:left + shape[2]]


# ---------------------------------------------------------------------------------------- figures
def write_figures(model, out, dataset, shape, classes, seed, sampling):
    """classes.png: one row per class (10 samples each); guidance.png: the same noise at w = 0, 1, 2, 4, 8;
    sampling.gif: x_t along the ODE for the class grid, from the noise to the samples."""
    classes = torch.tensor(classes)
    names = [common.CLASS_NAMES[dataset][c] for c in classes]
    steps = sampling["steps"]
    what = f"{TITLES[dataset]}, {steps} {sampling['solver']} steps"
    progress = common.Progress(2 * steps, prefix="figures: ODE step")
    done = itertools.count(1)
    noise = torch.randn(10 * len(classes), shape[0], RES, RES, generator=torch.Generator().manual_seed(seed))
    frames = [noise]

    def record(x):
        frames.append(x.cpu())
        progress.update(next(done), len(x) / steps)
    grid = generate(model, noise, classes.repeat_interleave(10), **sampling, on_step=record)
    common.save_grid(crop(grid, shape), os.path.join(out, "classes.png"), nrow=10, scale=2, row_labels=names,
                     title=f"{what}, w={sampling['cfg']:g}")
    keep = frames[::max(1, len(frames) // 24)][:-1] + frames[-1:]  # at most ~25 frames, always the last
    common.save_gif([crop(f, shape).clamp(-1, 1) for f in keep], os.path.join(out, "sampling.gif"), nrow=10,
                    title=f"{what}, w={sampling['cfg']:g}: x_t from t=0 to 1")
    per_w, k = 2, len(GUIDANCE_SWEEP)  # rows: classes; columns: per_w samples at each w, same noise at each w
    noise = torch.randn(len(classes), 1, per_w, shape[0], RES, RES,
                        generator=torch.Generator().manual_seed(seed + 1))
    noise = noise.expand(-1, k, -1, -1, -1, -1).reshape(-1, shape[0], RES, RES)
    w = torch.tensor(GUIDANCE_SWEEP, dtype=torch.float32).repeat_interleave(per_w).repeat(len(classes))
    sweep = generate(model, noise, classes.repeat_interleave(k * per_w), **dict(sampling, cfg=w),
                     on_step=lambda x: progress.update(next(done), len(x) / steps))
    cols = [f"w={g}" if j == 0 else "" for g in GUIDANCE_SWEEP for j in range(per_w)]
    common.save_grid(crop(sweep, shape), os.path.join(out, "guidance.png"), nrow=k * per_w, scale=2,
                     row_labels=names, col_labels=cols, title=f"{what}: the same noise at each guidance w")


def save_samples(model, path, n, batch, classes, seed, sampling, shape):
    """n samples, `classes` in turn, as uint8 at the data's size `shape` in an .npz (e.g. 50,000 for FID),
    split over torchrun ranks: chunk i is made by rank i % world from noise seeded by seed + 2 + its first
    index, so any number of processes writes the same file; rank 0 gathers and writes it."""
    rank, world = common.rank_and_world()
    labels = torch.tensor(classes)[torch.arange(n) % len(classes)]
    progress = common.Progress(n, prefix="sampling", enabled=rank == 0)
    starts = range(0, n, batch)
    chunks = {}
    for i in range(rank, len(starts), world):
        y = labels[starts[i]:starts[i] + batch]
        noise = torch.randn(len(y), shape[0], RES, RES,
                            generator=torch.Generator().manual_seed(seed + 2 + starts[i]))
        chunks[i] = common.to_uint8(crop(generate(model, noise, y, **sampling), shape)).numpy()
        progress.update(min(n, (i + world) * batch), len(y) * world)
    pixels = common.gather_chunks(chunks)
    if rank == 0:
        common.save_samples_npz(path, torch.from_numpy(pixels) / 127.5 - 1, labels.numpy())


def write_samples(model, args, shape, dataset, sampling):
    """--save-samples: --num-samples samples, --classes in turn; then the command that scores them."""
    save_samples(model, args.save_samples, args.num_samples, args.batch_size, args.classes or range(NULL),
                 args.seed, sampling, shape)
    if common.rank_and_world()[0] == 0:
        print(f"wrote {args.num_samples} samples to {args.save_samples}; score them with: python evaluate.py "
              f"{args.save_samples} --dataset {dataset} --data-dir {args.data_dir}", flush=True)


# ---------------------------------------------------------------------------------------- training
def train_step(model, opt, scaler, x, y, label_dropout, grad_clip, precision):
    with common.autocast(x.device, precision):
        loss = flow_matching_loss(model, x, y, label_dropout)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # clip the true gradients (the scaler is a pass-through unless fp16)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    return loss


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * theta, for every parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def estimate_cpu_time(net, x, y, label_dropout, grad_clip, precision, total_steps):
    """The write-up's network is sized for a GPU: on a CPU, time 2 steps of a copy (the run's weights and
    random streams stay untouched) and say how long the run would take here."""
    print("timing 2 steps to estimate the run time...", flush=True)
    trial = copy.deepcopy(net)
    opt = torch.optim.AdamW(trial.parameters())
    scaler = common.grad_scaler(x.device, precision)
    times = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(2):
            start = time.perf_counter()
            train_step(trial, opt, scaler, x, y, label_dropout, grad_clip, precision)
            times.append(time.perf_counter() - start)
    print(f"note: the write-up's network is sized for a GPU: on this CPU its {total_steps:,} steps would "
          f"take about {common.format_time(min(times) * total_steps)} ({min(times):.2f} s a step of {len(x)} "
          f"images). A CPU run of about 13 minutes on 2 cores: {CPU_RUN}", flush=True)


def train(args, rank, world, device, precision, sampling):
    if args.batch_size % world:
        raise common.UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over "
                               f"{world} processes")
    ckpt = common.load_checkpoint(args.resume, SCRIPT, vars(args), TRAINING_KEYS) if args.resume else None
    if ckpt and args.epochs <= ckpt["epoch"]:
        raise common.UserError(f"{args.resume} has trained {ckpt['epoch']} epochs already, so --epochs "
                               f"{args.epochs} leaves nothing to do; pass a larger --epochs")
    common.check_fresh_run(os.path.join(args.out, "last.pt"), args.resume, args.overwrite, SCRIPT)
    out = common.prepare_out(args.out)  # on every rank: each raises the same error, none waits for rank 0

    def lock_and_load():  # the lock inside rank0_first: if another run holds it, every rank gets the error
        if rank == 0:
            common.lock_out(out)
        return load_data(args.dataset, args.data_dir)
    images, labels, shape = common.rank0_first(lock_and_load, rank, world)
    if len(images) < args.batch_size:
        raise common.UserError(f"{args.data_dir} holds {len(images)} {TITLES[args.dataset]} images, fewer "
                               f"than --batch-size {args.batch_size}")
    images, labels = images.to(device), labels.to(device)  # the whole set on the device as uint8
    flip = args.dataset == "cifar10" and not args.no_flip  # flipped digits are other glyphs; shoes face left

    common.seed_everything(args.seed + rank)  # each rank its own noise, times and label drops
    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    net = UNet(args.channels, shape[0]).to(device, memory_format=layout)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net  # sends rank 0's weights
    ema = copy.deepcopy(net).requires_grad_(False)  # after DDP's broadcast: all EMAs = rank 0's
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, fused=cuda)

    def warmup(s):  # linear warm-up: the LR factor of step s
        return min(1.0, (s + 1) / max(1, args.warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    scaler = common.grad_scaler(device, precision)
    start_epoch, step, losses = 0, 0, []
    if ckpt:  # the same checkpoint on every rank: the weights stay equal after DDP's broadcast
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when written by a run without fp16
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, losses = ckpt["epoch"], ckpt["step"], ckpt["losses"]
        common.set_rank_rng_state(ckpt["rng"], args.seed + 1000 * start_epoch)
    model = torch.compile(model) if args.compile else model
    sample_net = net if args.raw_weights else ema
    sampler = torch.compile(sample_net) if args.compile else sample_net

    steps_per_epoch = len(images) // args.batch_size  # no last partial batch: every step sees a full batch
    local = args.batch_size // world
    if rank == 0 and device.type == "cpu" and tuple(args.channels) == WRITEUP_CHANNELS:
        estimate_cpu_time(net, images[:local].float() / 127.5 - 1, labels[:local], args.label_dropout,
                          args.grad_clip, precision, (args.epochs - start_epoch) * steps_per_epoch)
    metrics = common.Metrics(os.path.join(out, "metrics.jsonl"), fresh=not args.resume) if rank == 0 else None
    progress = common.Progress(args.epochs * steps_per_epoch, step, enabled=rank == 0)
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        epoch_losses = []  # kept on the device: no sync per step
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + epoch))
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size][rank::world].to(device)  # rank's part
            x = images[idx].float().div_(127.5).sub_(1).contiguous(memory_format=layout)
            if flip:
                x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            loss = train_step(model, opt, scaler, x, labels[idx], args.label_dropout, args.grad_clip,
                              precision)
            sched.step()
            ema_update(ema, net, args.ema_decay)
            step += 1
            epoch_losses.append(loss.detach())
            progress.update(step, args.batch_size, epoch=f"{epoch + 1}/{args.epochs}", loss=epoch_losses[-1])
        epoch_losses = torch.stack(epoch_losses)
        if world > 1:  # one all_reduce an epoch: the history holds the mean over ranks of every step's loss
            dist.all_reduce(epoch_losses)
            epoch_losses /= world
        epoch_losses = epoch_losses.tolist()
        seconds = time.time() - started
        first = step - steps_per_epoch
        bad = [i for i, v in enumerate(epoch_losses) if not math.isfinite(v)]
        if bad:  # checked before the checkpoint: a NaN model never replaces the last good one
            raise common.UserError(f"the loss became {epoch_losses[bad[0]]} at step {first + bad[0] + 1}, so "
                                   f"training stopped before writing a checkpoint of it; try a lower --lr or "
                                   f"--precision fp32")
        losses += epoch_losses
        rngs = common.all_rng_states()
        if rank != 0:
            continue
        common.save_checkpoint(os.path.join(out, "last.pt"), {
            "script": SCRIPT, "config": vars(args), "image_shape": shape, "model": net.state_dict(),
            "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step, "rng": rngs, "losses": losses})
        for s in range(0, steps_per_epoch, LOG_EVERY):
            end = first + min(s + LOG_EVERY, steps_per_epoch)
            metrics.log(step=end, epoch=epoch + 1, loss=statistics.fmean(losses[first + s:end]),
                        lr=args.lr * warmup(end - 1))
        metrics.log(epoch=epoch + 1, loss=statistics.fmean(epoch_losses), lr=sched.get_last_lr()[0],
                    img_per_s=round(steps_per_epoch * args.batch_size / seconds, 1),
                    seconds=round(seconds, 1))
        every = max(1, epoch // 10)  # at most about 10 marks, at the ends of epochs before this one
        marks = [(e * steps_per_epoch, f"epoch {e}") for e in range(every, epoch + 1, every)]
        common.plot_curves(os.path.join(out, "loss.png"), {"flow matching loss": losses}, marks=marks,
                           title=f"{TITLES[args.dataset]}: training loss per step")
        write_figures(sampler, out, args.dataset, shape, args.classes or range(NULL), args.seed, sampling)
        print(f"epoch {epoch + 1}/{args.epochs}: mean loss {statistics.fmean(epoch_losses):.4f}; wrote {out}/"
              f"last.pt, metrics.jsonl, loss.png, classes.png, guidance.png, sampling.gif", flush=True)
    if args.save_samples:
        write_samples(sampler, args, shape, args.dataset, sampling)
    return net


# ------------------------------------------------------------------------------------ a trained model
def load_model(path, device="cpu", ema=True):
    """A trained model for a notebook, in eval mode, and its config: the training flags plus image_shape, the
    data's (C, H, W) (28 px data was padded to 32: crop generate's output). ema=False: the raw weights."""
    ckpt = common.load_checkpoint(path, SCRIPT)
    config = dict(ckpt["config"], image_shape=ckpt["image_shape"])
    model = UNet(config["channels"], config["image_shape"][0]).to(device)
    model.load_state_dict(ckpt["ema"] if ema else ckpt["model"])
    return model.eval(), config


def sample(args, rank, device, sampling):
    """--sample: --save-samples (split over torchrun ranks), then the figures (rank 0), from a checkpoint."""
    model, config = load_model(args.sample, device, ema=not args.raw_weights)
    out = common.prepare_out(args.out)
    sampler = torch.compile(model) if args.compile else model
    if args.save_samples:
        write_samples(sampler, args, config["image_shape"], config["dataset"], sampling)
    if rank == 0:
        write_figures(sampler, out, config["dataset"], config["image_shape"], args.classes or range(NULL),
                      args.seed, sampling)
        print(f"wrote {out}/classes.png, guidance.png, sampling.gif")
    return model


# --------------------------------------------------------------------------------------- benchmark
def benchmark(args, device, rounds=10):
    """Training and sampling img/s on CIFAR-shaped batches: our U-Net next to diffusers' UNet2DModel and, with
    --compile, next to itself compiled; timed in turns, the best of `rounds` steps (load only adds time)."""
    precision = common.precision_for(args.precision, device)
    ours, compiled, theirs = "ours (cifar_cfg.UNet)", "ours, torch.compile", "diffusers UNet2DModel"
    models = {ours: UNet(args.channels)}
    if args.compile:
        models[compiled] = UNet(args.channels)
    try:
        models[theirs] = DiffusersUNet(args.channels)
    except common.UserError as e:
        print(f"{e}; timing ours alone")
    B, cuda = args.batch_size, device.type == "cuda"
    x = torch.randn(B, 3, RES, RES, device=device)
    x = x.contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)
    y = torch.randint(0, NULL, (B,), device=device)

    def prepare(name, m):  # a function of its own: each model's closures keep their own model and optimizer
        m = m.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, fused=cuda)
        scaler = common.grad_scaler(device, precision)
        fast = torch.compile(m) if name == compiled else m
        return (lambda: train_step(fast, opt, scaler, x, y, args.label_dropout, args.grad_clip, precision),
                lambda: generate(fast, x, y, cfg=args.cfg, steps=1, solver=args.solver, precision=precision))
    runs = {name: prepare(name, m) for name, m in models.items()}  # name: (a training step, a sampling step)

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: ([], []) for name in runs}  # name: (seconds of each training step, of each sampling step)
    for r in range(rounds + 1):  # round 0 warms up (allocator, compile); then the models take turns first
        names = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
        for name in names:
            for fn, seconds in zip(runs[name], times[name]):
                seconds.append(timed(fn))
    print(f"device {device}, {precision}, batch {B}, best of {rounds} steps; "
          f"sampling = {args.steps} {args.solver} steps with CFG")
    print(f"{'model':24s} {'params':>12s} {'train img/s':>12s} {'sample img/s':>13s}")
    speed = {}
    for name, (train_t, sample_t) in times.items():
        n_params = sum(p.numel() for p in models[name].parameters())
        speed[name] = (B / min(train_t[1:]), B / (min(sample_t[1:]) * args.steps))  # not round 0
        print(f"{name:24s} {n_params:12,d} {speed[name][0]:12.3g} {speed[name][1]:13.3g}")
    for label, a, b in (("ours / diffusers", ours, theirs), ("compiled / eager", compiled, ours)):
        if a in speed and b in speed:
            print(f"{label} speed: training x{speed[a][0] / speed[b][0]:.3f}, "
                  f"sampling x{speed[a][1] / speed[b][1]:.3f}")


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("--dataset", choices=["cifar10", "mnist", "fashion"], default="cifar10",
        help="training data; 28 px MNIST and Fashion-MNIST are padded to 32 px")
    add("--data-dir", default="data",
        help="holds cifar-10-batches-py/, MNIST/raw/ or FashionMNIST/raw/ (downloaded if online)")
    add("--out", default=os.path.join("runs", SCRIPT),
        help="output: last.pt, metrics.jsonl, loss.png, classes.png, guidance.png, sampling.gif")
    add("--overwrite", action="store_true",
        help="start a fresh run in an --out that already holds a checkpoint (replacing it)")
    add("--device", help="cpu, cuda, cuda:N or mps; the best available if not given")
    add("--precision", choices=common.PRECISIONS, default="auto",
        help="auto: bf16 on GPUs that have it, fp16 with a grad scaler on older ones, fp32 on CPU")
    add("--seed", type=int, default=0, help="random seed; rank r of a torchrun job uses seed + r")
    add("--epochs", type=int, default=50, help="training epochs")
    add("--batch-size", type=int, default=128,
        help="global batch, split over torchrun processes; also the sampling batch")
    add("--lr", type=float, default=2e-4, help="AdamW learning rate")
    add("--warmup", type=int, default=1000, help="linear LR warm-up steps (0: none)")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    add("--label-dropout", type=float, default=0.1, help="probability of dropping a label to null")
    add("--ema-decay", type=float, default=0.9995,
        help="EMA decay per step; 0.9995 averages over ~2,000 steps, 5 of the recipe's 50 epochs")
    add("--no-flip", action="store_true",
        help="no random horizontal flips of CIFAR-10 (digits and clothes are never flipped)")
    add("--channels", type=int, nargs=4, default=list(WRITEUP_CHANNELS), metavar="C",
        help="U-Net width at the four resolutions, multiples of 32 (GroupNorm has 32 groups)")
    add("--solver", choices=["euler", "heun"], default="euler", help="ODE solver for sampling")
    add("--steps", type=int, default=49, help="ODE steps; 49: the write-up's linspace(0, 1, 50)")
    add("--cfg", type=float, default=2.0, help="guidance scale w (0: uncond., 1: cond.)")
    add("--classes", type=int, nargs="+", metavar="K", help="classes (0-9) to sample; all ten when not given")
    add("--raw-weights", action="store_true", help="sample with the raw weights, not the EMA")
    add("--save-samples", metavar="FILE.npz",
        help="after training (or with --sample) write --num-samples samples here, classes in turn")
    add("--num-samples", type=int, default=50000, help="how many samples --save-samples writes")
    add("--sample", metavar="CKPT",
        help="no training: write the figures (and --save-samples) of this checkpoint")
    add("--resume", metavar="CKPT",
        help="continue training from this checkpoint (everything restored); --epochs may grow")
    add("--compile", action="store_true", help="torch.compile the network (training and sampling)")
    add("--benchmark", action="store_true",
        help="no training: print training and sampling img/s of ours and diffusers' UNet2DModel "
             "(with --compile: also ours compiled)")
    return p.parse_args(argv)


def validate(args):
    common.check_finite(args)
    common.check_seed(args)
    common.check_positive(args, "epochs", "batch_size", "lr", "grad_clip", "steps")
    common.check_range(args, "num_samples", 1, 1_000_000)
    common.check_range(args, "steps", 1, 10_000)
    if args.no_flip and args.dataset != "cifar10":
        raise common.UserError(f"--no-flip applies to cifar10 only ({args.dataset} is never flipped); "
                               f"drop it")
    if args.cfg < 0:
        raise common.UserError(f"--cfg must be 0 or more (0 is unconditional), got {args.cfg}")
    if args.warmup < 0 or not 0 <= args.label_dropout < 1 or not 0 <= args.ema_decay < 1:
        raise common.UserError("--warmup must be >= 0, --label-dropout and --ema-decay in [0, 1)")
    if any(c % 32 for c in args.channels) or min(args.channels) <= 0:
        raise common.UserError(f"--channels must be positive multiples of 32 (GroupNorm uses 32 groups), "
                               f"got {args.channels}")
    if args.classes and not all(0 <= c < NULL for c in args.classes):
        raise common.UserError(f"--classes takes indices 0 to 9, got {args.classes}")
    common.get_device(args.device)  # refuses a name that is no device, or one this machine lacks
    if args.save_samples and not args.save_samples.endswith(".npz"):
        raise common.UserError(f"--save-samples {args.save_samples}: pass a file name ending in .npz")
    if args.save_samples:
        common.check_output_file(args.save_samples, "--save-samples", out=args.out)
    if args.sample and args.resume:
        raise common.UserError("pass either --sample CKPT (no training) or --resume CKPT, not both")
    return args


def main(argv=None):
    args = validate(parse_args(argv))
    if args.benchmark:
        return benchmark(args, common.get_device(args.device))
    rank, world, device = common.setup_ddp(args.device)
    precision = common.precision_for(args.precision, device, print if rank == 0 else lambda line: None)
    sampling = dict(cfg=args.cfg, steps=args.steps, solver=args.solver, precision=precision)
    if args.sample:
        return sample(args, rank, device, sampling)
    return train(args, rank, world, device, precision, sampling)


if __name__ == "__main__":
    common.run(main)
