"""CS180 Project 5, Part B on MNIST: a hand-written U-Net, from a one-step denoiser to class-conditioned
flow matching with classifier-free guidance (CFG).

Reproduces Part B (flow-matching version) of UC Berkeley CS180 Project 5 "Diffusion Models & Flow
Matching" with the course's U-Net and numbers, plus the trajectory and velocity figures of the
"From noise to images" notebook (zhubert.com). Four parts, run in this order or alone with --part:
  denoise  one-step denoiser at sigma=0.5 (D=128, batch 256, Adam 1e-4, 5 epochs), out-of-distribution sweep
  noise    the same denoiser fed pure noise: MSE makes it regress to the dataset mean
  fm       time-conditioned flow matching (D=64, batch 64, Adam 1e-2, ExponentialLR to 0.1*lr, 10 epochs)
  cfg      class-conditioned flow matching, one-hot dropped with p=0.1, guidance w=5; plus the write-up's
           ablation cfg_nosched: no LR scheduler and, as the write-up did, AdamW with a tenth of the lr
--quick: the same parts with small nets on 10,000 images (w=3), for a CPU. --dataset fashion: Fashion-MNIST.
No torchrun/DDP: the whole recipe takes minutes on one GPU.

Conventions (shared by every script of this project):
  - time: t=0 is noise, t=1 is data: x_t = t*x + (1-t)*eps, velocity target v = x - eps, sampling
    integrates dx/dt = v from 0 to 1 (CS180 writes the same path as (1-t)*z + t*x). The "From noise to
    images" notebook runs the other way (x_s = (1-s)*x + s*eps, from s=1 down to 0): s = 1 - t, its
    velocity is minus ours, its backward Euler steps are our forward ones: the same samples.
  - pixels: images are in [-1, 1] inside the model; CS180 trains its flow-matching parts on [0, 1] digits.
    Against unit noise, [-1, 1] data has twice the signal amplitude (4x the signal-to-noise ratio), so at
    a given t our x_t is clearer: it looks like CS180's x_t' at t' = 2t/(1+t) (our t=0.5 is their 0.67).
    The denoiser keeps CS180's sigma: their x + sigma*z on [0, 1] is x + 2*sigma*z on [-1, 1].
  - CFG: u = u_uncond + w * (u_cond - u_uncond), cond and uncond in one batched forward; the null class
    (label NULL=10) is the all-zero one-hot.

Outputs go to --out: a checkpoint per run (<run>.pt: model, optimizer, scheduler, epoch, step, RNG,
losses; no EMA, as in the recipe), the figures named in the README, metrics.jsonl, and --save-samples
FILE.npz (uint8 `images` N x 1 x 28 x 28, `labels`; -1 for the unconditional fm model) for evaluate.py.
In a notebook:
  model, config = load_model("runs/mnist_unet/cfg.pt")
  images = generate(model, torch.randn(10, 1, 28, 28), torch.arange(10), cfg=5.0, steps=50)

  python mnist_unet.py                     # the whole CS180 recipe (sized for a GPU; a CPU says how long)
  python mnist_unet.py --quick             # CPU preset: class-conditioned digits in ~10 minutes on 2 cores
  python mnist_unet.py --quick --dataset fashion
  python mnist_unet.py --part cfg --cfg 3 --steps 100    # one part, other guidance and step count
  python mnist_unet.py --sample runs/mnist_unet/cfg.pt --num-samples 1000 --save-samples cfg.npz
  python mnist_unet.py --resume runs/mnist_unet/cfg.pt   # continue a run, then the rest of its --part
  python mnist_unet.py --benchmark         # training and sampling img/s, eager and compiled
"""
import argparse
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
# --quick: the same method scaled to ~10 minutes on a 2-core CPU. Narrower nets (the cost grows as D^2),
# a fixed 10,000-image training subset (the time does not depend on the dataset size), most of the budget
# on the class-conditioned model, and no ablation (it would double that budget).
QUICK = {
    "denoise": dict(hidden=32, batch_size=64, lr=1e-3, epochs=1),
    "noise": dict(hidden=32, batch_size=64, lr=1e-3, epochs=1),
    "fm": dict(hidden=32, batch_size=64, lr=1e-2, epochs=3),
    "cfg": dict(hidden=32, batch_size=64, lr=1e-2, epochs=10),
}
QUICK_IMAGES = 10_000
# The runs in training order. cond: the U-Net's conditioning; loss: "denoise" (x + sigma*z -> x), "noise"
# (z -> x) or "flow"; snapshots: epochs with a sample figure, as fractions of the run (0 = epoch 1).
# cfg_nosched is the write-up's ablation: "When I removed the learning-rate scheduler, I also switched the
# optimizer from Adam to AdamW and reduced the learning rate by a factor of 10" (AdamW's weight decay is
# not given: torch's default, 0.01).
DENOISER = dict(cond="none", optimizer="adam", lr_scale=1.0, scheduler=False, ablation=False)
FLOW = dict(loss="flow", optimizer="adam", lr_scale=1.0, scheduler=True, snapshots=(0, .5, 1), ablation=False)
RUNS = {
    "denoise": dict(DENOISER, part="denoise", loss="denoise", snapshots=(0, 1)),
    "noise": dict(DENOISER, part="noise", loss="noise", snapshots=()),
    "fm": dict(FLOW, part="fm", cond="time"),
    "cfg": dict(FLOW, part="cfg", cond="class"),
    "cfg_nosched": dict(FLOW, part="cfg", cond="class", optimizer="adamw", lr_scale=0.1, scheduler=False,
                        snapshots=(1,), ablation=True),
}
SIGMA = 0.5                                     # the denoiser's training noise level
SIGMAS = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0]    # noising grid and out-of-distribution sweep
GUIDANCE = [0, 1, 3, 5, 7]                      # guidance sweep
CFG_W = 5.0                                     # the recipe's guidance scale
# Guidance trades diversity for fidelity. On the small --quick model, w=5 draws near-copies of one bold digit
# per class, w=2 misdraws some; w=3 keeps every digit readable with varied strokes (README, docs/mnist_unet).
QUICK_CFG_W = 3.0
LABEL_DROPOUT = 0.1                             # probability of dropping the class during training
NUM_CLASSES = 10
NULL = NUM_CLASSES                              # the dropped class: its one-hot is all zeros
TRAINING_KEYS = ("dataset", "quick", "hidden", "batch_size", "lr", "seed")  # what --resume must match
LOG_EVERY = 50                                  # steps per metrics.jsonl line (and non-finite loss check)
SAMPLE_CHUNK = 250                              # --save-samples images per batch (memory, progress)
TITLES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}


# --------------------------------------------------------------------------------------------- data
def load_data(dataset, data_dir, quick, device):
    """The training split (--quick: its first QUICK_IMAGES) as uint8 tensors on the device, normalised
    per batch; 64 test images for the figures."""
    x, y = common.load_dataset(dataset, data_dir, train=True)
    if quick:
        x, y = x[:QUICK_IMAGES], y[:QUICK_IMAGES]
    x_test, _ = common.load_dataset(dataset, data_dir, train=False)
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
    """The CS180 U-Net. cond='none': f(x) (the denoisers); 'time': f(x, t), the bottleneck and up1 scaled
    by FC(t); 'class': f(x, t, y), c = one_hot(y) (all zeros for NULL): u0 = c1*u0 + t1, up1 = c2*up1 + t2."""

    def __init__(self, hidden, cond="none"):
        super().__init__()
        D, self.cond = hidden, cond
        self.e0, self.e1, self.e2 = conv_block(1, D), down_block(D, D), down_block(D, 2 * D)  # 28, 14, 7
        self.flatten = nn.Sequential(nn.AvgPool2d(7), nn.GELU())                             # 7 -> 1
        self.unflatten = nn.Sequential(nn.ConvTranspose2d(2 * D, 2 * D, 7, 7), nn.BatchNorm2d(2 * D),
                                       nn.GELU())                                            # 1 -> 7
        self.up1, self.up2 = up_block(4 * D, D), up_block(2 * D, D)                          # 14, 28
        self.head = nn.Sequential(conv_block(2 * D, D), nn.Conv2d(D, 1, 3, 1, 1))
        if cond != "none":
            self.fc1_t, self.fc2_t = fc_block(1, 2 * D), fc_block(1, D)
        if cond == "class":
            self.fc1_c, self.fc2_c = fc_block(NUM_CLASSES, 2 * D), fc_block(NUM_CLASSES, D)

    def forward(self, x, t=None, y=None):
        e0 = self.e0(x)
        e1 = self.e1(e0)
        e2 = self.e2(e1)
        u0 = self.unflatten(self.flatten(e2))
        if self.cond != "none":
            t1 = self.fc1_t(t[:, None].to(x.dtype))[:, :, None, None]
            t2 = self.fc2_t(t[:, None].to(x.dtype))[:, :, None, None]
        if self.cond == "class":
            c = F.one_hot(y, NUM_CLASSES + 1)[:, :NUM_CLASSES].to(x.dtype)  # NULL -> all zeros
            c1 = self.fc1_c(c)[:, :, None, None]
            c2 = self.fc2_c(c)[:, :, None, None]
        if self.cond == "time":
            u0 = u0 * t1
        if self.cond == "class":
            u0 = c1 * u0 + t1
        u1 = self.up1(torch.cat([e2, u0], 1))
        if self.cond == "time":
            u1 = u1 * t2
        if self.cond == "class":
            u1 = c2 * u1 + t2
        u2 = self.up2(torch.cat([e1, u1], 1))
        return self.head(torch.cat([e0, u2], 1))


def make_model(cond, hidden, device="cpu", compile_model=False):
    device = torch.device(device)
    model = UNet(hidden, cond).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model.compile()  # in place: state_dict keys stay plain, so compiled and eager runs resume each other
    return model


# ------------------------------------------------------------------------------------------- method
def flow_path(x, eps, t):
    """x_t = t*x + (1-t)*eps and its velocity dx_t/dt = x - eps (t=0 noise, t=1 data)."""
    t = t.view(-1, 1, 1, 1)
    return t * x + (1 - t) * eps, x - eps


def denoising_loss(model, x, sigma):
    """CS180's one-step denoiser: MSE(f(x + sigma*z), x) on [0, 1] images, x + 2*sigma*z on our [-1, 1].
    sigma=None feeds z alone: nothing about x is left, so the optimum is E[x], the dataset mean."""
    z = torch.randn_like(x)
    noisy = z if sigma is None else x + 2 * sigma * z
    return F.mse_loss(model(noisy), x)


def flow_matching_loss(model, x, y, label_dropout):
    """MSE of the predicted velocity at a uniform t. With labels y (the class model) each label is dropped to
    NULL with probability label_dropout, so the same net also learns u_uncond."""
    eps = torch.randn_like(x)
    t = torch.rand(len(x), device=x.device)
    x_t, v = flow_path(x, eps, t)
    if y is not None:
        y = torch.where(torch.rand(len(y), device=y.device) < label_dropout, NULL, y)
    return F.mse_loss(model(x_t, t, y), v)


def guided_velocity(model, x_t, t, y, w):
    """The velocity at (x_t, t); with labels y, CFG u_uncond + w*(u_cond - u_uncond), one batched forward."""
    t = torch.full((len(x_t),), t, device=x_t.device)
    if y is None:
        return model(x_t, t).float()
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]))
    u_cond, u_uncond = both.float().chunk(2)
    return u_uncond + w * (u_cond - u_uncond)


def ode_solve(velocity, x, steps, solver="euler", on_step=None):
    """Integrate dx/dt = velocity(x, t) from t=0 (noise) to t=1 (data) in equal steps: Euler x += dt*v(x, t),
    or Heun (v averaged over both ends of the step). on_step(x) sees each new state (the path of the GIFs)."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', not {solver!r}")
    dt = 1.0 / steps
    for i in range(steps):
        v = velocity(x, i * dt)
        if solver == "heun":
            v = (v + velocity(x + dt * v, (i + 1) * dt)) / 2
        x = x + dt * v
        if on_step is not None:
            on_step(x)
    return x


@torch.no_grad()
def generate(model, noise, y, cfg, steps, solver="euler", precision="fp32", on_step=None):
    """Images in [-1, 1] from noise (N, 1, 28, 28), on the model's device; y: labels (None for fm)."""
    model.eval()
    device = next(model.parameters()).device
    noise, y = noise.to(device), None if y is None else y.to(device)
    with common.autocast(device, precision):
        x = ode_solve(lambda x, t: guided_velocity(model, x, t, y, cfg), noise, steps, solver, on_step)
    return x.clamp(-1, 1)


def load_model(path, device="cpu", compile_model=False):
    """A trained model (eval mode) and its config (the flags, the run and its settings) from a checkpoint."""
    ckpt = common.load_checkpoint(path, SCRIPT)
    model = make_model(RUNS[ckpt["run"]]["cond"], ckpt["settings"]["hidden"], device, compile_model)
    model.load_state_dict(ckpt["model"])
    return model.eval(), {**ckpt["config"], **ckpt["settings"], "run": ckpt["run"]}


# ------------------------------------------------------------------------------------------ figures
def fixed_noise(n, seed, device):
    """Noise from a private generator: figures never disturb the training RNG stream (resume stays exact)."""
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)).to(device)


def class_labels(n, device):
    return torch.arange(n, device=device) % NUM_CLASSES


def sample_path(model, name, noise, w, job):
    """[noise, x_1, ..., x_steps] for a figure (labels 0..9 cycled for the class model), with progress."""
    y = class_labels(len(noise), noise.device) if RUNS[name]["cond"] == "class" else None
    path = [noise]
    progress = common.Progress(job["steps"], prefix=f"[{name}] figure, Euler step")

    def on_step(x):
        path.append(x)
        progress.update(len(path) - 1, len(x) / job["steps"])
    generate(model, noise, y, cfg=w, steps=job["steps"], precision=job["precision"], on_step=on_step)
    return path


def save_samples_grid(images, path, cond, classes, title):
    """Class samples (labels 0..9 cycled) as one row per class, up to 10 each; fm samples 10 a row."""
    per_class = min(len(images) // NUM_CLASSES, 10)
    if cond != "class" or per_class == 0:
        return common.save_grid(images[:100], path, nrow=10, scale=2, title=title)
    rows = images[:per_class * NUM_CLASSES].view(per_class, NUM_CLASSES, 1, 28, 28).transpose(0, 1)
    common.save_grid(rows.flatten(0, 1), path, nrow=per_class, scale=2, row_labels=classes, title=title)


@torch.no_grad()
def denoise_rows(model, x, sigmas, seed, precision):
    """For each sigma: the noisy images x + 2*sigma*z and (with a model) their one-step denoising."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        noisy = x + 2 * sigma * torch.randn(x.shape, generator=gen).to(x.device)
        rows.append(noisy)
        if model is not None:
            with common.autocast(x.device, precision):
                rows.append(model(noisy).float())
    return torch.cat(rows)


def epoch_figure(name, model, epoch, epochs, x_test, job):
    """Test images denoised (the denoiser), or 40 samples (4 per class) after an epoch."""
    path = os.path.join(job["out"], f"{name}_epoch{epoch}.png")
    data, cond = TITLES[job["dataset"]], RUNS[name]["cond"]
    if cond == "none":
        model.eval()
        x = normalise(x_test[:10])
        rows = torch.cat([x, denoise_rows(model, x, [SIGMA], job["seed"], job["precision"])])
        labels = ["clean", f"sigma={SIGMA}", "denoised"]
        return common.save_grid(rows, path, nrow=10, scale=2, row_labels=labels,
                                title=f"{name}: {data} test images denoised, epoch {epoch}/{epochs}")
    samples = sample_path(model, name, fixed_noise(40, job["seed"], x_test.device), job["cfg"], job)[-1]
    w = f"w={job['cfg']:g}, " if cond == "class" else ""
    save_samples_grid(samples, path, cond, job["classes"],
                      f"{name}: {data} samples after epoch {epoch}/{epochs} ({w}{job['steps']} Euler steps)")


def final_figures(name, model, x_train, x_test, job, history, steps_per_epoch, epochs):
    run, device, seed, steps = RUNS[name], x_test.device, job["seed"], job["steps"]
    data = TITLES[job["dataset"]]
    f = lambda figure: os.path.join(job["out"], f"{name}_{figure}")
    model.eval()
    curves = {name: history[name]}
    if run["ablation"] and "cfg" in history:  # the ablation's curve beside the run it ablates
        curves = {"cfg_nosched (AdamW, lr/10, constant)": history[name],
                  "cfg (Adam, ExponentialLR)": history["cfg"]}
    every = max(1, epochs // 10)
    marks = [(e * steps_per_epoch, f"epoch {e}") for e in range(every, epochs, every)]
    common.plot_curves(f("loss.png"), curves, title=f"{name}: training loss (MSE), {data}", marks=marks)
    if run["loss"] == "denoise":  # a column per sigma; a row per image (noising), or noisy/denoised pairs
        x, S = normalise(x_test[:4]), len(SIGMAS)
        by_image = lambda rows: rows.view(S, -1, 4, 1, 28, 28).permute(2, 1, 0, 3, 4, 5).flatten(0, 2)
        sigmas = [f"sigma={s}" for s in SIGMAS]
        common.save_grid(by_image(denoise_rows(None, x, SIGMAS, seed + 1, "fp32")), f("noising.png"), nrow=S,
                         scale=3, col_labels=sigmas, title=f"{data}: x + 2*sigma*z (CS180's sigma on [0, 1])")
        common.save_grid(by_image(denoise_rows(model, x, SIGMAS, seed + 1, job["precision"])), f("ood.png"),
                         nrow=S, scale=3, col_labels=sigmas, row_labels=["noisy", "out"] * 4,
                         title=f"{name}: trained at sigma={SIGMA}, applied at every sigma ({data})")
    if run["loss"] == "noise":
        z = fixed_noise(9, seed + 1, device)
        with torch.no_grad(), common.autocast(device, job["precision"]):
            f_z = model(z).float()
        mean = normalise(x_train).mean(0, keepdim=True)
        to_mean = (f_z - mean).pow(2).mean().sqrt()
        to_image = (f_z - normalise(x_train[:9])).pow(2).mean().sqrt()
        print(f"[noise] RMS distance of the outputs to the dataset mean {to_mean:.3f}, to a training image "
              f"{to_image:.3f}")
        common.save_grid(torch.cat([z, f_z, mean]), f("samples.png"), nrow=9, scale=2,
                         row_labels=["z", "f(z)", "mean"], title=f"{name}: noise z in, the {data} mean out")
    if run["cond"] == "time":
        x, eps = normalise(x_test[:1]), fixed_noise(1, seed + 1, device)
        ts = torch.linspace(0, 1, 11, device=device)
        x_t = flow_path(x, eps, ts)[0]  # one image and one noise at 11 times
        common.save_grid(x_t, f("path.png"), nrow=11, scale=2, col_labels=[f"{t:.1f}" for t in ts.tolist()],
                         title=f"x_t = t*x + (1-t)*eps ({data})")
        x = normalise(x_test[:8])
        x_t, v = flow_path(x, fixed_noise(8, seed + 2, device), torch.full((8,), 0.5, device=device))
        with torch.no_grad(), common.autocast(device, job["precision"]):
            v_pred = guided_velocity(model, x_t, 0.5, None, 1.0)
        # velocities span about [-3, 3]: shown halved, so grey is 0
        common.save_grid(torch.cat([x, x_t, v / 2, v_pred / 2, (v_pred - v) / 2]), f("velocity.png"), nrow=8,
                         scale=2, row_labels=["x", "x_0.5", "x-eps", "v_pred", "error"],
                         title=f"{name}: velocity target and prediction at t=0.5, halved ({data})")
    if run["loss"] == "flow" and not run["ablation"]:  # trajectory: rows = samples, columns = t; and a GIF
        path = sample_path(model, name, fixed_noise(10, seed + 1, device), job["cfg"], job)
        cols = sorted({round(i * steps / 10) for i in range(11)})
        w = f"w={job['cfg']:g}, " if run["cond"] == "class" else ""
        title = f"{name}: sampling from t=0 to 1 ({data}, {w}{steps} Euler steps)"
        common.save_grid(torch.stack([path[i] for i in cols], 1).flatten(0, 1), f("trajectory.png"),
                         nrow=len(cols), scale=2, col_labels=[f"{i / steps:.1f}" for i in cols], title=title,
                         row_labels=job["classes"] if run["cond"] == "class" else None)
        common.save_gif(path, f("trajectory.gif"), nrow=10, scale=2, title=title)
    if run["cond"] == "class" and not run["ablation"]:  # same noise for every w: columns differ only by w
        sweep = [sample_path(model, name, fixed_noise(20, seed + 2, device), w, job)[-1] for w in GUIDANCE]
        grid = torch.stack(sweep).view(len(GUIDANCE), 2, NUM_CLASSES, 1, 28, 28).permute(2, 0, 1, 3, 4, 5)
        common.save_grid(grid.flatten(0, 2), f("guidance.png"), nrow=2 * len(GUIDANCE), scale=2,
                         row_labels=job["classes"], col_labels=[s for w in GUIDANCE for s in (f"w={w}", "")],
                         title=f"{name}: guidance scale w ({data}, {steps} Euler steps)")


# ----------------------------------------------------------------------------------------- training
def settings(preset, name, overrides):
    """A run's hidden/batch_size/lr/epochs: its part's preset, overridden by the flags given."""
    s = dict(preset[RUNS[name]["part"]], **overrides)
    s["lr"] *= RUNS[name]["lr_scale"]
    return s


def batches(n_train, batch_size):
    """Batch size and steps per epoch (the ragged tail of each shuffle is dropped)."""
    B = min(batch_size, n_train)
    return B, n_train // B


def make_optimizer(run, model, lr, epochs):
    optimizer = torch.optim.AdamW if run["optimizer"] == "adamw" else torch.optim.Adam
    opt = optimizer(model.parameters(), lr=lr, fused=next(model.parameters()).is_cuda)
    # CS180: ExponentialLR stepped per epoch, gamma = 0.1**(1/epochs), so the LR ends at 0.1*lr
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.1 ** (1 / epochs)) if run["scheduler"] else None
    return opt, sched


def train_step(run, model, opt, scaler, x, y, precision):
    with common.autocast(x.device, precision):
        if run["loss"] == "flow":
            loss = flow_matching_loss(model, x, y if run["cond"] == "class" else None, LABEL_DROPOUT)
        else:
            loss = denoising_loss(model, x, SIGMA if run["loss"] == "denoise" else None)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def check_loss(name, loss, step):
    if not math.isfinite(loss):
        raise common.UserError(f"the {name} loss became {loss} at step {step}, so training stopped with the "
                               "last good checkpoint kept; try a lower --lr or --precision fp32")


def train_run(name, s, data, job, history, progress, share, ckpt=None):
    """Train one run to its last epoch, writing its checkpoint and metrics every epoch, then its figures.
    share: (job percent done before this run, job percent per step) for the progress line."""
    run, device, precision = RUNS[name], job["device"], job["precision"]
    common.seed_everything(job["seed"])  # per run, so `--part cfg` trains the same cfg model as `--part all`
    model = make_model(run["cond"], s["hidden"], device, job["compile"])
    opt, sched = make_optimizer(run, model, s["lr"], s["epochs"])
    scaler = common.grad_scaler(device, precision)
    x_train, y_train, x_test = data
    epoch, step, losses = 0, 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])  # a grown --epochs decays on at the same rate
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        epoch, step, losses = ckpt["epoch"], ckpt["step"], list(ckpt["losses"])
        common.set_rng_state(ckpt["rng"])
        print(f"[{name}] resuming after epoch {epoch} (step {step})")
    B, steps_per_epoch = batches(len(x_train), s["batch_size"])
    for epoch in range(epoch + 1, s["epochs"] + 1):
        model.train()
        start = time.time()
        perm = torch.randperm(len(x_train)).to(device)
        epoch_losses = []
        for i in range(steps_per_epoch):
            idx = perm[i * B:(i + 1) * B]
            x = normalise(x_train[idx])
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = train_step(run, model, opt, scaler, x, y_train[idx], precision)
            step += 1
            epoch_losses.append(loss)
            progress.update(round(share[0] + step * share[1], 1), B, part=name,
                            epoch=f"{epoch}/{s['epochs']}", loss=loss)
            if step % LOG_EVERY == 0:  # one GPU sync per group
                group = torch.stack(epoch_losses[-LOG_EVERY:]).float().mean().item()
                check_loss(name, group, step)
                job["metrics"].log(run=name, step=step, epoch=epoch, loss=group, lr=opt.param_groups[0]["lr"])
        seconds = time.time() - start
        losses += torch.stack(epoch_losses).float().tolist()
        mean = sum(losses[-steps_per_epoch:]) / steps_per_epoch
        check_loss(name, mean, step)  # before a checkpoint of NaN weights replaces a good one
        job["metrics"].log(run=name, epoch=epoch, loss=mean, lr=opt.param_groups[0]["lr"],
                           img_per_s=round(B * steps_per_epoch / seconds, 1), seconds=round(seconds, 2))
        if sched is not None:
            sched.step()
        common.save_checkpoint(os.path.join(job["out"], f"{name}.pt"), {
            "script": SCRIPT, "config": job["config"], "run": name, "settings": s,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched else None, "scaler": scaler.state_dict(),
            "epoch": epoch, "step": step, "rng": common.rng_state(), "losses": losses})
        print(f"[{name}] epoch {epoch}/{s['epochs']}: mean loss {mean:.4f}", flush=True)
        if epoch in {max(1, math.ceil(f * s["epochs"])) for f in run["snapshots"]}:
            epoch_figure(name, model, epoch, s["epochs"], x_test, job)
    history[name] = losses
    final_figures(name, model, x_train, x_test, job, history, steps_per_epoch, s["epochs"])
    return model


# ------------------------------------------------------------------------------ speed and sampling
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_speed(run, s, device, precision, compiled, steps):
    """Training img/s of a fresh model on random images (content does not change the speed) after a warm-up
    step; also the model and the warm-up's seconds (mostly compilation when compiled)."""
    model = make_model(run["cond"], s["hidden"], device, compiled)
    opt, _ = make_optimizer(run, model, s["lr"], s["epochs"])
    scaler = common.grad_scaler(device, precision)
    x = normalise(torch.randint(0, 256, (s["batch_size"], 1, 28, 28), dtype=torch.uint8, device=device))
    y = torch.randint(0, NUM_CLASSES, (s["batch_size"],), device=device)
    seconds = []
    for _ in range(steps + 1):
        start = time.time()
        train_step(run, model, opt, scaler, x, y, precision)
        sync(device)
        seconds.append(time.time() - start)
    return s["batch_size"] * steps / sum(seconds[1:]), model, seconds[0]


def benchmark(plans, device, precision, steps, w):
    print(f"device {device}, {torch.get_num_threads()} threads, precision {precision}, {steps} Euler steps")
    print("| run | D | batch | train img/s eager | compiled | compile s | sample img/s eager | compiled |")
    print("|---|---|---|---|---|---|---|---|")
    n = 256 if device.type == "cuda" else 32
    for name, s in plans.items():
        run, row = RUNS[name], [name, s["hidden"], s["batch_size"]]
        y = class_labels(n, device) if run["cond"] == "class" else None
        sampled = []
        for compiled in (False, True):
            ips, model, warm_up = train_speed(run, s, device, precision, compiled, 20 if n == 256 else 3)
            row += [f"{ips:.0f}", f"{warm_up:.0f}"] if compiled else [f"{ips:.0f}"]
            if run["loss"] == "flow":
                generate(model, fixed_noise(n, 0, device), y, cfg=w, steps=2, precision=precision)  # warm-up
                sync(device)
                start = time.time()
                generate(model, fixed_noise(n, 0, device), y, cfg=w, steps=steps, precision=precision)
                sync(device)
                sampled.append(f"{n / (time.time() - start):.0f}")
        print("| " + " | ".join(map(str, row + (sampled or ["-", "-"]))) + " |", flush=True)


def estimate_time(plans, n_train, device, precision):
    """On a CPU, time two steps of each run and say how long the whole recipe will take here."""
    print("timing 2 steps of each run to estimate the run time on this CPU...", flush=True)
    total = 0.0
    for name, s in plans.items():
        B, steps_per_epoch = batches(n_train, s["batch_size"])
        img_per_s = train_speed(RUNS[name], s, device, precision, False, 2)[0]
        total += s["epochs"] * steps_per_epoch * B / img_per_s
    print(f"note: this is the GPU-sized CS180 recipe; on this CPU its training alone would take about "
          f"{common.format_time(total)}. For a CPU run of about 10 minutes use --quick.", flush=True)


def save_samples(model, path, n, batch, classes, seed, sampling):
    """n samples (`classes` in turn; labels -1 without classes: the fm model) as an .npz for evaluate.py; the
    chunk of `batch` from index i comes from noise seeded by seed + 3 + i (the figures': seed to seed + 2)."""
    labels = torch.arange(n) % len(classes) if classes else torch.full((n,), -1)
    device = next(model.parameters()).device
    progress = common.Progress(n, prefix="sampling")
    chunks = []
    for i in range(0, n, batch):
        noise = fixed_noise(min(batch, n - i), seed + 3 + i, device)
        y = labels[i:i + len(noise)] if classes else None
        chunks.append(generate(model, noise, y, **sampling).cpu())
        progress.update(i + len(noise), len(noise))
    images = torch.cat(chunks)
    common.save_samples_npz(path, images, labels)
    return images


def write_samples(model, name, path, args, dataset, w, precision):
    """--num-samples samples of run `name` (cfg: guidance w) into path, then the command to score them."""
    classes = common.CLASS_NAMES[dataset] if RUNS[name]["cond"] == "class" else None
    sampling = dict(cfg=w, steps=args.steps, precision=precision)
    images = save_samples(model, path, args.num_samples, SAMPLE_CHUNK, classes, args.seed, sampling)
    print(f"wrote {args.num_samples} samples of {name} to {path}; evaluate them with\n"
          f"  python evaluate.py {path} --dataset {dataset} --data-dir {args.data_dir}", flush=True)
    return images


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("--part", choices=["denoise", "noise", "fm", "cfg", "all"], default="all", help="which part to run")
    add("--dataset", choices=["mnist", "fashion"], default="mnist", help="MNIST or Fashion-MNIST")
    add("--quick", action="store_true", help=f"CPU preset: D=32, the first {QUICK_IMAGES:,} training images, "
        "batch 64, epochs 1/1/3/10 and lr 1e-3/1e-3/1e-2/1e-2 (denoise/noise/fm/cfg), w=3, no ablation")
    add("--epochs", type=int, help="epochs per run (recipe: denoise/noise 5, fm/cfg 10; --quick 1/1/3/10); "
        "may grow on --resume")
    add("--batch-size", type=int, help="batch size (recipe: denoise/noise 256, fm/cfg 64; --quick 64)")
    add("--lr", type=float, help="learning rate (recipe: denoise/noise 1e-4, fm/cfg 1e-2; --quick "
        "1e-3/1e-3/1e-2/1e-2); the cfg_nosched ablation takes a tenth of it, with AdamW")
    add("--hidden", type=int, help="U-Net width D (recipe: denoise/noise 128, fm/cfg 64; --quick 32)")
    add("--steps", type=int, default=50, help="Euler steps when sampling")
    add("--cfg", type=float, help=f"guidance scale w of the class model (recipe {CFG_W:g}, --quick "
        f"{QUICK_CFG_W:g}; 0 = unconditional, 1 = no guidance)")
    add("--precision", choices=common.PRECISIONS, default="auto", help="autocast in training and sampling: "
        "auto = bf16 on GPUs of compute capability >= 8.0, fp16 with a gradient scaler on older GPUs, "
        "fp32 on CPU")
    add("--compile", action="store_true", help="torch.compile the model (slower start, faster steps)")
    add("--out", default=os.path.join("runs", SCRIPT), help="output folder")
    add("--data-dir", default="data", help="torchvision root with MNIST/raw or FashionMNIST/raw *-ubyte "
        "files (downloaded there if absent)")
    add("--device", help="cuda, cuda:N, mps or cpu (unset: the best available)")
    add("--seed", type=int, default=0, help="random seed, 0 to 2**31-1")
    add("--resume", metavar="CKPT", help="continue the interrupted run that wrote CKPT, then the runs of its "
        "--part still to come (pass the same flags as before)")
    add("--overwrite", action="store_true", help="train afresh into an --out that holds checkpoints already")
    add("--sample", metavar="CKPT", help="no training: sample an fm/cfg checkpoint into --out/samples.*")
    add("--num-samples", type=int, default=100, help="samples for --sample/--save-samples, 1 to 1,000,000 "
        "(cfg: labels 0..9 cycled)")
    add("--save-samples", metavar="FILE.npz", help="also write the samples of the last fm/cfg model trained "
        "(or of --sample CKPT) as .npz for evaluate.py")
    add("--benchmark", action="store_true", help="print img/s, eager and compiled; exit")
    return p.parse_args(argv)


def validate(args):
    """Every flag is checked before anything is read or written; args is read-only afterwards."""
    common.check_finite(args)
    common.check_positive(args, "epochs", "steps", "batch_size", "lr", "hidden")
    common.check_range(args, "num_samples", 1, 1_000_000)
    common.check_range(args, "steps", 1, 10_000)
    if args.cfg is not None and args.cfg < 0:
        raise common.UserError(f"--cfg must be 0 or more (0 is unconditional), got {args.cfg}")
    common.check_seed(args)
    if args.resume and args.sample:
        raise common.UserError("pass either --resume (continue training) or --sample (sampling), not both")
    if args.save_samples and not args.save_samples.endswith(".npz"):
        raise common.UserError(f"--save-samples {args.save_samples} must name a .npz file")
    if args.save_samples:
        common.check_output_file(args.save_samples, "--save-samples", out=args.out)
    return args


def main(argv=None):
    args = validate(parse_args(argv))
    device = common.get_device(args.device)
    precision = common.precision_for(args.precision, device)
    if args.sample:  # the checkpoint's dataset and preset, whatever the flags say
        model, config = load_model(args.sample, device, args.compile)
        name, cond = config["run"], RUNS[config["run"]]["cond"]
        if cond == "none":
            raise common.UserError(f"{args.sample} holds the {name} denoiser, which cannot sample; "
                                   "pass an fm or cfg checkpoint")
        out = common.prepare_out(args.out)
        dataset = config.get("dataset", "mnist")  # checkpoints from before --dataset are MNIST
        w = args.cfg if args.cfg is not None else (QUICK_CFG_W if config["quick"] else CFG_W)
        path = args.save_samples or os.path.join(out, "samples.npz")
        images = write_samples(model, name, path, args, dataset, w, precision)
        guided = f"w={w:g}, " if cond == "class" else ""
        title = f"{name}: samples ({TITLES[dataset]}, {guided}{args.steps} Euler steps)"
        return save_samples_grid(images, os.path.join(out, "samples.png"), cond, common.CLASS_NAMES[dataset],
                                 title)
    ckpt = common.load_checkpoint(args.resume, SCRIPT, vars(args), TRAINING_KEYS) if args.resume else None
    part = ckpt["config"]["part"] if ckpt else args.part  # --resume goes on with the checkpoint's --part
    runs = [r for r in RUNS if part in ("all", RUNS[r]["part"]) and not (args.quick and RUNS[r]["ablation"])]
    flags = {k: getattr(args, k) for k in ("hidden", "batch_size", "lr", "epochs")}
    overrides = {k: v for k, v in flags.items() if v is not None}
    plans = {name: settings(QUICK if args.quick else RECIPE, name, overrides) for name in runs}
    w = args.cfg if args.cfg is not None else (QUICK_CFG_W if args.quick else CFG_W)
    if args.benchmark:
        plans = {name: s for name, s in plans.items() if not RUNS[name]["ablation"]}
        return benchmark(plans, device, precision, args.steps, w)
    history = {}
    if ckpt:  # skip the runs finished before the resumed one, keeping their losses for the ablation's plot
        for name in runs[:runs.index(ckpt["run"])]:
            path = os.path.join(os.path.dirname(args.resume), f"{name}.pt")
            if os.path.isfile(path):
                history[name] = common.load_checkpoint(path, SCRIPT)["losses"]
        runs = runs[runs.index(ckpt["run"]):]
        if plans[ckpt["run"]]["epochs"] < ckpt["epoch"]:
            raise common.UserError(f"{args.resume} has trained {ckpt['epoch']} epochs, more than --epochs "
                                   f"{plans[ckpt['run']]['epochs']}; pass --epochs {ckpt['epoch']} or more")
    sampled = [r for r in runs if RUNS[r]["loss"] == "flow" and not RUNS[r]["ablation"]]
    if args.save_samples and not sampled:
        raise common.UserError(f"--save-samples needs an fm or cfg model, but this run trains only "
                               f"{', '.join(runs)}; run --part fm, cfg or all, or sample a checkpoint with "
                               "--sample CKPT --save-samples FILE.npz")
    for name in runs:
        common.check_fresh_run(os.path.join(args.out, f"{name}.pt"), args.resume, args.overwrite, SCRIPT)
    data = load_data(args.dataset, args.data_dir, args.quick, device)
    out = common.prepare_out(args.out)
    common.lock_out(out)
    job = dict(device=device, precision=precision, compile=args.compile, steps=args.steps, seed=args.seed,
               cfg=w, dataset=args.dataset, classes=common.CLASS_NAMES[args.dataset], out=out,
               config=dict(vars(args), part=part),  # the flags, saved in every checkpoint
               metrics=common.Metrics(os.path.join(out, "metrics.jsonl"), fresh=not args.resume))
    n_train = len(data[0])
    print(f"device {device}; {n_train} {TITLES[args.dataset]} training images; runs: {', '.join(runs)}; "
          "progress lines count percent of the whole job", flush=True)
    if device.type == "cpu" and not args.quick and not args.resume:
        estimate_time(plans, n_train, device, precision)
    # the job's progress weighs each step by its cost, batch * D^2 (a D=128 denoiser costs 4x per image)
    cost = {r: batches(n_train, plans[r]["batch_size"])[0] * plans[r]["hidden"] ** 2 for r in runs}
    steps = {r: plans[r]["epochs"] * batches(n_train, plans[r]["batch_size"])[1] for r in runs}
    total = sum(cost[r] * steps[r] for r in runs)
    start = 100 * cost[runs[0]] * ckpt["step"] / total if ckpt else 0  # the part a resumed run had done
    progress = common.Progress(100, start=start, prefix="job")
    done = 0
    models = {}
    for name in runs:
        resumed = ckpt if ckpt and name == ckpt["run"] else None
        share = (done, 100 * cost[name] / total)
        models[name] = train_run(name, plans[name], data, job, history, progress, share, resumed)
        done += 100 * cost[name] * steps[name] / total
    if args.save_samples:
        write_samples(models[sampled[-1]], sampled[-1], args.save_samples, args, args.dataset, w, precision)


if __name__ == "__main__":
    common.run(main)
