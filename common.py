"""The little code the four scripts share: errors, device, seeding, data, images, plots, checkpoints,
progress and torchrun/DDP. Everything about a method (networks, losses, samplers) lives in its script."""
import io
import math
import os
import pickle
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw


# ----------------------------------------------------------------------------------------- errors
class UserError(Exception):
    """Bad input (missing data, wrong checkpoint, impossible flag): reported in one sentence, exit code 2."""


def run(main):
    """Run a script's main(); a UserError prints its message and exits with code 2, without a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def prepare_out(path):
    """Create the output folder and make sure we can write into it before any work starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the output folder {path} ({e.strerror}); pass a writable folder with --out")
    return path


def check_output_file(path, flag):
    """Fail at the start, not after hours of training, when a file asked for (e.g. --save-samples) can't be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {flag} {path}: its folder does not exist or is not writable; create it or pass another path")
    return path


# ------------------------------------------------------------------------------- device and seeds
def get_device(name=None):
    """cuda, then mps, then cpu; an explicit name (e.g. 'cpu', 'cuda:1') wins."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but this machine has no CUDA GPU; use --device cpu")
        if name.startswith("cuda:") and not (name[5:].isdigit() and int(name[5:]) < torch.cuda.device_count()):
            raise UserError(f"--device {name}: this machine has CUDA devices 0 to {torch.cuda.device_count() - 1}")
        if name == "mps" and not torch.backends.mps.is_available():
            raise UserError("--device mps asked for, but MPS is not available here; use --device cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    """All RNG states, in a form torch.load(weights_only=True) accepts, so --resume continues the same stream."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------ torchrun/DDP
def setup_ddp(device_name=None):
    """Returns (rank, world_size, device). Under `torchrun` it joins the process group (NCCL on GPUs,
    gloo on CPUs) and gives each rank its own GPU; a plain `python script.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, get_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = get_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_rng_states():
    """Every DDP rank's rng_state() as a list indexed by rank (call it on every rank), so a resumed torchrun job
    continues each rank's stream. Sent as torch.save bytes: all_gather_object can't pickle numpy's uint32 state tensor."""
    if not (dist.is_available() and dist.is_initialized()):
        return [rng_state()]
    buf, states = io.BytesIO(), [None] * dist.get_world_size()
    torch.save(rng_state(), buf)
    dist.all_gather_object(states, buf.getvalue())
    return [torch.load(io.BytesIO(s), weights_only=True) for s in states]


def set_rank_rng_state(states, fresh_seed):
    """Restore this rank's entry of all_rng_states(). Saved by another number of processes, the streams can't continue:
    each rank starts a fresh one from fresh_seed + rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if len(states) == world:
        set_rng_state(states[rank])
    else:
        seed_everything(fresh_seed + rank)


# -------------------------------------------------------------------------------------------- data
# name -> (torchvision class, folder under --data-dir, files of the training and test splits, how to get them offline)
DATASETS = {
    "mnist": ("MNIST", "MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
              ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"], "the four gunzipped idx files from yann.lecun.com"),
    "fashion": ("FashionMNIST", "FashionMNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
                ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
                "the four gunzipped idx files (Debian: apt install dataset-fashion-mnist, then gunzip "
                "/usr/share/datasets/fashion-mnist/*.gz)"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "the python version of CIFAR-10 (cifar-10-python.tar.gz), unpacked"),
}
CLASS_NAMES = {
    "mnist": [str(k) for k in range(10)],
    "fashion": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def load_dataset(name, data_dir, train=True):
    """MNIST, Fashion-MNIST or CIFAR-10 as one uint8 tensor (N, C, H, W) and int64 labels, read straight from the files
    torchvision downloads; downloaded into data_dir when absent and the network allows. Nothing is left behind on failure."""
    cls, sub, train_files, test_files, offline = DATASETS[name]
    where = os.path.join(data_dir, sub)
    files = [os.path.join(where, f) for f in (train_files if train else test_files)]
    layout = f"{os.path.join(data_dir, sub)}/{{{','.join(train_files + test_files)}}}"
    if not all(os.path.isfile(f) for f in files):
        created = [d for d in (data_dir, os.path.join(data_dir, sub.split("/")[0]), where) if not os.path.exists(d)]
        try:
            import torchvision
            getattr(torchvision.datasets, cls)(data_dir, train=train, download=True)
        except Exception as e:  # no network, disk full, server down: all end the same way for the user
            for d in reversed(created):  # a failed download leaves no empty folders behind
                shutil.rmtree(d, ignore_errors=True)
            raise UserError(f"{cls} is not in {os.path.abspath(data_dir)} and could not be downloaded ({e}); put {offline} "
                            f"at {layout} (see 'Running offline' in the README) or pass --data-dir DIR")
    if name == "cifar10":
        parts = [read_cifar_batch(f) for f in files]
        return torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(np.concatenate([p[1] for p in parts]))
    images, labels = read_idx(files[0], 3), read_idx(files[1], 1)
    check_labels(files[1], labels, len(images), 10)
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64))


def read_idx(path, ndim):
    """An MNIST idx file: magic 0x0000 08 ndim (uint8 data), ndim big-endian sizes, then the bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 8, ndim]):
        raise UserError(f"{path} is not an idx file of {ndim}-D uint8 data (bad header); replace it with the original file")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise UserError(f"{path} holds {data.size} bytes of data where its header says {math.prod(shape)}; "
                        f"the file is truncated: replace it with the original")
    return data.reshape(shape)


def check_labels(path, labels, n_images, n_classes):
    if len(labels) != n_images:
        raise UserError(f"{path} has {len(labels)} labels for {n_images} images; replace it with the matching original file")
    if len(labels) and not (0 <= labels.min() and labels.max() < n_classes):
        raise UserError(f"{path} has labels outside 0..{n_classes - 1}; replace it with the original file")


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the real CIFAR-10 batches hold (dicts, lists, strings, bytes, ints and numpy arrays): a crafted
    pickle can't call anything else, so loading a data file never runs code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
               ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as e:
        raise UserError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); replace it with the original file")
    check_labels(path, labels, len(images), 10)
    return images, labels


# ------------------------------------------------------------------------------------------ images
def to_uint8(x):
    """[-1, 1] floats -> uint8 in [0, 255], the inverse of x / 127.5 - 1."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def grid_image(images, nrow, scale=1, pad=2, row_labels=None, col_labels=None):
    """Tile (N, C, H, W) images in [-1, 1] into a PIL image, nrow images per row, with optional labels."""
    import torchvision

    grid = torchvision.utils.make_grid(to_uint8(images), nrow=nrow, padding=pad, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if not (row_labels or col_labels):
        return img
    left = 8 + 6 * max((len(s) for s in row_labels or []), default=0)
    top = 14 if col_labels else 0
    out = Image.new("RGB", (img.width + left, img.height + top), "white")
    out.paste(img, (left, top))
    draw = ImageDraw.Draw(out)
    cell_h, cell_w = images.shape[2] * scale + pad * scale, images.shape[3] * scale + pad * scale
    for i, s in enumerate(row_labels or []):
        draw.text((2, top + i * cell_h + cell_h // 2 - 5), s, fill="black")
    for j, s in enumerate(col_labels or []):
        draw.text((left + j * cell_w + 2, 1), s, fill="black")
    return out


def save_grid(images, path, nrow, **kwargs):
    grid_image(images, nrow, **kwargs).save(path)


def save_gif(frames, path, nrow, scale=1, ms_per_frame=80):
    """frames: a list of (N, C, H, W) batches in [-1, 1]; the last frame is held for a second."""
    imgs = [grid_image(f, nrow, scale=scale).convert("P", palette=Image.ADAPTIVE) for f in frames]
    durations = [ms_per_frame] * (len(imgs) - 1) + [1000]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=durations, loop=0)


def save_samples_npz(path, images, labels):
    """Samples for outside evaluation (FID etc.): `images` uint8 (N, C, H, W), `labels` int64 (N,)."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, images=to_uint8(images).numpy(), labels=np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- plots
def plot_curves(path, curves, title="training loss", xlabel="step", ylabel="loss", log_y=True, size=(640, 400)):
    """Line plot with PIL (no matplotlib). curves: {name: list of y, or (xs, ys)}. Long noisy curves are
    drawn faint with a moving average on top."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    series = {}
    for name, c in curves.items():
        xs, ys = c if isinstance(c, tuple) else (list(range(1, len(c) + 1)), c)
        keep = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log_y)]
        if keep:
            series[name] = keep
    W, H = size
    L, R, T, B = 70, 20, 30, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((L, 8), title, fill="black")
    if not series:
        img.save(path)
        return
    f = math.log10 if log_y else (lambda v: v)
    all_x = [x for s in series.values() for x, _ in s]
    all_y = [f(y) for s in series.values() for _, y in s]
    x0, x1 = min(all_x), max(all_x)
    y0, y1 = min(all_y), max(all_y)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    py = lambda y: H - B - (f(y) - y0) / (y1 - y0) * (H - T - B)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):  # ticks: evenly spaced in plot space, labelled in data units
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        xp, yp = px(xv), H - B - (H - T - B) * i / 4
        d.line([xp, H - B, xp, H - B + 4], fill="black")
        d.text((xp - 12, H - B + 6), f"{xv:.4g}", fill="black")
        d.line([L - 4, yp, L, yp], fill="black")
        d.text((4, yp - 6), f"{10 ** yv if log_y else yv:.3g}", fill="black")
    d.text(((L + W - R) // 2 - 3 * len(xlabel), H - 18), xlabel, fill="black")
    d.text((4, T - 14), ylabel + (" (log)" if log_y else ""), fill="black")
    for k, (name, pts) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        window = max(1, len(pts) // 50)
        if window > 1:
            faint = tuple(255 - (255 - c) // 4 for c in colour)
            d.line([(px(x), py(y)) for x, y in pts], fill=faint)
            ys = np.convolve([y for _, y in pts], np.ones(window) / window, mode="valid")
            pts = list(zip([x for x, _ in pts][window - 1:], ys))
        d.line([(px(x), py(y)) for x, y in pts], fill=colour, width=2)
        d.text((W - R - 150, T + 6 + 14 * k), name, fill=colour)
    img.save(path)


# ------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, state):
    """Write to a temp file in the same folder, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, script, config=None, must_match=()):
    """Load a checkpoint written by `script` and check that the keys in must_match agree with config.
    Checkpoints hold: script, config (the argparse namespace as a dict), model, and whatever the script adds."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass the checkpoint file inside it (e.g. {os.path.join(path, 'last.pt')})")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; pass a .pt file written by {script}.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt); pass another one or retrain")
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        owner = ckpt.get("script") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} was written by {owner or 'another program'}, not {script}.py; pass a checkpoint of {script}.py")
    if not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{path} has no saved settings, so it is not a checkpoint of {script}.py; pass one written by {script}.py")
    for key in must_match:
        theirs, ours = ckpt["config"].get(key), (config or {}).get(key)
        if theirs != ours:
            raise UserError(f"{path} was trained with {key}={theirs!r} but this run has {key}={ours!r}; "
                            f"pass the same setting or another checkpoint")
    return ckpt


# ---------------------------------------------------------------------------------------- progress
class Progress:
    """Prints `step 120/9380 | loss 0.0512 | 1234 img/s | ETA 3m12s` about every `every` seconds."""

    def __init__(self, total_steps, start_step=0, every=10.0, prefix="", enabled=True):
        """start_step: the step a resumed run starts from, so the ETA counts only this run's steps."""
        self.total, self.start_step, self.every, self.prefix, self.enabled = total_steps, start_step, every, prefix, enabled
        self.start = self.last = time.time()
        self.images = 0

    def update(self, step, loss, batch_images):
        """Called after `step` (counted from the start of training) with the images trained since the last call."""
        self.images += batch_images
        now = time.time()
        if not self.enabled or (now - self.last < self.every and step != self.total):
            return
        rate = self.images / max(now - self.last, 1e-9)
        eta = (self.total - step) * (now - self.start) / max(step - self.start_step, 1)
        print(f"{self.prefix}step {step}/{self.total} | loss {loss:.4f} | {rate:.0f} img/s | ETA {format_time(eta)}", flush=True)
        self.last, self.images = now, 0


def format_time(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
