"""Class-conditional flow matching with classifier-free guidance (CFG) on CIFAR-10, MNIST or Fashion-MNIST,
on a hand-written copy of the diffusers UNet2DModel of the write-up "Diffusion & Flow Matching Part 11:
Building an Image Generator".

The recipe (defaults): x_t = t*x + (1-t)*eps, t ~ U[0, 1] (t=0 noise, t=1 data), velocity target x - eps,
MSE; labels dropped to a null class (10) with probability 0.1; AdamW 2e-4, gradient clip 1, batch 128,
50 epochs; Euler on the write-up's grid linspace(0, 1, 50) with u = u_uncond + w * (u_cond - u_uncond),
w = 2, both halves in one forward. Beyond the write-up, as TorchCFM / EDM / JiT: an EMA of the weights,
flips of CIFAR-10, a linear LR warm-up, and Heun. 28 px MNIST and Fashion-MNIST are padded to 32 px.

    python cifar_cfg.py --data-dir data                        # the write-up's recipe (a GPU)
    python cifar_cfg.py --quick --dataset fashion              # the CPU recipe (see --quick)
    torchrun --nproc_per_node=4 cifar_cfg.py --data-dir data   # the same global batch over 4 GPUs
    python cifar_cfg.py --sample runs/cifar_cfg/last.pt --cfg 4 --save-samples s.npz
In a notebook (MNIST/Fashion models: noise of 1 channel; crop() gives their 28 px):
    model, config = load_model("runs/cifar_cfg/last.pt")
    images = generate(model, torch.randn(10, 3, 32, 32), torch.arange(10), cfg=2.0, steps=49)
"""
import argparse
import copy
import functools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "cifar_cfg"
WRITEUP_CHANNELS = (64, 128, 256, 256)  # the write-up's UNet2DModel widths: a network sized for a GPU
NULL = 10  # the null class of CFG: label 10 of the 11 class embeddings (each dataset here has 10 classes)
RES = 32  # the U-Net's input size: its three 2x down-samplings need a multiple of 8
TITLES = {"cifar10": "CIFAR-10", "mnist": "MNIST", "fashion": "Fashion-MNIST"}
GUIDANCE_SWEEP = (0, 1, 2, 4, 8)  # the write-up's table of guidance scales
# --quick: the recipe at CPU size (narrower network, one epoch, a larger lr with a short warm-up and EMA)
QUICK = dict(channels=[32, 32, 64, 64], epochs=1, batch_size=64, lr=1e-3, warmup=100, ema_decay=0.995)
# the settings that define a training run: --resume refuses a checkpoint trained otherwise (--epochs may grow)
TRAINING_KEYS = ("dataset", "channels", "batch_size", "lr", "warmup", "grad_clip", "label_dropout",
                 "ema_decay", "no_flip", "seed")


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
    with common.autocast(device, precision):
        x = ode_solve(lambda x_t, t: guided_velocity(model, x_t, t, y, cfg), noise.to(device), steps, solver,
                      on_step)
    return x.clamp(-1, 1)


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * theta, for every parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


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
        self.encoder = nn.ModuleList()  # a level per resolution: ResBlocks, their attention, a resampler
        for i, c in enumerate(channels):  # 32x32 -> 16 -> 8 (attention) -> 4
            res = nn.ModuleList(ResBlock(c_prev if j == 0 else c, c, emb_dim) for j in range(2))
            attn = nn.ModuleList([SelfAttention(c) for _ in range(2)] if i == 2 else [])
            down = nn.Conv2d(c, c, 3, stride=2, padding=1) if i < last else None
            self.encoder.append(nn.ModuleDict(dict(res=res, attn=attn, resample=down)))
            skips += [c] * (3 if i < last else 2)  # one skip per ResBlock, one after the downsampler
            c_prev = c
        self.mid_res1 = ResBlock(c_prev, c_prev, emb_dim)
        self.mid_attn = SelfAttention(c_prev)
        self.mid_res2 = ResBlock(c_prev, c_prev, emb_dim)
        self.decoder = nn.ModuleList()
        for i, c in enumerate(reversed(channels)):  # 4x4 -> 8 (attention) -> 16 -> 32; a skip per ResBlock
            res = nn.ModuleList()
            for _ in range(3):
                res.append(ResBlock(c_prev + skips.pop(), c, emb_dim))
                c_prev = c
            attn = nn.ModuleList([SelfAttention(c) for _ in range(3)] if i == 1 else [])
            up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))
            self.decoder.append(nn.ModuleDict(dict(res=res, attn=attn, resample=up if i < last else None)))
        self.out_norm = nn.GroupNorm(32, c0)
        self.conv_out = nn.Conv2d(c0, image_channels, 3, padding=1)

    def forward(self, x, t, y):
        """x: (B, C, 32, 32) in [-1, 1]; t: (B,) floats in [0, 1]; y: (B,) labels, NULL = unconditional."""
        emb = self.time_embed(timestep_embedding(t, self.conv_in.out_channels)) + self.class_embed(y)
        emb_act = F.silu(emb)  # every ResBlock starts its projection with SiLU: apply it once here
        h = self.conv_in(x)
        skips = [h]
        for level in self.encoder:
            for i, res in enumerate(level["res"]):
                h = res(h, emb_act)
                h = level["attn"][i](h) if len(level["attn"]) else h
                skips.append(h)
            if level["resample"] is not None:
                h = level["resample"](h)
                skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb_act)), emb_act)
        for level in self.decoder:
            for i, res in enumerate(level["res"]):
                h = res(torch.cat([h, skips.pop()], dim=1), emb_act)
                h = level["attn"][i](h) if len(level["attn"]) else h
            if level["resample"] is not None:
                h = level["resample"](h)
        return self.conv_out(F.silu(self.out_norm(h)))


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


def train(args, device, precision, sampling):
    rank, world = common.rank_and_world()
    run = common.Run(SCRIPT, args, TRAINING_KEYS)
    images, labels, shape = run.load(lambda: load_data(args.dataset, args.data_dir))
    images = images.to(device)  # the whole set on the device as uint8
    labels = labels.to(device)
    flip = args.dataset == "cifar10" and not args.no_flip  # flipped digits are other glyphs; shoes face left
    steps_per_epoch = len(images) // args.batch_size  # no last partial batch: every step sees a full batch
    if args.warmup > args.epochs * steps_per_epoch:
        print(f"note: --warmup {args.warmup} is longer than the run's {args.epochs * steps_per_epoch} steps, "
              f"so the learning rate never reaches --lr {args.lr:g}", flush=True)

    torch.manual_seed(args.seed + rank)  # each rank its own noise, times and label drops
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = UNet(args.channels, shape[0]).to(device, memory_format=layout)
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net  # broadcasts rank 0's weights
    ema = copy.deepcopy(net).requires_grad_(False)  # after DDP's broadcast: all EMAs = rank 0's
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    scaler = common.grad_scaler(device, precision)
    run.restore(model=net, ema=ema, optimizer=opt, scheduler=sched, scaler=scaler)
    model = torch.compile(model) if args.compile else model
    sample_net = net if args.raw_weights else ema
    sampler = torch.compile(sample_net) if args.compile else sample_net
    if rank == 0 and device.type == "cpu" and tuple(args.channels) == WRITEUP_CHANNELS:
        trial = copy.deepcopy(net)
        x = images[:args.batch_size // world].float() / 127.5 - 1
        step = functools.partial(train_step, trial, torch.optim.AdamW(trial.parameters()), scaler, x,
                                 labels[:len(x)], args.label_dropout, args.grad_clip, precision)
        common.estimate_time(step, (args.epochs - run.epoch) * steps_per_epoch, "for a CPU run pass --quick")

    for epoch in run.epochs(args.epochs, steps_per_epoch, args.batch_size):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + epoch))
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size][rank::world].to(device)  # rank's part
            x = images[idx].float().div_(127.5).sub_(1).contiguous(memory_format=layout)
            if flip:
                x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            y = labels[idx]
            loss = train_step(model, opt, scaler, x, y, args.label_dropout, args.grad_clip, precision)
            sched.step()
            ema_update(ema, net, args.ema_decay)
            run.log(loss, opt.param_groups[0]["lr"])
        run.save(image_shape=shape)
        if rank == 0:
            common.plot_curves(os.path.join(args.out, "loss.png"), {"loss": run.losses},
                               title=f"{TITLES[args.dataset]}: loss per step")
            write_figures(sampler, args, args.dataset, shape, sampling)
    if args.save_samples:
        write_samples(sampler, args, args.dataset, shape, sampling)
    return net


# ----------------------------------------------------------------------------------------- figures
def write_figures(model, args, dataset, shape, sampling):
    """classes.png: one row per class of --classes (10 samples each); guidance.png: the same noise at w = 0,
    1, 2, 4, 8; sampling.gif: x_t along the ODE for the class grid, from the noise to the samples."""
    classes = torch.tensor(args.classes or range(NULL))
    seed = args.seed
    names = [common.CLASS_NAMES[dataset][c] for c in classes]
    what = f"{TITLES[dataset]}, {sampling['steps']} {sampling['solver']} steps"
    noise = torch.randn(10 * len(classes), shape[0], RES, RES, generator=torch.Generator().manual_seed(seed))
    frames = [noise]
    grid = generate(model, noise, classes.repeat_interleave(10), **sampling, on_step=frames.append)
    common.save_grid(crop(grid, shape), os.path.join(args.out, "classes.png"), nrow=10, scale=2,
                     row_labels=names, title=f"{what}, w={sampling['cfg']:g}")
    keep = frames[::max(1, len(frames) // 24)][:-1] + frames[-1:]  # at most ~25 frames, always the last
    frames = [crop(f.cpu(), shape).clamp(-1, 1) for f in keep]
    title = f"{what}, w={sampling['cfg']:g}: x_t from t=0 to 1"
    common.save_gif(frames, os.path.join(args.out, "sampling.gif"), nrow=10, title=title)
    per_w, k = 2, len(GUIDANCE_SWEEP)  # rows: classes; columns: per_w samples at each w, same noise at each w
    noise = torch.randn(len(classes), 1, per_w, shape[0], RES, RES,
                        generator=torch.Generator().manual_seed(seed + 1))
    noise = noise.expand(-1, k, -1, -1, -1, -1).reshape(-1, shape[0], RES, RES)
    w = torch.tensor(GUIDANCE_SWEEP, dtype=torch.float32).repeat_interleave(per_w).repeat(len(classes))
    sweep = generate(model, noise, classes.repeat_interleave(k * per_w), **dict(sampling, cfg=w))
    cols = [f"w={g}" if j == 0 else "" for g in GUIDANCE_SWEEP for j in range(per_w)]
    common.save_grid(crop(sweep, shape), os.path.join(args.out, "guidance.png"), nrow=k * per_w, scale=2,
                     row_labels=names, col_labels=cols, title=f"{what}: the same noise at each guidance w")


def write_samples(model, args, dataset, shape, sampling):
    """--save-samples: --num-samples samples, --classes in turn."""
    classes = args.classes or list(range(NULL))
    labels = [classes[j % len(classes)] for j in range(args.num_samples)]
    make = lambda noise, y: crop(generate(model, noise, y, **sampling), shape)  # at the data's own size
    common.save_samples(args.save_samples, make, args.num_samples, args.batch_size, (shape[0], RES, RES),
                        labels, args.seed, f"--dataset {dataset} --data-dir {args.data_dir}")


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


# ------------------------------------------------------------------------------------ a trained model
def load_model(path, device="cpu", ema=True):
    """A trained model for a notebook, in eval mode, and its config: the training flags plus image_shape, the
    data's (C, H, W) (28 px data was padded to 32: crop generate's output). ema=False: the raw weights."""
    ckpt = common.load_checkpoint(path, SCRIPT)
    config = dict(ckpt["config"], image_shape=ckpt["image_shape"])
    model = UNet(config["channels"], config["image_shape"][0]).to(device)
    common.load_state(model, ckpt["ema"] if ema else ckpt["model"], f"the weights of {path}")
    return model.eval(), config


def sample(args, device, sampling):
    """--sample: --save-samples (split over torchrun ranks), then the figures (rank 0), from a checkpoint."""
    model, config = load_model(args.sample, device, ema=not args.raw_weights)
    common.prepare_out(args.out)
    sampler = torch.compile(model) if args.compile else model
    if args.save_samples:
        write_samples(sampler, args, config["dataset"], config["image_shape"], sampling)
    if common.rank_and_world()[0] == 0:
        write_figures(sampler, args, config["dataset"], config["image_shape"], sampling)
    return model


def benchmark(args, device):
    """Training and sampling img/s on random CIFAR-shaped batches, eager (and with --compile, compiled)."""
    precision = common.precision_for(args.precision, device)
    x = torch.randn(args.batch_size, 3, RES, RES, device=device)
    y = torch.randint(0, NULL, (args.batch_size,), device=device)
    rows = {}
    for name in ["eager", "compiled"] if args.compile else ["eager"]:
        net = UNet(args.channels).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr, fused=device.type == "cuda")
        fast = torch.compile(net) if name == "compiled" else net
        step = functools.partial(train_step, fast, opt, common.grad_scaler(device, precision), x, y,
                                 args.label_dropout, args.grad_clip, precision)
        sample = functools.partial(generate, fast, x, y, args.cfg, args.steps, args.solver, precision)
        rows[name] = (step, sample, args.batch_size)
    print(f"UNet {args.channels}, {precision}, batch {args.batch_size}; sampling: {args.steps} {args.solver} "
          f"steps with CFG")
    return common.benchmark(rows, device)


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("--dataset", choices=["cifar10", "mnist", "fashion"], default="cifar10",
        help="training data; 28 px MNIST and Fashion-MNIST are padded to 32 px")
    add("--data-dir", default="data", help="holds cifar-10-batches-py/, MNIST/raw/ or FashionMNIST/raw/ "
        "(downloaded if online)")
    common.add_run_flags(p, SCRIPT, num_samples=50000)
    quick = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
    add("--quick", action="store_true", help=f"the CPU recipe: {quick}; a flag given explicitly still wins")
    add("--epochs", type=int, default=50, help="training epochs")
    add("--batch-size", type=int, default=128, help="global batch, split over torchrun processes")
    add("--lr", type=float, default=2e-4, help="AdamW learning rate")
    add("--warmup", type=int, default=1000, help="linear LR warm-up steps (0: none)")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    add("--label-dropout", type=float, default=0.1, help="probability of dropping a label to null")
    add("--ema-decay", type=float, default=0.9995, help="EMA decay per step")
    add("--no-flip", action="store_true", help="no random horizontal flips (only CIFAR-10 is flipped)")
    add("--channels", type=int, nargs=4, default=list(WRITEUP_CHANNELS), metavar="C",
        help="U-Net width at the four resolutions, multiples of 32 (GroupNorm has 32 groups)")
    add("--solver", choices=["euler", "heun"], default="euler", help="ODE solver for sampling")
    add("--steps", type=int, default=49, help="ODE steps; 49: the write-up's linspace(0, 1, 50)")
    add("--cfg", type=float, default=2.0, help="guidance scale w (0: unconditional, 1: conditional)")
    add("--classes", type=int, nargs="+", metavar="K", help="classes (0-9) to sample; all ten when not given")
    add("--raw-weights", action="store_true", help="sample with the raw weights, not the EMA")
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def validate(args):
    common.check_run_flags(args)
    common.check_positive(args, "lr", "grad_clip")
    if args.no_flip and args.dataset != "cifar10":
        raise common.UserError(f"--no-flip: {args.dataset} images are never flipped; drop it")
    common.check_range(args, "cfg", 0, 100)
    if args.warmup < 0 or not 0 <= args.label_dropout < 1 or not 0 <= args.ema_decay < 1:
        raise common.UserError("--warmup must be >= 0, --label-dropout and --ema-decay in [0, 1)")
    if any(c % 32 for c in args.channels) or not 0 < min(args.channels) <= max(args.channels) <= 4096:
        raise common.UserError(f"--channels must be multiples of 32 from 32 to 4096, got {args.channels}")
    if args.classes and not all(0 <= c < NULL for c in args.classes):
        raise common.UserError(f"--classes takes indices 0 to 9, got {args.classes}")
    return args


def main(argv=None):
    args = validate(parse_args(argv))
    if args.benchmark:
        return benchmark(args, common.get_device(args.device))
    rank, world, device = common.setup_ddp(args.device)
    precision = common.precision_for(args.precision, device, print if rank == 0 else lambda line: None)
    sampling = dict(cfg=args.cfg, steps=args.steps, solver=args.solver, precision=precision)
    if args.sample:
        return sample(args, device, sampling)
    return train(args, device, precision, sampling)


if __name__ == "__main__":
    common.run(main)
