"""Class-conditional CIFAR-10 flow matching with classifier-free guidance (CFG), on a hand-written U-Net equal to the
diffusers UNet2DModel of the source write-up ("Diffusion & Flow Matching Part 11: Building an Image Generator").

The recipe (defaults): CondOT path x_t = t*x + (1-t)*eps with t ~ U[0, 1] (t=0 noise, t=1 data), velocity target x - eps, MSE;
labels dropped per sample to a null class (index 10) with probability 0.1; AdamW 2e-4, gradient clip 1.0, batch 128,
50 epochs; Euler on the write-up's grid torch.linspace(0, 1, 50) (49 steps) with guidance w = 2:
    u = u_uncond + w * (u_cond - u_uncond)          (cond and uncond in one batched forward)
Beyond the write-up, as TorchCFM / EDM / JiT do: an EMA of the weights (used for sampling unless --raw-weights), random
horizontal flips, a linear LR warm-up, and Heun as a second solver.

    python cifar_cfg.py --data-dir data                       # train; writes runs/cifar_cfg/
    torchrun --nproc_per_node=4 cifar_cfg.py --data-dir data  # same global batch of 128, split over 4 GPUs
    python cifar_cfg.py --sample runs/cifar_cfg/last.pt --cfg 4 --solver heun --steps 25 --save-samples fid.npz
    python cifar_cfg.py --resume runs/cifar_cfg/last.pt --epochs 100
    python cifar_cfg.py --benchmark --batch-size 32           # ours vs diffusers' UNet2DModel, img/s
"""
import argparse
import copy
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
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
NULL = len(CLASSES)  # the null class of CFG: label 10 of the 11 class embeddings
GUIDANCE_SWEEP = (0, 1, 2, 4, 8)  # the write-up's table of guidance scales
# the settings that define a training run: --resume refuses a checkpoint trained otherwise (--epochs may grow)
TRAINING_KEYS = ("channels", "batch_size", "lr", "warmup", "grad_clip", "label_dropout", "ema_decay", "no_flip", "seed")


# ------------------------------------------------------------------------------------------- model
def timestep_embedding(t, dim):
    """diffusers' positional embedding (flip_sin_to_cos=True, freq_shift=0) of 1000*t: [cos(a), sin(a)], a_k = 1000 t 10000^(-k/(dim/2)).
    t is a float in [0, 1]; the write-up passed (t * 1000).long(), quantising t to 1000 levels; we keep it continuous."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm/SiLU/conv twice, the embedding projected and added in between; 1x1 conv shortcut when the width changes."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(32, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb_act):
        # adds in place: a conv's output is not kept for its backward, so this saves an activation-sized tensor each time
        h = self.conv1(F.silu(self.norm1(x))).add_(self.time_proj(emb_act)[:, :, None, None])
        h = self.conv2(F.silu(self.norm2(h)))
        return h.add_(self.skip(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions (heads of 8 channels), residual around it."""

    def __init__(self, channels, head_dim=8):
        super().__init__()
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Linear(channels, 3 * channels)  # diffusers' to_q, to_k, to_v stacked: one matmul instead of three
        self.out = nn.Linear(channels, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.out(h).transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """One resolution of the U-Net: ResBlocks (each followed by attention at 8x8), then a down- or upsampler (or none)."""

    def __init__(self, res, attn, resample):
        super().__init__()
        self.res, self.attn, self.resample = nn.ModuleList(res), nn.ModuleList(attn), resample


class UNet(nn.Module):
    """UNet2DModel(sample_size=32, layers_per_block=2, block_out_channels=channels, down=(Down, Down, AttnDown, Down),
    up=(Up, AttnUp, Up, Up), num_class_embeds=11), written out. 25,307,779 parameters at channels (64, 128, 256, 256)."""

    def __init__(self, channels=(64, 128, 256, 256), num_classes=NULL + 1):
        super().__init__()
        c0, emb_dim = channels[0], 4 * channels[0]
        self.time_embed = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes, emb_dim)  # added to the time embedding
        self.conv_in = nn.Conv2d(3, c0, 3, padding=1)
        skips, c_prev, last = [c0], c0, len(channels) - 1
        self.encoder = nn.ModuleList()
        for i, c in enumerate(channels):  # 32x32 -> 16 -> 8 (attention) -> 4
            res = [ResBlock(c_prev if j == 0 else c, c, emb_dim) for j in range(2)]
            attn = [SelfAttention(c) for _ in range(2)] if i == 2 else []
            self.encoder.append(Level(res, attn, nn.Conv2d(c, c, 3, stride=2, padding=1) if i < last else None))
            skips += [c] * (3 if i < last else 2)  # one skip per ResBlock, one after the downsampler
            c_prev = c
        self.mid_res1, self.mid_attn, self.mid_res2 = ResBlock(c_prev, c_prev, emb_dim), SelfAttention(c_prev), ResBlock(c_prev, c_prev, emb_dim)
        self.decoder = nn.ModuleList()
        for i, c in enumerate(reversed(channels)):  # 4x4 -> 8 (attention) -> 16 -> 32; each ResBlock eats one skip
            res = []
            for j in range(3):
                res.append(ResBlock(c_prev + skips.pop(), c, emb_dim))
                c_prev = c
            attn = [SelfAttention(c) for _ in range(3)] if i == 1 else []
            up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)) if i < last else None
            self.decoder.append(Level(res, attn, up))
        self.out_norm, self.conv_out = nn.GroupNorm(32, c0), nn.Conv2d(c0, 3, 3, padding=1)

    def forward(self, x, t, y):
        """x: (B, 3, 32, 32) in [-1, 1]; t: (B,) floats in [0, 1]; y: (B,) labels, NULL = unconditional. Returns the velocity."""
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
    """The write-up's diffusers UNet2DModel behind our forward(x, t, y): for --benchmark and the parity test."""

    def __init__(self, channels=(64, 128, 256, 256)):
        super().__init__()
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise common.UserError("diffusers is not installed; `pip install diffusers` to compare against UNet2DModel")
        self.unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                                block_out_channels=tuple(channels), num_class_embeds=NULL + 1,
                                down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))

    def forward(self, x, t, y):
        return self.unet(x, t * 1000, class_labels=y).sample


# -------------------------------------------------------------------------------------------- loss
def flow_matching_loss(model, x, y, label_dropout):
    """CFM loss: x_t = t*x + (1-t)*eps, target dx_t/dt = x - eps; labels dropped to NULL per sample for CFG."""
    t = torch.rand(len(x), device=x.device)
    eps = torch.randn_like(x)
    x_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * eps
    y = torch.where(torch.rand(len(y), device=y.device) < label_dropout, NULL, y)
    return F.mse_loss(model(x_t, t, y).float(), x - eps)


@torch.no_grad()
def ema_update(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * theta, for every parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)


# ----------------------------------------------------------------------------------------- sampler
def guided_field(model, y, w):
    """The CFG velocity u = u_uncond + w (u_cond - u_uncond), both halves in one batched forward.
    w is a number or a per-sample tensor (the guidance sweep samples every w in one batch)."""
    w = torch.as_tensor(w, dtype=torch.float32, device=y.device).reshape(-1, 1, 1, 1)
    y2 = torch.cat([y, torch.full_like(y, NULL)])

    def field(x, t):
        t2 = torch.full((2 * len(x),), t, device=x.device)
        u_cond, u_uncond = model(torch.cat([x, x]), t2, y2).float().chunk(2)
        return u_uncond + w * (u_cond - u_uncond)
    return field


@torch.no_grad()
def ode_solve(field, x, steps, solver="euler", frames=None):
    """Integrate dx/dt = field(x, t) from t=0 (noise) to t=1 (data) on a uniform grid of steps+1 points.
    Euler: x += h u(x, t). Heun: the trapezoid of u(x, t) and u at the Euler guess, second order, 2 evaluations a step."""
    ts = torch.linspace(0, 1, steps + 1).tolist()
    if frames is not None:
        frames.append(x.cpu())
    for t, t_next in zip(ts[:-1], ts[1:]):
        h, u = t_next - t, field(x, t)
        if solver == "heun":
            u = (u + field(x + h * u, t_next)) / 2
        x = x + h * u
        if frames is not None:
            frames.append(x.cpu())
    return x


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def generate(model, labels, args, device, seed, w=None, frames=None, noise=None):
    """Samples for `labels` with the guided field; noise from its own generator, so sampling never moves the training RNG."""
    model.eval()
    if noise is None:
        noise = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with autocast(device):
        x = ode_solve(guided_field(model, labels.to(device), args.cfg if w is None else w), noise.to(device),
                      args.steps, args.solver, frames)
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------- figures
def write_figures(model, args, out, device):
    """classes.png: one row per class (10 samples each); guidance.png: the same noise at w = 0, 1, 2, 4, 8;
    sampling.gif: x_t along the ODE for the class grid, from the noise to the samples."""
    classes = torch.tensor(args.classes or range(len(CLASSES)))
    names = [CLASSES[c] for c in classes]
    frames = []
    grid = generate(model, classes.repeat_interleave(10), args, device, args.seed, frames=frames)
    common.save_grid(grid, os.path.join(out, "classes.png"), nrow=10, scale=2, row_labels=names)
    keep = frames[::max(1, len(frames) // 24)][:-1] + frames[-1:]  # at most ~25 frames, always the last
    common.save_gif([f.clamp(-1, 1) for f in keep], os.path.join(out, "sampling.gif"), nrow=10)
    per_w, k = 2, len(GUIDANCE_SWEEP)  # rows: classes; columns: per_w samples at each w, sharing noise across w
    noise = torch.randn(len(classes), 1, per_w, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed + 1))
    noise = noise.expand(-1, k, -1, -1, -1, -1).reshape(-1, 3, 32, 32)
    w = torch.tensor(GUIDANCE_SWEEP, dtype=torch.float32).repeat_interleave(per_w).repeat(len(classes))
    sweep = generate(model, classes.repeat_interleave(k * per_w), args, device, 0, w=w, noise=noise)
    cols = [f"w={g}" if j == 0 else "" for g in GUIDANCE_SWEEP for j in range(per_w)]
    common.save_grid(sweep, os.path.join(out, "guidance.png"), nrow=k * per_w, scale=2, row_labels=names, col_labels=cols)


def save_samples(model, args, device, path):
    """args.num_samples samples, classes in turn, as uint8 (N, 3, 32, 32) + labels in an .npz (e.g. 50,000 for FID)."""
    classes = torch.tensor(args.classes or range(len(CLASSES)))
    labels = classes.repeat(args.num_samples // len(classes) + 1)[:args.num_samples]
    chunks = [generate(model, labels[i:i + args.batch_size], args, device, args.seed + 2 + i).cpu()
              for i in range(0, len(labels), args.batch_size)]
    common.save_samples_npz(path, torch.cat(chunks), labels.numpy())
    print(f"wrote {len(labels)} samples to {path}")


# ---------------------------------------------------------------------------------------- training
def train_step(model, opt, x, y, args, params):
    with autocast(x.device):
        loss = flow_matching_loss(model, x, y, args.label_dropout)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    opt.step()
    return loss


def train(args):
    rank, world, device = common.setup_ddp(args.device)
    if args.batch_size % world:
        raise common.UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over {world} processes")
    images, labels = common.load_dataset("cifar10", args.data_dir)
    if len(images) < args.batch_size:
        raise common.UserError(f"{args.data_dir} holds {len(images)} CIFAR-10 images, fewer than --batch-size {args.batch_size}")
    ckpt = common.load_checkpoint(args.resume, SCRIPT, vars(args), must_match=TRAINING_KEYS) if args.resume else None
    out = common.prepare_out(args.out)  # on every rank: each one raises the same error instead of waiting for rank 0
    images, labels = images.to(device), labels.to(device)  # the whole set on the device as uint8: batches by index

    common.seed_everything(args.seed + rank)  # each rank its own noise, times and label drops
    cuda = device.type == "cuda"
    net = UNet(args.channels).to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, fused=cuda)
    ema = copy.deepcopy(net).requires_grad_(False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))  # linear warm-up
    epoch, step, losses = 0, 0, []
    if ckpt:
        net.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        epoch, step, losses = ckpt["epoch"], ckpt["step"], ckpt["losses"]
        common.set_rank_rng_state(ckpt["rng"], args.seed + 1000 * epoch)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    model = torch.compile(model) if args.compile else model

    steps_per_epoch = len(images) // args.batch_size  # drop the last partial batch: every step sees a full global batch
    progress = common.Progress(args.epochs * steps_per_epoch, step, enabled=rank == 0)
    channels_last = torch.channels_last if cuda else torch.contiguous_format
    for epoch in range(epoch, args.epochs):
        net.train()
        epoch_losses = []  # kept on the device: no sync per step
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + epoch))  # same on all ranks
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size][rank::world].to(device)  # this rank's shard
            x = images[idx].float().div_(127.5).sub_(1).contiguous(memory_format=channels_last)
            if not args.no_flip:
                x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            loss = train_step(model, opt, x, labels[idx], args, net.parameters())
            sched.step()
            ema_update(ema, net, args.ema_decay)
            step += 1
            epoch_losses.append(loss.detach())
            progress.update(step, epoch_losses[-1], args.batch_size)  # rank 0's loss; read only when a line is printed
        epoch_losses = torch.stack(epoch_losses)
        if world > 1:  # one all_reduce an epoch: the history holds the mean over ranks of every step's loss
            dist.all_reduce(epoch_losses)
            epoch_losses /= world
        losses += epoch_losses.tolist()
        rngs = common.all_rng_states()
        if rank == 0:
            common.save_checkpoint(os.path.join(out, "last.pt"), {
                "script": SCRIPT, "config": vars(args), "model": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1, "step": step,
                "rng": rngs, "losses": losses})
            common.plot_curves(os.path.join(out, "loss.png"), {"flow matching loss": losses})
            write_figures(net if args.raw_weights else ema, args, out, device)
            print(f"epoch {epoch + 1}/{args.epochs}: mean loss {statistics.fmean(losses[-steps_per_epoch:]):.4f}; "
                  f"wrote {out}/last.pt, loss.png, classes.png, guidance.png, sampling.gif", flush=True)
    if rank == 0 and args.save_samples:
        save_samples(net if args.raw_weights else ema, args, device, args.save_samples)
    return net


# --------------------------------------------------------------------------------------- benchmark
def benchmark(args, device, rounds=10):
    """Training and sampling img/s of our U-Net and of diffusers' UNet2DModel, timed in alternation on this device.
    The best of `rounds` steps is reported: other processes' load only ever adds time."""
    try:
        models = {"ours (cifar_cfg.UNet)": UNet(args.channels), "diffusers UNet2DModel": DiffusersUNet(args.channels)}
    except common.UserError as e:
        print(f"{e}; timing ours alone")
        models = {"ours (cifar_cfg.UNet)": UNet(args.channels)}
    B, cuda = args.batch_size, device.type == "cuda"
    x = torch.randn(B, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)
    y = torch.randint(0, NULL, (B,), device=device)

    def prepare(m):  # a function of its own, so that each model's closures keep their own model and optimizer
        m = m.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, fused=cuda)
        fast = torch.compile(m) if args.compile else m
        field = guided_field(fast, y, args.cfg)
        return lambda: train_step(fast, opt, x, y, args, m.parameters()), lambda: ode_solve(field, x, 1, args.solver), m
    runs = {name: prepare(m) for name, m in models.items()}
    times = {name: ([], []) for name in runs}

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for r in range(rounds + 1):  # round 0 warms up (allocator, compile); then the models take turns, first in every other round
        for name, (step, solve, _) in list(runs.items())[::1 if r % 2 else -1]:
            t_train = timed(step)
            with torch.no_grad(), autocast(device):
                t_sample = timed(solve)
            if r:
                times[name][0].append(t_train)
                times[name][1].append(t_sample)
    precision = "bf16 autocast" if cuda else "fp32"
    print(f"device {device}, {precision}, batch {B}, best of {rounds} steps; sampling = {args.steps} {args.solver} steps with CFG")
    print(f"{'model':24s} {'params':>12s} {'train img/s':>12s} {'sample img/s':>13s}")
    for name, (train_t, sample_t) in times.items():
        n_params = sum(p.numel() for p in runs[name][2].parameters())
        print(f"{name:24s} {n_params:12,d} {B / min(train_t):12.3g} {B / (min(sample_t) * args.steps):13.3g}")
    if len(times) == 2:
        (ours_train, ours_sample), (ref_train, ref_sample) = times.values()
        print(f"ours / diffusers speed: training x{min(ref_train) / min(ours_train):.3f}, sampling x{min(ref_sample) / min(ours_sample):.3f}")


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (downloaded there when missing and online)")
    p.add_argument("--out", default=os.path.join("runs", SCRIPT), help="output folder: last.pt, loss.png, classes.png, guidance.png, sampling.gif")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (rank r of a torchrun job uses seed + r)")
    p.add_argument("--epochs", type=int, default=50, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split over torchrun processes; also the sampling batch")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=1000, help="linear LR warm-up steps (0: none)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability of replacing a label by the null class")
    p.add_argument("--ema-decay", type=float, default=0.9995,
                   help="EMA decay per step; 0.9995 averages over ~2,000 steps, 5 of the recipe's 50 epochs")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--channels", type=int, nargs=4, default=[64, 128, 256, 256], metavar="C",
                   help="U-Net width at the four resolutions (multiples of 32); the write-up's 64 128 256 256")
    p.add_argument("--solver", choices=["euler", "heun"], default="euler", help="ODE solver for sampling")
    p.add_argument("--steps", type=int, default=49, help="ODE steps; 49 is the write-up's grid torch.linspace(0, 1, 50)")
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale w (0: unconditional, 1: conditional)")
    p.add_argument("--classes", type=int, nargs="+", default=None, metavar="K",
                   help=f"classes (0-9) to sample, default all: {', '.join(f'{i} {c}' for i, c in enumerate(CLASSES))}")
    p.add_argument("--raw-weights", action="store_true", help="sample with the raw weights instead of the EMA")
    p.add_argument("--save-samples", default=None, metavar="FILE.npz", help="after training (or with --sample) write samples here")
    p.add_argument("--num-samples", type=int, default=50000, help="how many samples --save-samples writes")
    p.add_argument("--sample", default=None, metavar="CKPT", help="no training: load this checkpoint and write the figures")
    p.add_argument("--resume", default=None, metavar="CKPT", help="continue training from this checkpoint (model, EMA, optimizer, RNG...)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--benchmark", action="store_true", help="print training and sampling img/s, ours next to diffusers' UNet2DModel")
    args = p.parse_args(argv)
    common.check_positive(args, "epochs", "batch_size", "lr", "grad_clip", "steps", "num_samples")
    if args.cfg < 0:
        raise common.UserError(f"--cfg must be 0 or more (0 is unconditional), got {args.cfg}")
    if args.warmup < 0 or not 0 <= args.label_dropout < 1 or not 0 <= args.ema_decay < 1:
        raise common.UserError("--warmup must be >= 0, --label-dropout and --ema-decay in [0, 1)")
    if any(c % 32 for c in args.channels) or min(args.channels) <= 0:
        raise common.UserError(f"--channels must be positive multiples of 32 (GroupNorm uses 32 groups), got {args.channels}")
    if args.classes and not all(0 <= c < len(CLASSES) for c in args.classes):
        raise common.UserError(f"--classes takes indices 0 to 9, got {args.classes}")
    if args.save_samples:
        common.check_output_file(args.save_samples, "--save-samples")
    if args.sample and args.resume:
        raise common.UserError("pass either --sample CKPT (no training) or --resume CKPT, not both")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.benchmark:
        return benchmark(args, common.get_device(args.device))
    if not args.sample:
        return train(args)
    device = common.get_device(args.device)
    ckpt = common.load_checkpoint(args.sample, SCRIPT)
    args.channels = ckpt["config"]["channels"]  # the checkpoint decides the architecture
    out = common.prepare_out(args.out)
    if int(os.environ.get("RANK", 0)) > 0:  # under torchrun, rank 0 alone samples and writes the files
        return None
    model = UNet(args.channels).to(device)
    model.load_state_dict(ckpt["model"] if args.raw_weights else ckpt["ema"])
    write_figures(model, args, out, device)
    print(f"wrote {out}/classes.png, guidance.png, sampling.gif")
    if args.save_samples:
        save_samples(model, args, device, args.save_samples)
    return model


if __name__ == "__main__":
    common.run(main)
