"""CS180 Project 5, Part B on MNIST: a hand-written U-Net, from a one-step denoiser to class-conditioned flow matching with CFG.

Reproduces Part B (flow-matching version) of UC Berkeley CS180 Project 5 "Diffusion Models & Flow Matching", with the course's
U-Net and numbers, plus the trajectory and velocity figures of the "From noise to images" flow-matching notebook.
Four parts, each runnable alone with --part (default: all, in this order):
  denoise  single-step denoiser at sigma=0.5 (D=128, batch 256, Adam 1e-4, 5 epochs), its out-of-distribution sigma sweep
  noise    the same denoiser fed pure noise: MSE makes it regress to the dataset mean
  fm       time-conditioned flow matching (D=64, batch 64, Adam 1e-2, ExponentialLR to 0.1*lr over 10 epochs), Euler sampler
  cfg      class-conditioned flow matching, one-hot dropped with p=0.1, classifier-free guidance w=5; plus the no-scheduler ablation
--quick runs the same parts with small nets on 10,000 images (guidance w=3), for a CPU.

Conventions (shared by every script of this project):
  - images are in [-1, 1] inside the model. CS180 noises [0, 1] images as x + sigma*z; on [-1, 1] that same noisy image is x + 2*sigma*z,
    which is what part `denoise` uses, so its sigma values mean exactly what they mean in CS180.
  - time: t=0 is noise, t=1 is data: x_t = t*x + (1-t)*eps, velocity target v = x - eps, sampling integrates dx/dt = v from 0 to 1.
    Seed 003 runs the other way (its x_t = (1-s)*x + s*eps, target eps - x, integrated from s=1 down to 0): s = 1 - t, its velocity is
    minus ours, and its backward Euler steps are our forward ones, so both produce the same samples.
  - CFG: u = u_uncond + w * (u_cond - u_uncond), with cond and uncond in one batched forward; the null class is the all-zero one-hot.

Outputs go to --out (default runs/mnist_unet/): one checkpoint per run (<run>.pt: model, optimizer, scheduler, epoch, step, RNG, losses;
no EMA, as in the recipe), the figures named in the README, and --save-samples FILE.npz (uint8 `images` N x 1 x 28 x 28, `labels`;
-1 for the unconditional fm model).

  python mnist_unet.py                                  # the whole CS180 recipe (sized for a GPU; on a CPU it says how long)
  python mnist_unet.py --quick                          # CPU preset: readable class-conditioned digits in ~10 minutes on 2 cores
  python mnist_unet.py --part cfg --cfg 3 --steps 100   # one part, other guidance and step count
  python mnist_unet.py --sample runs/mnist_unet/cfg.pt --num-samples 1000 --save-samples cfg.npz
  python mnist_unet.py --resume runs/mnist_unet/cfg.pt  # continue an interrupted run, then the rest of its --part (same flags)
  python mnist_unet.py --benchmark                      # training and sampling img/s on this device
"""
import argparse
import contextlib
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "mnist_unet"

# ------------------------------------------------------------------------------------------- config
RECIPE = {  # the CS180 numbers, per part
    "denoise": dict(hidden=128, batch_size=256, lr=1e-4, epochs=5),
    "noise": dict(hidden=128, batch_size=256, lr=1e-4, epochs=5),
    "fm": dict(hidden=64, batch_size=64, lr=1e-2, epochs=10),
    "cfg": dict(hidden=64, batch_size=64, lr=1e-2, epochs=10),
}
# --quick: the same method scaled to ~10 minutes on a 2-core CPU. Narrower nets (the cost grows as D^2), a fixed 10,000-image
# training subset (so the time does not depend on the dataset size), most of the budget on the class-conditioned model,
# and no no-scheduler ablation (it would double that budget).
QUICK = {
    "denoise": dict(hidden=32, batch_size=64, lr=1e-3, epochs=1),
    "noise": dict(hidden=32, batch_size=64, lr=1e-3, epochs=1),
    "fm": dict(hidden=32, batch_size=64, lr=1e-2, epochs=3),
    "cfg": dict(hidden=32, batch_size=64, lr=1e-2, epochs=10),
}
QUICK_IMAGES = 10_000
RUNS = {"denoise": ["denoise"], "noise": ["noise"], "fm": ["fm"], "cfg": ["cfg", "cfg_nosched"]}
SIGMA = 0.5                                     # the denoiser's training noise level
SIGMAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]    # noising grid and out-of-distribution sweep
GUIDANCE = [0, 1, 3, 5, 7]                      # guidance sweep
CFG_W = 5.0        # the recipe's guidance scale
# Guidance trades diversity for fidelity. On the small --quick model, w=5 draws near-copies of one bold digit per class, w=2
# misdraws some; w=3 keeps every digit readable with more varied strokes (measured: docs/mnist_unet in the README).
QUICK_CFG_W = 3.0
P_UNCOND = 0.1                                  # probability of dropping the class during training
NUM_CLASSES = 10
MUST_MATCH = ("quick", "hidden", "epochs", "batch_size", "lr")  # what --resume needs to be the same run


def part_of(run):
    return run.split("_")[0]


def settings(args, run):
    """The run's hidden/batch_size/lr/epochs: the recipe (or --quick preset), with any flag given overriding it."""
    s = dict((QUICK if args.quick else RECIPE)[part_of(run)])
    s.update({k: getattr(args, k) for k in s if getattr(args, k) is not None})
    return s


# --------------------------------------------------------------------------------------------- data
def load_mnist(args, device):
    """MNIST as uint8 tensors on the device (normalised per batch, on the device); the test split is for figures only."""
    x, y = common.load_dataset("mnist", args.data_dir, train=True)
    if args.quick:
        x, y = x[:QUICK_IMAGES], y[:QUICK_IMAGES]
    x_test, _ = common.load_dataset("mnist", args.data_dir, train=False)
    return x.to(device), y.to(device), x_test[:64].to(device)


def normalise(x_uint8):
    return x_uint8.float() / 127.5 - 1


# -------------------------------------------------------------------------------------------- model
def conv(c_in, c_out, stride=1):  # Conv (stride 1) or DownConv (stride 2): 3x3 conv + BN + GELU
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.GELU())


def up_conv(c_in, c_out):  # doubles the resolution
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.GELU())


def conv_block(c_in, c_out):
    return nn.Sequential(conv(c_in, c_out), conv(c_out, c_out))


def down_block(c_in, c_out):
    return nn.Sequential(conv(c_in, c_out, stride=2), conv_block(c_out, c_out))


def up_block(c_in, c_out):
    return nn.Sequential(up_conv(c_in, c_out), conv_block(c_out, c_out))


def fc_block(f_in, f_out):
    return nn.Sequential(nn.Linear(f_in, f_out), nn.GELU(), nn.Linear(f_out, f_out))


class UNet(nn.Module):
    """The CS180 U-Net. cond='none': f(x) (the denoisers); 'time': f(x, t), the bottleneck and up1 scaled by FC(t);
    'class': f(x, t, c) with c a one-hot (all zeros = unconditional): u0 = c1*u0 + t1, up1 = c2*up1 + t2."""

    def __init__(self, hidden, cond="none"):
        super().__init__()
        D, self.cond = hidden, cond
        self.e0, self.e1, self.e2 = conv_block(1, D), down_block(D, D), down_block(D, 2 * D)        # 28, 14, 7
        self.flatten = nn.Sequential(nn.AvgPool2d(7), nn.GELU())                                   # 7 -> 1
        self.unflatten = nn.Sequential(nn.ConvTranspose2d(2 * D, 2 * D, 7, 7), nn.BatchNorm2d(2 * D), nn.GELU())
        self.up1, self.up2 = up_block(4 * D, D), up_block(2 * D, D)                                # 14, 28
        self.head = nn.Sequential(conv_block(2 * D, D), nn.Conv2d(D, 1, 3, 1, 1))
        if cond != "none":
            self.fc1_t, self.fc2_t = fc_block(1, 2 * D), fc_block(1, D)
        if cond == "class":
            self.fc1_c, self.fc2_c = fc_block(NUM_CLASSES, 2 * D), fc_block(NUM_CLASSES, D)

    def forward(self, x, t=None, c=None):
        e0 = self.e0(x)
        e1 = self.e1(e0)
        e2 = self.e2(e1)
        u0 = self.unflatten(self.flatten(e2))
        if self.cond != "none":
            t1, t2 = (fc(t[:, None].to(x.dtype))[:, :, None, None] for fc in (self.fc1_t, self.fc2_t))
        if self.cond == "time":
            u0 = u0 * t1
        elif self.cond == "class":
            c1, c2 = (fc(c.to(x.dtype))[:, :, None, None] for fc in (self.fc1_c, self.fc2_c))
            u0 = c1 * u0 + t1
        u1 = self.up1(torch.cat([e2, u0], 1))
        if self.cond == "time":
            u1 = u1 * t2
        elif self.cond == "class":
            u1 = c2 * u1 + t2
        u2 = self.up2(torch.cat([e1, u1], 1))
        return self.head(torch.cat([e0, u2], 1))


def make_model(run, hidden, device, compile_model=False):
    cond = {"denoise": "none", "noise": "none", "fm": "time", "cfg": "class"}[part_of(run)]
    model = UNet(hidden, cond).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model.compile()  # in place, so state_dict keys stay plain
    return model


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- loss
def flow_path(x, eps, t):
    """x_t = t*x + (1-t)*eps and its velocity dx_t/dt = x - eps (t=0 noise, t=1 data)."""
    t = t.view(-1, 1, 1, 1)
    return t * x + (1 - t) * eps, x - eps


def loss_fn(run, model, x, y):
    part, eps = part_of(run), torch.randn_like(x)
    if part == "denoise":
        return F.mse_loss(model(x + 2 * SIGMA * eps), x)   # CS180's x + sigma*z on [0, 1] images, see the docstring
    if part == "noise":
        return F.mse_loss(model(eps), x)                   # no information about x in the input: the optimum is E[x]
    t = torch.rand(len(x), device=x.device)
    x_t, v = flow_path(x, eps, t)
    c = None
    if part == "cfg":  # drop the class per sample (all-zero one-hot) so the same net also learns u_uncond
        keep = torch.rand(len(x), device=x.device) >= P_UNCOND
        c = F.one_hot(y, NUM_CLASSES).float() * keep[:, None]
    return F.mse_loss(model(x_t, t, c), v)


# ------------------------------------------------------------------------------------------ sampler
def velocity_field(model, labels=None, w=1.0):
    """v(x, t) of a flow model; with labels, the CFG velocity u_uncond + w*(u_cond - u_uncond) from one batched forward."""
    def v(x, t):
        t = torch.full((len(x),), t, device=x.device)
        with autocast(x.device):
            if labels is None:
                return model(x, t).float()
            c = F.one_hot(labels, NUM_CLASSES).float()
            u_cond, u_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, torch.zeros_like(c)])).float().chunk(2)
        return u_uncond + w * (u_cond - u_uncond)
    return v


@torch.no_grad()
def euler(v, x, steps):
    """Integrate dx/dt = v(x, t) from t=0 (noise) to t=1 (data) in equal steps; returns every state x_0 .. x_steps."""
    path, dt = [x], 1.0 / steps
    for i in range(steps):
        x = x + dt * v(x, i * dt)
        path.append(x)
    return path


@torch.no_grad()
def generate(model, labels, n, steps, w, gen, device):
    """n samples from fixed noise (gen: a private generator, so figures never disturb the training RNG stream)."""
    model.eval()
    noise = torch.randn(n, 1, 28, 28, generator=gen).to(device)
    return euler(velocity_field(model, labels, w), noise, steps)


# ----------------------------------------------------------------------------------------- training
def train_step(run, model, opt, x_uint8, y):
    x = normalise(x_uint8)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device):
        loss = loss_fn(run, model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def make_optimizer(run, model, s, device):
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"], fused=device.type == "cuda")
    # fm/cfg: ExponentialLR stepped per epoch with gamma = 0.1**(1/epochs), so the LR ends at 0.1*lr; the ablation keeps lr fixed
    sched = (torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1 / s["epochs"]))
             if part_of(run) in ("fm", "cfg") and run != "cfg_nosched" else None)
    return opt, sched


def train_run(run, args, data, device, out, history, ckpt=None):
    """Train one run to its last epoch, writing its checkpoint every epoch and its figures; returns the model."""
    s = settings(args, run)
    common.seed_everything(args.seed)  # per run, so `--part cfg` trains the same cfg model as `--part all`
    model = make_model(run, s["hidden"], device, args.compile)
    opt, sched = make_optimizer(run, model, s, device)
    x_train, y_train, x_test = data
    epoch, step, losses = 0, 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        epoch, step, losses = ckpt["epoch"], ckpt["step"], list(ckpt["losses"])
        common.set_rng_state(ckpt["rng"])
        print(f"[{run}] resuming after epoch {epoch} (step {step})")
    B = min(s["batch_size"], len(x_train))
    steps_per_epoch = len(x_train) // B  # the ragged tail of each shuffle is dropped
    progress = common.Progress(s["epochs"] * steps_per_epoch, step, prefix=f"[{run}] ")
    for epoch in range(epoch + 1, s["epochs"] + 1):
        model.train()
        perm = torch.randperm(len(x_train)).to(device)
        epoch_losses = []
        for i in range(steps_per_epoch):
            idx = perm[i * B:(i + 1) * B]
            loss = train_step(run, model, opt, x_train[idx], y_train[idx])
            step += 1
            epoch_losses.append(loss)
            progress.update(step, loss, B)  # the loss tensor is only read (synced) when a line is printed
        losses += torch.stack(epoch_losses).float().tolist()
        if sched is not None:
            sched.step()
        common.save_checkpoint(os.path.join(out, f"{run}.pt"), {
            "script": SCRIPT, "config": vars(args), "run": run, "settings": s, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
            "epoch": epoch, "step": step, "rng": common.rng_state(), "losses": losses})
        print(f"[{run}] epoch {epoch}/{s['epochs']}: mean loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.4f}", flush=True)
        epoch_figures(run, model, epoch, s["epochs"], x_test, args, out)
    history[run] = losses
    final_figures(run, model, x_train, x_test, args, out, history)
    return model


# ------------------------------------------------------------------------------------------ figures
def private_gen(seed):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def denoise_rows(model, x, sigmas, gen):
    """For each sigma: the noisy digits x + 2*sigma*z and (with a model) their one-step denoising."""
    rows = []
    for sigma in sigmas:
        noisy = x + 2 * sigma * torch.randn(x.shape, generator=gen).to(x.device)
        rows.append(noisy)
        if model is not None:
            with autocast(x.device):
                rows.append(model(noisy).float())
    return torch.cat(rows)


def class_labels(n, device):
    return torch.arange(n, device=device) % NUM_CLASSES


def epoch_figures(run, model, epoch, epochs, x_test, args, out):
    """The figures the recipe asks for after epochs 1, E/2 and E (the denoiser: 1 and E; the ablation: its last)."""
    part, device = part_of(run), x_test.device
    wanted = {"denoise": {1, epochs}, "noise": set(), "fm": {1, math.ceil(epochs / 2), epochs},
              "cfg": {1, math.ceil(epochs / 2), epochs}, "cfg_nosched": {epochs}}[run]
    if epoch not in wanted:
        return
    path = os.path.join(out, f"{run}_epoch{epoch}.png")
    if part == "denoise":
        model.eval()
        x = normalise(x_test[:10])
        rows = torch.cat([x, denoise_rows(model, x, [SIGMA], private_gen(args.seed))])
        common.save_grid(rows, path, nrow=10, scale=2, row_labels=["clean", f"s={SIGMA}", "denoised"])
    elif part == "fm":
        samples = generate(model, None, 40, args.steps, 1.0, private_gen(args.seed), device)[-1]
        common.save_grid(samples, path, nrow=10, scale=2)
    else:  # 4 samples per digit, one column per digit
        samples = generate(model, class_labels(40, device), 40, args.steps, args.cfg, private_gen(args.seed), device)[-1]
        common.save_grid(samples, path, nrow=10, scale=2, col_labels=[str(k) for k in range(NUM_CLASSES)])


def final_figures(run, model, x_train, x_test, args, out, history):
    part, device, gen = part_of(run), x_test.device, private_gen(args.seed + 1)
    model.eval()
    curves = {run: history[run]}
    if run == "cfg_nosched" and "cfg" in history:
        curves = {"cfg_nosched (constant lr)": history[run], "cfg (ExponentialLR)": history["cfg"]}
    common.plot_curves(os.path.join(out, f"{run}_loss.png"), curves, title=f"{run}: training loss (MSE)")
    f = lambda name: os.path.join(out, f"{run}_{name}.png")
    if part == "denoise":  # one column per sigma; one row per digit (noising), or noisy/denoised row pairs (ood)
        x, S = normalise(x_test[:4]), len(SIGMAS)
        by_digit = lambda rows: rows.view(S, -1, 4, 1, 28, 28).permute(2, 1, 0, 3, 4, 5).flatten(0, 2)
        sigmas = [f"s={s}" for s in SIGMAS]
        common.save_grid(by_digit(denoise_rows(None, x, SIGMAS, gen)), f("noising"), nrow=S, scale=2, col_labels=sigmas)
        common.save_grid(by_digit(denoise_rows(model, x, SIGMAS, private_gen(args.seed + 1))), f("ood"), nrow=S, scale=2,
                         col_labels=sigmas, row_labels=["noisy", "out"] * 4)
    elif part == "noise":
        z = torch.randn(9, 1, 28, 28, generator=gen).to(device)
        with torch.no_grad(), autocast(device):
            f_z = model(z).float()
        mean = torch.cat([normalise(x_train[i:i + 1024]) for i in range(0, len(x_train), 1024)]).mean(0, keepdim=True)
        print(f"[noise] RMS distance of the outputs to the dataset mean: {(f_z - mean).pow(2).mean().sqrt():.3f} "
              f"(to a random training digit: {(f_z - normalise(x_train[:9])).pow(2).mean().sqrt():.3f})")
        common.save_grid(torch.cat([z, f_z, mean]), f("samples"), nrow=9, scale=2, row_labels=["z", "f(z)", "mean"])
    elif part == "fm":
        x, eps = normalise(x_test[:1]), torch.randn(1, 1, 28, 28, generator=gen).to(device)
        ts = torch.linspace(0, 1, 11, device=device)
        common.save_grid(flow_path(x.expand(11, -1, -1, -1), eps.expand(11, -1, -1, -1), ts)[0], f("path"), nrow=11,
                         scale=2, col_labels=[f"{t:.1f}" for t in ts.tolist()])
        x = normalise(x_test[:8])
        x_t, v = flow_path(x, torch.randn(x.shape, generator=gen).to(device), torch.full((8,), 0.5, device=device))
        v_pred = velocity_field(model)(x_t, 0.5)
        # velocities span about [-3, 3]: shown halved, so grey is 0
        common.save_grid(torch.cat([x, x_t, v / 2, v_pred / 2, (v_pred - v) / 2]), f("velocity"), nrow=8, scale=2,
                         row_labels=["x", "x_0.5", "x-eps", "v_pred", "error"])
    if run in ("fm", "cfg"):  # trajectory: rows = samples, columns = t; and the same as a GIF
        labels = class_labels(10, device) if part == "cfg" else None
        path = generate(model, labels, 10, args.steps, args.cfg, gen, device)
        cols = sorted({round(i * args.steps / 10) for i in range(11)})
        frames = torch.stack([path[i] for i in cols], 1).flatten(0, 1)
        common.save_grid(frames, f("trajectory"), nrow=len(cols), scale=2,
                         col_labels=[f"{i / args.steps:.1f}" for i in cols])
        common.save_gif(path, f("trajectory").replace(".png", ".gif"), nrow=10, scale=2)
    if run == "cfg":  # same noise in every row, so rows differ only by w
        noise_gen, rows = private_gen(args.seed + 2), []
        for w in GUIDANCE:
            noise_gen.manual_seed(args.seed + 2)
            rows.append(generate(model, class_labels(20, device), 20, args.steps, w, noise_gen, device)[-1])
        common.save_grid(torch.cat(rows), f("guidance"), nrow=20, scale=2, row_labels=[f"w={w}" for w in GUIDANCE])


# ------------------------------------------------------------------------------ speed and sampling
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_speed(run, s, args, device, steps):
    """Training img/s of a fresh model on random uint8 digits (content does not change the speed); the first step warms up."""
    model = make_model(run, s["hidden"], device, args.compile)
    opt, _ = make_optimizer(run, model, s, device)
    x = torch.randint(0, 256, (s["batch_size"], 1, 28, 28), dtype=torch.uint8, device=device)
    y = torch.randint(0, NUM_CLASSES, (s["batch_size"],), device=device)
    for i in range(steps + 1):
        if i == 1:
            sync(device)
            start = time.time()
        train_step(run, model, opt, x, y)
    sync(device)
    return s["batch_size"] * steps / (time.time() - start), model


def benchmark(args, device):
    print(f"device {device}, {torch.get_num_threads()} CPU threads, --steps {args.steps}")
    print("| run | D | batch | train img/s | sample img/s |\n|---|---|---|---|---|")
    for run in [r for p in RUNS for r in RUNS[p] if r != "cfg_nosched"]:
        s = settings(args, run)
        train_ips, model = train_speed(run, s, args, device, steps=20 if device.type == "cuda" else 3)
        sample_ips = "-"
        if part_of(run) in ("fm", "cfg"):
            n = 256 if device.type == "cuda" else 32
            labels = class_labels(n, device) if part_of(run) == "cfg" else None
            generate(model, labels, n, 2, args.cfg, private_gen(0), device)  # warm-up
            sync(device)
            start = time.time()
            generate(model, labels, n, args.steps, args.cfg, private_gen(0), device)
            sync(device)
            sample_ips = f"{n / (time.time() - start):.0f}"
        print(f"| {run} | {s['hidden']} | {s['batch_size']} | {train_ips:.0f} | {sample_ips} |", flush=True)


def estimate_time(runs, args, device, n_train):
    """On a CPU, time two steps of each run and say how long the whole thing will take here."""
    total = 0.0
    for run in runs:
        s = settings(args, run)
        total += s["epochs"] * (n_train // min(s["batch_size"], n_train)) * s["batch_size"] / train_speed(run, s, args, device, 2)[0]
    print(f"note: this is the GPU-sized CS180 recipe; on this CPU its training alone will take about {common.format_time(total)} "
          f"(from 2 timed steps per run). For a CPU run of about 10 minutes use --quick.", flush=True)


def save_samples(model, run, args, device, path):
    labels = class_labels(args.num_samples, device) if part_of(run) == "cfg" else None
    chunks = []
    for i in range(0, args.num_samples, 500):  # bounded memory for large N
        n = min(500, args.num_samples - i)
        chunk_labels = None if labels is None else labels[i:i + n]
        chunks.append(generate(model, chunk_labels, n, args.steps, args.cfg, private_gen(args.seed + 3 + i), device)[-1].cpu())
    images = torch.cat(chunks)
    common.save_samples_npz(path, images, labels.cpu() if labels is not None else torch.full((len(images),), -1))
    print(f"wrote {len(images)} samples of {run} to {path}")
    return images, labels


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags left unset use the CS180 recipe of each part (or the --quick preset).")
    p.add_argument("--part", choices=["denoise", "noise", "fm", "cfg", "all"], default="all", help="which part to run (default: all four)")
    p.add_argument("--quick", action="store_true", help=f"CPU preset: D=32, {QUICK_IMAGES} training images, fewer epochs, no ablation (~10 min on 2 cores)")
    p.add_argument("--epochs", type=int, help="epochs per run (recipe: denoise/noise 5, fm/cfg 10)")
    p.add_argument("--batch-size", type=int, help="batch size (recipe: denoise/noise 256, fm/cfg 64)")
    p.add_argument("--lr", type=float, help="Adam learning rate (recipe: denoise/noise 1e-4, fm/cfg 1e-2)")
    p.add_argument("--hidden", type=int, help="U-Net width D (recipe: denoise/noise 128, fm/cfg 64)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps when sampling (default 50)")
    p.add_argument("--cfg", type=float, help=f"guidance scale w of the class-conditioned model (default {CFG_W:g}, --quick {QUICK_CFG_W:g}; "
                   "1 = no guidance)")
    p.add_argument("--out", default=os.path.join("runs", SCRIPT), help="output folder (default runs/mnist_unet)")
    p.add_argument("--data-dir", default="data", help="torchvision MNIST root holding MNIST/raw/*-ubyte (downloaded there if absent)")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; slower start, faster steps)")
    p.add_argument("--resume", metavar="CKPT", help="continue the interrupted run that wrote CKPT, then the runs of its --part "
                   "still to come (pass the same flags as before)")
    p.add_argument("--sample", metavar="CKPT", help="no training: sample from an fm/cfg checkpoint into --out/samples.png")
    p.add_argument("--num-samples", type=int, default=100, help="samples for --sample/--save-samples (default 100; cfg: labels 0..9 cycled)")
    p.add_argument("--save-samples", metavar="FILE.npz", help="also write the samples of the last fm/cfg model trained (or of --sample CKPT) "
                   "as .npz for outside evaluation")
    p.add_argument("--benchmark", action="store_true", help="print training and sampling img/s on this device and exit")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cfg is None:
        args.cfg = QUICK_CFG_W if args.quick else CFG_W
    # everything is validated before anything is written
    common.check_positive(args, "epochs", "steps", "batch_size", "lr", "hidden", "num_samples")
    if args.resume and args.sample:
        raise common.UserError("pass either --resume (continue training) or --sample (sampling only), not both")
    if args.save_samples and not args.save_samples.endswith(".npz"):
        raise common.UserError(f"--save-samples {args.save_samples} must name a .npz file")
    if args.save_samples and os.path.dirname(os.path.abspath(args.save_samples)) != os.path.abspath(args.out):
        common.check_output_file(args.save_samples, "--save-samples")  # a file inside --out is checked with --out
    device = common.get_device(args.device)
    if args.benchmark:
        return benchmark(args, device)
    ckpt = None
    if args.sample or args.resume:
        ckpt = common.load_checkpoint(args.sample or args.resume, SCRIPT, vars(args), () if args.sample else MUST_MATCH)
    if args.sample and part_of(ckpt["run"]) not in ("fm", "cfg"):
        raise common.UserError(f"{args.sample} holds the {ckpt['run']} denoiser, which cannot sample; pass an fm or cfg checkpoint")
    if args.resume:  # go on with the --part the checkpoint belongs to, as if it had never stopped
        args.part = ckpt["config"]["part"]
    runs = [r for p in (RUNS if args.part == "all" else [args.part]) for r in RUNS[p] if not (args.quick and r == "cfg_nosched")]
    history = {}
    if args.resume:  # skip the runs finished before the resumed one, keeping their losses for the cfg_nosched comparison
        done, runs = runs[:runs.index(ckpt["run"])], runs[runs.index(ckpt["run"]):]
        for run in done:
            path = os.path.join(os.path.dirname(args.resume), f"{run}.pt")
            if os.path.isfile(path):
                history[run] = common.load_checkpoint(path, SCRIPT)["losses"]
    if args.save_samples and not args.sample and not {"fm", "cfg"} & set(runs):
        raise common.UserError(f"--save-samples needs an fm or cfg model, but this run trains only {', '.join(runs)}; "
                               "run --part fm, cfg or all, or sample a checkpoint with --sample CKPT --save-samples FILE.npz")
    data = None if args.sample else load_mnist(args, device)
    out = common.prepare_out(args.out)
    if args.sample:
        model = make_model(ckpt["run"], ckpt["settings"]["hidden"], device)
        model.load_state_dict(ckpt["model"])
        images, _ = save_samples(model, ckpt["run"], args, device, args.save_samples or os.path.join(out, "samples.npz"))
        common.save_grid(images, os.path.join(out, "samples.png"), nrow=10, scale=2)
        return
    print(f"device {device}; {len(data[0])} training images; runs: {', '.join(runs)}", flush=True)
    if device.type == "cpu" and not args.quick and not args.resume:
        estimate_time(runs, args, device, len(data[0]))
    for run in runs:
        trained = train_run(run, args, data, device, out, history, ckpt if args.resume and run == ckpt["run"] else None)
        if part_of(run) in ("fm", "cfg") and run != "cfg_nosched":
            model, flow_run = trained, run
    if args.save_samples:  # checked above: an fm or cfg model was trained
        save_samples(model, flow_run, args, device, args.save_samples)


if __name__ == "__main__":
    common.run(main)
