"""CS180 Project 5, Part B on MNIST: a hand-written U-Net, from a one-step denoiser to class-conditioned flow
matching with classifier-free guidance (CFG), plus the trajectory and velocity figures of the notebook
"From noise to images" (zhubert.com). Four parts, in this order or alone with --part: denoise (a one-step
denoiser at sigma=0.5, and its out-of-distribution sweep), noise (the same net fed pure noise: MSE makes it
regress to the dataset mean), fm (time-conditioned flow matching) and cfg (class-conditioned, guidance w=5),
with the write-up's ablation cfg_nosched (no LR scheduler: AdamW at a tenth of the lr). --quick: CPU size.
Conventions: t=0 is noise, t=1 is data: x_t = t*x + (1-t)*eps, v = x - eps, Euler steps from t=0 to 1 (CS180
writes (1-t)*z + t*x; the notebook's s = 1 - t runs backwards: the same samples). Images are in [-1, 1], so
CS180's sigma on [0, 1] is our 2*sigma, and our x_t looks like their x_t' at t' = 2t/(1+t) (4x their SNR).
CFG: u = u_uncond + w*(u_cond - u_uncond) in one batched forward; the null class NULL=10 is the all-zero
one-hot. --out gets <run>.pt per run (no EMA, as in the recipe), figures and metrics.jsonl. In a notebook:
    model, config = load_model("runs/mnist_unet/cfg.pt")
    images = generate(model, torch.randn(10, 1, 28, 28), torch.arange(10), cfg=5.0, steps=50)

    python mnist_unet.py                               # the whole CS180 recipe (a CPU says how long)
    python mnist_unet.py --quick --dataset fashion     # the CPU preset, on Fashion-MNIST
    python mnist_unet.py --sample runs/mnist_unet/cfg.pt --num-samples 1000 --save-samples cfg.npz
"""
import argparse
import functools
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "mnist_unet"
RECIPE = {  # the CS180 numbers, per part
    "denoise": dict(hidden=128, batch_size=256, lr=1e-4, epochs=5),
    "noise": dict(hidden=128, batch_size=256, lr=1e-4, epochs=5),
    "fm": dict(hidden=64, batch_size=64, lr=1e-2, epochs=10),
    "cfg": dict(hidden=64, batch_size=64, lr=1e-2, epochs=10),
}
# --quick, at CPU size: narrower nets (the cost grows as D^2), most epochs on cfg, no ablation (2x cfg's cost)
QUICK = {
    "denoise": dict(hidden=32, batch_size=64, lr=1e-3, epochs=1),
    "noise": dict(hidden=32, batch_size=64, lr=1e-3, epochs=1),
    "fm": dict(hidden=32, batch_size=64, lr=1e-2, epochs=3),
    "cfg": dict(hidden=32, batch_size=64, lr=1e-2, epochs=10),
}
QUICK_IMAGES = 10_000
# The runs in training order: cond (the U-Net's conditioning), loss (denoise: x + sigma*z -> x, noise: z -> x,
# or flow), snapshots (epochs with a figure, as fractions of the run; 0 = epoch 1). cfg_nosched is the
# write-up's ablation: "When I removed the learning-rate scheduler, I also switched the optimizer from Adam to
# AdamW and reduced the learning rate by a factor of 10" (AdamW's weight decay is not given: torch's 0.01).
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
QUICK_CFG_W = 3.0                               # --quick's: lower, for its smaller model
LABEL_DROPOUT = 0.1                             # probability of dropping the class during training
NUM_CLASSES = 10
NULL = NUM_CLASSES                              # the dropped class: its one-hot is all zeros
TRAINING_KEYS = ("dataset", "quick", "hidden", "batch_size", "lr", "seed")  # what --resume must match
LOG_EVERY = 50                                  # steps per metrics.jsonl line (and non-finite loss check)
SAMPLE_CHUNK = 250                              # --save-samples images per batch (memory, progress)
TITLES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}


# ------------------------------------------------------------------------------------------- method
def flow_path(x, eps, t):
    """x_t = t*x + (1-t)*eps and its velocity dx_t/dt = x - eps (t=0 noise, t=1 data)."""
    t = t.view(-1, 1, 1, 1)
    return t * x + (1 - t) * eps, x - eps


def denoising_loss(model, x, sigma):
    """MSE(f(x + 2*sigma*z), x) (CS180's sigma on [0, 1]); sigma=None feeds z alone: the optimum is E[x]."""
    z = torch.randn_like(x)
    noisy = z if sigma is None else x + 2 * sigma * z
    return F.mse_loss(model(noisy), x)


def flow_matching_loss(model, x, y, label_dropout):
    """MSE of the velocity at t ~ U[0, 1]; labels y dropped to NULL at label_dropout (it learns u_uncond)."""
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


def ode_solve(velocity, x, steps, on_step=None):
    """Euler steps x += dt * velocity(x, t) from t=0 (noise) to t=1 (data); on_step(x) sees each new x."""
    dt = 1.0 / steps
    for i in range(steps):
        x = x + dt * velocity(x, i * dt)
        if on_step is not None:
            on_step(x)
    return x


@torch.no_grad()
def generate(model, noise, y, cfg, steps, precision="fp32", on_step=None):
    """Images in [-1, 1] from noise (N, 1, 28, 28), on the model's device; y: labels (None for fm)."""
    model.eval()
    device = next(model.parameters()).device
    y = None if y is None else y.to(device)
    with common.autocast(device, precision):
        x = ode_solve(lambda x_t, t: guided_velocity(model, x_t, t, y, cfg), noise.to(device), steps, on_step)
    return x.clamp(-1, 1)


def load_model(path, device="cpu", compile_model=False):
    """A trained model (eval mode) and its config (the flags, the run and its settings) from a checkpoint."""
    ckpt = common.load_checkpoint(path, SCRIPT)
    if ckpt.get("run") not in RUNS or not isinstance(ckpt.get("settings"), dict):
        raise common.UserError(f"{path} names no run of {SCRIPT}.py ({ckpt.get('run')!r}); pass a checkpoint "
                               f"this version wrote")
    model = make_model(RUNS[ckpt["run"]]["cond"], ckpt["settings"].get("hidden"), device, compile_model)
    common.load_state(model, ckpt.get("model"), f"the weights of {path}")
    return model.eval(), {**ckpt["config"], **ckpt["settings"], "run": ckpt["run"]}


# -------------------------------------------------------------------------------------------- model
def conv(c_in, c_out, stride=1, up=False):
    """Conv (stride 1), DownConv (stride 2) or UpConv (up: doubles the resolution), each with BN and GELU."""
    layer = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1) if up else nn.Conv2d(c_in, c_out, 3, stride, 1)
    return nn.Sequential(layer, nn.BatchNorm2d(c_out), nn.GELU())


def conv_block(c_in, c_out):
    return nn.Sequential(conv(c_in, c_out), conv(c_out, c_out))


def resample_block(c_in, c_out, up):
    """CS180's DownBlock (a DownConv: half the size) or UpBlock (up=True: an UpConv), then a ConvBlock."""
    return nn.Sequential(conv(c_in, c_out, stride=2, up=up), conv_block(c_out, c_out))


def fc_block(f_in, f_out):
    return nn.Sequential(nn.Linear(f_in, f_out), nn.GELU(), nn.Linear(f_out, f_out))


class UNet(nn.Module):
    """The CS180 U-Net. cond='none': f(x) (the denoisers); 'time': f(x, t), the bottleneck and up1 scaled
    by FC(t); 'class': f(x, t, y), c = one_hot(y) (all zeros for NULL): u0 = c1*u0 + t1, up1 = c2*up1 + t2."""

    def __init__(self, D, cond="none"):
        super().__init__()
        self.cond = cond
        self.e0 = conv_block(1, D)                                          # 28x28
        self.e1 = resample_block(D, D, up=False)                            # 14x14
        self.e2 = resample_block(D, 2 * D, up=False)                        # 7x7
        self.flatten = nn.Sequential(nn.AvgPool2d(7), nn.GELU())            # 7 -> 1
        self.unflatten = nn.Sequential(nn.ConvTranspose2d(2 * D, 2 * D, 7, 7), nn.BatchNorm2d(2 * D),
                                       nn.GELU())                           # 1 -> 7
        self.up1 = resample_block(4 * D, D, up=True)                        # 14x14
        self.up2 = resample_block(2 * D, D, up=True)                        # 28x28
        self.head = nn.Sequential(conv_block(2 * D, D), nn.Conv2d(D, 1, 3, 1, 1))
        if cond != "none":
            self.fc1_t = fc_block(1, 2 * D)
            self.fc2_t = fc_block(1, D)
        if cond == "class":
            self.fc1_c = fc_block(NUM_CLASSES, 2 * D)
            self.fc2_c = fc_block(NUM_CLASSES, D)

    def forward(self, x, t=None, y=None):
        e0 = self.e0(x)
        e1 = self.e1(e0)
        e2 = self.e2(e1)
        u0 = self.unflatten(self.flatten(e2))
        if self.cond != "none":
            t1 = self.fc1_t(t[:, None].to(x.dtype))[:, :, None, None]
            t2 = self.fc2_t(t[:, None].to(x.dtype))[:, :, None, None]
        if self.cond == "time":
            u0 = u0 * t1
        if self.cond == "class":
            c = F.one_hot(y, NUM_CLASSES + 1)[:, :NUM_CLASSES].to(x.dtype)  # NULL -> all zeros
            c1 = self.fc1_c(c)[:, :, None, None]
            c2 = self.fc2_c(c)[:, :, None, None]
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


# ----------------------------------------------------------------------------------------- training
def make_optimizer(run, model, lr, epochs):
    optimizer = torch.optim.AdamW if run["optimizer"] == "adamw" else torch.optim.Adam
    opt = optimizer(model.parameters(), lr=lr * run["lr_scale"], fused=next(model.parameters()).is_cuda)
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


def train_run(run, name, s, data, job):
    """Train one run, then draw its figures; returns the model. A finished run (resumed) is skipped."""
    x_train, y_train, x_test = data
    torch.manual_seed(job["seed"])  # per run, so `--part cfg` trains the same cfg model as `--part all`
    model = make_model(RUNS[name]["cond"], s["hidden"], job["device"], job["compile"])
    opt, sched = make_optimizer(RUNS[name], model, s["lr"], s["epochs"])
    scaler = common.grad_scaler(job["device"], job["precision"])
    run.restore(model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    if run.epoch == s["epochs"]:
        return model
    B = s["batch_size"]
    steps_per_epoch = len(x_train) // B  # the ragged tail of each shuffle is dropped
    for epoch in run.epochs(s["epochs"], steps_per_epoch, B):
        model.train()
        perm = torch.randperm(len(x_train)).to(job["device"])
        for i in range(steps_per_epoch):
            idx = perm[i * B:(i + 1) * B]
            x = normalise(x_train[idx])
            loss = train_step(RUNS[name], model, opt, scaler, x, y_train[idx], job["precision"])
            run.log(loss, opt.param_groups[0]["lr"])
        if sched is not None:
            sched.step()  # per epoch: a grown --epochs decays on at the same rate
        run.save(run=name, settings=s)
        if epoch + 1 in {max(1, math.ceil(f * s["epochs"])) for f in RUNS[name]["snapshots"]}:
            epoch_figure(name, model, epoch + 1, s["epochs"], x_test, job)
    final_figures(run, name, model, x_train, x_test, job)
    return model


def timing_rows(plans, device, precision, compiled, sampling=None):
    """For common.benchmark: each run's training step (and, given `sampling`, its sampling) on random x."""
    rows = {}
    for name, s in plans.items():
        model = make_model(RUNS[name]["cond"], s["hidden"], device, compiled)
        opt, _ = make_optimizer(RUNS[name], model, s["lr"], s["epochs"])
        scaler = common.grad_scaler(device, precision)
        x = torch.rand(s["batch_size"], 1, 28, 28, device=device) * 2 - 1
        y = torch.arange(len(x), device=device) % NUM_CLASSES if RUNS[name]["cond"] == "class" else None
        step = functools.partial(train_step, RUNS[name], model, opt, scaler, x, y, precision)
        flow = sampling and RUNS[name]["loss"] == "flow"
        sample = functools.partial(generate, model, x, y, **sampling) if flow else None  # x as the noise
        label = f"{name} (D={s['hidden']}, batch {s['batch_size']}), {'compiled' if compiled else 'eager'}"
        rows[label] = (step, sample, s["batch_size"])
    return rows


# ------------------------------------------------------------------------------------------ figures
def fixed_noise(n, seed, device):
    """Noise from a private generator: figures never disturb the training RNG stream (resume stays exact)."""
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)).to(device)


def sample_path(model, name, noise, w, job):
    """[noise, x_1, ..., x_steps] for a figure (labels 0..9 cycled for the class model)."""
    y = torch.arange(len(noise), device=noise.device) % NUM_CLASSES if RUNS[name]["cond"] == "class" else None
    path = [noise]
    generate(model, noise, y, cfg=w, steps=job["steps"], precision=job["precision"], on_step=path.append)
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
    data = TITLES[job["dataset"]]
    if RUNS[name]["cond"] == "none":
        model.eval()
        x = normalise(x_test[:10])
        rows = torch.cat([x, denoise_rows(model, x, [SIGMA], job["seed"], job["precision"])])
        labels = ["clean", f"sigma={SIGMA}", "denoised"]
        return common.save_grid(rows, path, nrow=10, scale=2, row_labels=labels,
                                title=f"{name}: {data} test images denoised, epoch {epoch}/{epochs}")
    samples = sample_path(model, name, fixed_noise(40, job["seed"], x_test.device), job["cfg"], job)[-1]
    w = f"w={job['cfg']:g}, " if RUNS[name]["cond"] == "class" else ""
    title = f"{name}: {data} samples after epoch {epoch}/{epochs} ({w}{job['steps']} Euler steps)"
    save_samples_grid(samples, path, RUNS[name]["cond"], job["classes"], title)


def final_figures(run, name, model, x_train, x_test, job):
    spec, device, seed, steps = RUNS[name], x_test.device, job["seed"], job["steps"]
    data = TITLES[job["dataset"]]
    f = lambda figure: os.path.join(job["out"], f"{name}_{figure}")
    model.eval()
    curves = {name: run.losses}
    cfg = os.path.join(job["out"], "cfg.pt")
    if spec["ablation"] and os.path.isfile(cfg):  # the ablation's curve beside the run it ablates
        curves = {"cfg_nosched (AdamW, lr/10, constant)": run.losses,
                  "cfg (Adam, ExponentialLR)": common.load_checkpoint(cfg, SCRIPT)["losses"]}
    common.plot_curves(f("loss.png"), curves, title=f"{name}: training loss (MSE), {data}")
    if spec["loss"] == "denoise":  # a column per sigma; a row per image (noising), or noisy/denoised pairs
        x = normalise(x_test[:4])
        S = len(SIGMAS)
        by_image = lambda rows: rows.view(S, -1, 4, 1, 28, 28).permute(2, 1, 0, 3, 4, 5).flatten(0, 2)
        sigmas = [f"sigma={s}" for s in SIGMAS]
        common.save_grid(by_image(denoise_rows(None, x, SIGMAS, seed + 1, "fp32")), f("noising.png"), nrow=S,
                         scale=3, col_labels=sigmas, title=f"{data}: x + 2*sigma*z (CS180's sigma on [0, 1])")
        common.save_grid(by_image(denoise_rows(model, x, SIGMAS, seed + 1, job["precision"])), f("ood.png"),
                         nrow=S, scale=3, col_labels=sigmas, row_labels=["noisy", "out"] * 4,
                         title=f"{name}: trained at sigma={SIGMA}, applied at every sigma ({data})")
    if spec["loss"] == "noise":
        z = fixed_noise(9, seed + 1, device)
        with torch.no_grad(), common.autocast(device, job["precision"]):
            f_z = model(z).float()
        mean = normalise(x_train).mean(0, keepdim=True)
        common.save_grid(torch.cat([z, f_z, mean]), f("samples.png"), nrow=9, scale=2,
                         row_labels=["z", "f(z)", "mean"], title=f"{name}: noise z in, the {data} mean out")
    if spec["cond"] == "time":
        ts = torch.linspace(0, 1, 11, device=device)
        x_t = flow_path(normalise(x_test[:1]), fixed_noise(1, seed + 1, device), ts)[0]  # one x and eps, 11 t
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
    if spec["loss"] == "flow" and not spec["ablation"]:  # trajectory: rows = samples, columns = t; and a GIF
        path = sample_path(model, name, fixed_noise(10, seed + 1, device), job["cfg"], job)
        cols = sorted({round(i * steps / 10) for i in range(11)})
        w = f"w={job['cfg']:g}, " if spec["cond"] == "class" else ""
        title = f"{name}: sampling from t=0 to 1 ({data}, {w}{steps} Euler steps)"
        common.save_grid(torch.stack([path[i] for i in cols], 1).flatten(0, 1), f("trajectory.png"),
                         nrow=len(cols), scale=2, col_labels=[f"{i / steps:.1f}" for i in cols], title=title,
                         row_labels=job["classes"] if spec["cond"] == "class" else None)
        common.save_gif(path, f("trajectory.gif"), nrow=10, scale=2, title=title)
    if spec["cond"] == "class" and not spec["ablation"]:  # same noise for every w: columns differ only by w
        sweep = [sample_path(model, name, fixed_noise(20, seed + 2, device), w, job)[-1] for w in GUIDANCE]
        grid = torch.stack(sweep).view(len(GUIDANCE), 2, NUM_CLASSES, 1, 28, 28).permute(2, 0, 1, 3, 4, 5)
        common.save_grid(grid.flatten(0, 2), f("guidance.png"), nrow=2 * len(GUIDANCE), scale=2,
                         row_labels=job["classes"], col_labels=[s for w in GUIDANCE for s in (f"w={w}", "")],
                         title=f"{name}: guidance scale w ({data}, {steps} Euler steps)")


def write_samples(model, name, path, args, w, precision, dataset, batch=SAMPLE_CHUNK):
    """An .npz of --num-samples samples of run `name` (labels 0..9 in turn; -1 for fm), the noise of sample j
    from (--seed, j): the file does not depend on the batch size."""
    labels = [j % NUM_CLASSES if RUNS[name]["cond"] == "class" else -1 for j in range(args.num_samples)]
    sample = functools.partial(generate, model, cfg=w, steps=args.steps, precision=precision)
    common.save_samples(path, sample, args.num_samples, batch, (1, 28, 28), labels, args.seed,
                        f"--dataset {dataset} --data-dir {args.data_dir}")


# --------------------------------------------------------------------------------------------- data
def load_data(dataset, data_dir, quick, device):
    """The training split (--quick: its first QUICK_IMAGES) as uint8 on the device; 64 test images."""
    x, y = common.load_dataset(dataset, data_dir, train=True)
    if quick:
        x, y = x[:QUICK_IMAGES], y[:QUICK_IMAGES]
    x_test, _ = common.load_dataset(dataset, data_dir, train=False)
    return x.to(device), y.to(device), x_test[:64].to(device)


def normalise(x_uint8):
    return x_uint8.float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("--part", choices=["denoise", "noise", "fm", "cfg", "all"], default="all",
        help="which part to run; --resume goes on with the runs of its checkpoint's part")
    add("--dataset", choices=["mnist", "fashion"], default="mnist", help="MNIST or Fashion-MNIST")
    add("--data-dir", default="data", help="holds MNIST/raw or FashionMNIST/raw (downloaded if absent)")
    common.add_run_flags(p, SCRIPT, num_samples=100)
    add("--quick", action="store_true", help=f"CPU preset: the first {QUICK_IMAGES:,} training images, no "
        "ablation, and the --quick numbers of the flags below")
    add("--epochs", type=int, help="epochs per run (recipe: denoise/noise 5, fm/cfg 10; --quick 1/1/3/10)")
    add("--batch-size", type=int, help="batch size (recipe: denoise/noise 256, fm/cfg 64; --quick 64)")
    add("--lr", type=float, help="learning rate (recipe: denoise/noise 1e-4, fm/cfg 1e-2; --quick "
        "1e-3/1e-3/1e-2/1e-2); the cfg_nosched ablation takes a tenth of it, with AdamW")
    add("--hidden", type=int, help="U-Net width D (recipe: denoise/noise 128, fm/cfg 64; --quick 32)")
    add("--steps", type=int, default=50, help="Euler steps when sampling")
    add("--cfg", type=float, help=f"guidance scale w of the class model (recipe {CFG_W:g}, --quick "
        f"{QUICK_CFG_W:g}; 0 = unconditional, 1 = no guidance)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.check_run_flags(args)  # every flag checked before anything is read or written
    common.check_positive(args, "lr", "hidden")
    common.check_range(args, "cfg", 0, 100)
    device = common.get_device(args.device)
    precision = common.precision_for(args.precision, device)
    if args.sample:  # no training: the checkpoint's run, dataset and preset, whatever the flags say
        model, config = load_model(args.sample, device, args.compile)
        cond = RUNS[config["run"]]["cond"]
        if cond == "none":
            raise common.UserError(f"{args.sample} holds the {config['run']} denoiser, which cannot sample; "
                                   "pass an fm or cfg checkpoint")
        out = common.prepare_out(args.out)
        w = args.cfg if args.cfg is not None else (QUICK_CFG_W if config["quick"] else CFG_W)
        path = args.save_samples or os.path.join(out, "samples.npz")
        write_samples(model, config["run"], path, args, w, precision, config["dataset"])
        images = normalise(torch.from_numpy(np.load(path)["images"]))  # the grid shows what the file holds
        guided = f"w={w:g}, " if cond == "class" else ""
        title = f"{config['run']}: samples ({TITLES[config['dataset']]}, {guided}{args.steps} Euler steps)"
        classes = common.CLASS_NAMES[config["dataset"]]
        return save_samples_grid(images, os.path.join(out, "samples.png"), cond, classes, title)
    ckpt = common.load_checkpoint(args.resume, SCRIPT, vars(args), TRAINING_KEYS) if args.resume else None
    part = ckpt["config"]["part"] if ckpt else args.part  # --resume goes on with the checkpoint's --part
    names = [r for r in RUNS if part in ("all", RUNS[r]["part"]) and not (args.quick and RUNS[r]["ablation"])]
    given = {k: getattr(args, k) for k in RECIPE["fm"] if getattr(args, k) is not None}  # flags over a preset
    preset = QUICK if args.quick else RECIPE
    plans = {name: dict(preset[RUNS[name]["part"]], **given) for name in names}  # each run's settings
    w = args.cfg if args.cfg is not None else (QUICK_CFG_W if args.quick else CFG_W)
    if args.benchmark:  # img/s of each run's model, eager and compiled
        plans = {name: s for name, s in plans.items() if not RUNS[name]["ablation"]}
        sampling = dict(cfg=w, steps=args.steps, precision=precision)
        rows = {**timing_rows(plans, device, precision, False, sampling),
                **timing_rows(plans, device, precision, True, sampling)}
        return common.benchmark(rows, device)
    if ckpt:  # the runs before the resumed one are done
        names = names[names.index(ckpt["run"]):]
        if plans[ckpt["run"]]["epochs"] < ckpt["epoch"]:
            raise common.UserError(f"{args.resume} has trained {ckpt['epoch']} epochs, more than --epochs "
                                   f"{plans[ckpt['run']]['epochs']}; pass --epochs {ckpt['epoch']} or more")
    sampled = [r for r in names if RUNS[r]["loss"] == "flow" and not RUNS[r]["ablation"]]
    if args.save_samples and not sampled:
        raise common.UserError(f"--save-samples needs an fm or cfg model, but this run trains only "
                               f"{', '.join(names)}; pass --part fm, cfg or all, or --sample CKPT")
    runs = {}
    for name in names:
        run_args = dict(vars(args), part=part)  # the checkpoint's config: a later --resume reads its part
        if ckpt and name != ckpt["run"]:  # the runs after the resumed one train afresh, replacing their files
            run_args.update(resume=None, overwrite=True)
        runs[name] = common.Run(SCRIPT, argparse.Namespace(**run_args), TRAINING_KEYS, name=name, label=name,
                                log_every=LOG_EVERY)
    data = runs[names[0]].load(lambda: load_data(args.dataset, args.data_dir, args.quick, device))
    n_train = len(data[0])
    biggest = max(plans[name]["batch_size"] for name in names)
    if biggest > n_train:  # here, before the CPU estimate times steps of that batch
        raise common.UserError(f"{args.data_dir} holds {n_train} {TITLES[args.dataset]} training images, "
                               f"fewer than the batch size {biggest}; pass a smaller --batch-size")
    print(f"device {device}; {n_train} {TITLES[args.dataset]} training images; runs: {', '.join(names)}")
    if device.type == "cpu" and not args.quick and not args.resume:  # the GPU recipe: how long it takes here
        print("timing 2 steps of each run to estimate the run time on this CPU...", flush=True)
        speeds = common.benchmark(timing_rows(plans, device, precision, compiled=False), device, calls=1)
        seconds = sum(s["epochs"] * (n_train // s["batch_size"]) * s["batch_size"] / train_speed
                      for s, (train_speed, _) in zip(plans.values(), speeds.values()))
        print(f"note: this is the GPU-sized CS180 recipe; on this CPU its training alone would take about "
              f"{common.format_time(seconds)}. For a CPU run use --quick.", flush=True)
    job = dict(device=device, precision=precision, compile=args.compile, steps=args.steps, seed=args.seed,
               cfg=w, dataset=args.dataset, classes=common.CLASS_NAMES[args.dataset], out=args.out)
    models = {name: train_run(runs[name], name, plans[name], data, job) for name in names}
    if args.save_samples:
        write_samples(models[sampled[-1]], sampled[-1], args.save_samples, args, w, precision, args.dataset)


if __name__ == "__main__":
    common.run(main)
