"""The little code the four scripts and evaluate.py share; everything about a method lives in its script.

Sections: errors, flag checks, output folders, device and seeds, precision, torchrun/DDP, data, images,
plots, checkpoints and metrics.jsonl, progress, the training run (class Run), samples for scoring, benchmark.
"""
import argparse
import hashlib
import io
import json
import math
import os
import pickle
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont


# ----------------------------------------------------------------------------------------- errors
class UserError(Exception):
    """Bad input (missing data, wrong checkpoint, impossible flag): reported in one sentence, exit code 2."""


def _interrupt(signum, frame):
    # SIGTERM (a scheduler, `kill`) ends like Ctrl-C, so that `finally` blocks remove temp files
    raise KeyboardInterrupt


def run(main):
    """Run a script's main(). A UserError prints its message and exits with code 2, without a traceback;
    Ctrl-C or SIGTERM prints one line and exits with 130."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with it ignored (`cmd &`)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------ flag checks
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help in one style for every script: the module docstring as written, and each flag's real default
    shown once (none for flags without one, e.g. switches and optional files)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})"


def check_finite(args):
    """NaN slips through every comparison (nan <= 0 is False): refuse any non-finite float flag first."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {v}")


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_range(args, name, lo, hi):
    value = getattr(args, name)
    if value is not None and not lo <= value <= hi:
        raise UserError(f"--{name.replace('_', '-')} must be between {lo:,} and {hi:,}, got {value:,}")


def check_seed(args):
    check_range(args, "seed", 0, 2**31 - 1)  # numpy takes seeds below 2**32; the scripts add offsets to it


def add_run_flags(p, script, num_samples):
    """The flags every training script has, with one meaning everywhere."""
    add = p.add_argument
    add("--out", default=os.path.join("runs", script), help="output folder")
    add("--overwrite", action="store_true", help="train afresh in an --out that holds a checkpoint")
    add("--resume", metavar="CKPT", help="continue the training that wrote CKPT (pass the same flags; "
        "--epochs may grow)")
    add("--sample", metavar="CKPT", help="no training: sample this checkpoint (figures into --out)")
    add("--save-samples", metavar="FILE.npz", help="write --num-samples samples (classes in turn) as .npz "
        "for evaluate.py, after training or with --sample")
    add("--num-samples", type=int, default=num_samples, help="samples --save-samples writes, 1 to 1,000,000")
    add("--device", help="cpu, cuda, cuda:N or mps (unset: the best available)")
    add("--precision", choices=PRECISIONS, default="auto", help="autocast: auto is bf16 on GPUs of compute "
        "capability >= 8.0, fp16 with a gradient scaler on older GPUs, fp32 on a CPU")
    add("--seed", type=int, default=0, help="random seed, 0 to 2**31-1")
    add("--compile", action="store_true", help="torch.compile the network (slower start, faster steps)")
    add("--benchmark", action="store_true", help="no training: print training and sampling img/s")


def check_run_flags(args):
    """The checks of add_run_flags' flags and of --epochs, --batch-size and --steps, before any work."""
    check_finite(args)
    check_seed(args)
    check_range(args, "num_samples", 1, 1_000_000)
    check_range(args, "epochs", 1, 100_000)
    check_range(args, "batch_size", 1, 1_000_000)
    check_range(args, "steps", 1, 10_000)
    get_device(args.device)  # refuses a name that is no device, or one this machine lacks
    if args.sample and args.resume:
        raise UserError("pass either --sample CKPT (no training) or --resume CKPT (training), not both")
    if args.save_samples and not args.save_samples.endswith(".npz"):
        raise UserError(f"--save-samples {args.save_samples}: pass a file name ending in .npz")
    if args.save_samples:
        check_output_file(args.save_samples, "--save-samples", out=args.out)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if not (args.sample or args.benchmark) and args.batch_size and args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} (the global batch) must divide evenly over the "
                        f"{world} processes")


# --------------------------------------------------------------------------------- output folders
def prepare_out(path):
    """Create --out and check that it is writable, before any work."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the output folder {path} ({e.strerror}); "
                        f"pass a writable folder with --out")
    return path


def check_output_file(path, flag, out=None):
    """Fail at the start, not after hours of training, when a file asked for (e.g. --save-samples) can't be
    written. One inside the run's --out `out`, not made yet, is checked when prepare_out makes that folder."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{flag} {path} exists and is not a regular file (a folder?); "
                        f"pass the path of a file")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} exists and is read-only; pass another path")
    folder = os.path.dirname(os.path.abspath(path))
    if out and folder == os.path.abspath(out) and not os.path.exists(folder):
        return path
    probe = os.path.join(folder, f".{os.path.basename(path)}.probe-{os.getpid()}")
    try:
        open(probe, "x").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write {flag} {path} ({e.strerror or e}); "
                        f"create its folder or pass another path")
    return path


LOCKS = []  # lock_out's open files, kept for the life of the process: closing one releases its lock


def lock_out(folder):
    """Hold an exclusive lock on folder/.lock for the life of the process, so two trainings can't share an
    --out. The OS releases it when the process ends, even when it is killed."""
    import fcntl  # Unix only: imported here so that importing common works everywhere
    path = os.path.join(folder, ".lock")
    try:  # O_NOFOLLOW: a .lock that is a link to another file is refused
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as e:
        raise UserError(f"cannot open the lock file {path} ({e.strerror}; a link or a folder?); "
                        f"remove it or pass another --out")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise UserError(f"{folder} is in use by another training run (`fuser {path}` names it); wait for it, "
                        f"stop it, or pass another --out")
    LOCKS.append(f)


# ------------------------------------------------------------------------------- device and seeds
def get_device(name=None):
    """cuda, then mps, then cpu; an explicit name (e.g. 'cpu', 'cuda:1') wins."""
    if not name:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise UserError(f"--device {name} is not a device; pass cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this machine has no CUDA GPU; use --device cpu")
    if name.startswith("cuda:"):
        count = torch.cuda.device_count()
        if int(name[5:]) >= count:  # the pattern above made sure it is a number
            raise UserError(f"--device {name}: this machine has CUDA devices 0 to {count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but MPS is not available here; use --device cpu")
    return torch.device(name)


def rng_state():
    """The RNG states of the CPU and every CUDA device (the scripts draw from no other), so that --resume
    continues the streams."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ precision
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def choose_precision(flag, device_type, capability=None):
    """auto: bf16 on GPUs with native bf16 (compute capability >= 8.0: A100, L4, H100, RTX 30xx and newer),
    fp16 with a gradient scaler on older GPUs (T4, V100), fp32 on CPU and MPS."""
    if flag == "auto":
        if device_type != "cuda":
            return "fp32"
        return "bf16" if capability >= (8, 0) else "fp16"
    if flag == "fp16" and device_type != "cuda":
        raise UserError(f"--precision fp16 needs a CUDA GPU (half precision on {device_type} is unsupported "
                        f"or very slow); use --precision fp32 or bf16")
    if flag == "bf16" and device_type == "cuda" and capability < (8, 0):
        raise UserError(f"--precision bf16 needs a GPU with native bf16 (compute capability 8.0+; this one "
                        f"has {capability[0]}.{capability[1]}); use --precision fp16")
    return flag


def precision_for(flag, device, log=print):
    """The precision for this device, printed once."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    precision = choose_precision(flag, device.type, capability)
    notes = {"fp32": "", "bf16": " (autocast; weights and checkpoints stay fp32)",
             "fp16": " (autocast; weights and checkpoints stay fp32) with a gradient scaler"}
    log(f"precision: {precision}{notes[precision]}")
    return precision


def autocast(device, precision):
    """Mixed precision for the forward passes; fp32 is a no-op context."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def grad_scaler(device, precision):
    """fp16 gradients underflow without loss scaling; for the other precisions the scaler does nothing."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


# ------------------------------------------------------------------------------------ torchrun/DDP
def setup_ddp(device_name=None):
    """Returns (rank, world_size, device). Under `torchrun` it joins the process group (NCCL on GPUs,
    gloo on CPUs) and gives each rank its own GPU; a plain `python script.py` is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = get_device(device_name)
    if world == 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def rank0_first(load, rank, world):
    """load() on rank 0 first (it may download or build a cache), then on the others. Any failure on rank 0
    (bad input, a full disk, Ctrl-C) is sent to every rank, so none waits for it until the group times out."""
    error, result = [None], None
    try:
        if rank == 0:
            result = load()
    except BaseException as e:
        error[0] = str(e) if isinstance(e, UserError) else f"rank 0 stopped ({type(e).__name__}: {e})"
        if world > 1:
            dist.broadcast_object_list(error, src=0)
        raise
    if world > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise UserError(error[0])
    return result if rank == 0 else load()


def all_rng_states():
    """Every rank's rng_state(), indexed by rank (call it on every rank), so that a resumed torchrun job
    continues each rank's stream. Sent as torch.save bytes: gathering the tensor dicts themselves made a rank
    abort at exit now and then (two CPU processes under torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [rng_state()]
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, buf.getvalue())
    return [torch.load(io.BytesIO(s), weights_only=True) for s in states]


# -------------------------------------------------------------------------------------------- data
# name -> (torchvision class, folder under --data-dir, training files, test files, what to put there offline)
DATASETS = {
    "mnist": ("MNIST", "MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
              ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
              "the four gunzipped idx files from yann.lecun.com"),
    "fashion": ("FashionMNIST", "FashionMNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"],
                ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
                "the four gunzipped idx files (Debian: apt install dataset-fashion-mnist, then gunzip "
                "/usr/share/datasets/fashion-mnist/*.gz)"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "the python version of CIFAR-10 (cifar-10-python.tar.gz), unpacked"),
}
CLASS_NAMES = {
    "mnist": [str(k) for k in range(10)],
    "fashion": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def load_dataset(name, data_dir, train=True):
    """MNIST, Fashion-MNIST or CIFAR-10 as uint8 images (N, C, H, W) and int64 labels, read from the files
    torchvision downloads (into data_dir when absent and the network allows)."""
    cls, sub, train_files, test_files, offline = DATASETS[name]
    where = os.path.join(data_dir, sub)
    files = [os.path.join(where, f) for f in (train_files if train else test_files)]
    if not all(os.path.isfile(f) for f in files):
        try:
            import torchvision
            getattr(torchvision.datasets, cls)(data_dir, train=train, download=True)
        except Exception as e:  # no network, disk full, server down: all end the same way for the user
            reason = " ".join(str(e).split())  # torchvision's message spans lines: keep one
            layout = f"{where}/{{{','.join(train_files + test_files)}}}"
            raise UserError(f"{cls} is not in {os.path.abspath(data_dir)} and could not be downloaded "
                            f"({reason}); put {offline} at {layout} (see 'Running offline' in the README) "
                            f"or pass --data-dir DIR")
    if name == "cifar10":
        parts = [read_cifar_batch(f) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(images), torch.from_numpy(labels)
    images = read_idx(files[0], 3)
    if images.shape[1:] != (28, 28):
        raise UserError(f"{files[0]} holds {images.shape[1]}x{images.shape[2]} images, not {cls}'s 28x28; "
                        f"replace it with the original file")
    labels = read_idx(files[1], 1)
    check_labels(files[1], labels, len(images), 10)
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels.astype(np.int64))


def read_idx(path, ndim):
    """An MNIST idx file: magic 0x0000 08 ndim (uint8 data), ndim big-endian sizes, then the bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 8, ndim]):
        raise UserError(f"{path} is not an idx file of {ndim}-D uint8 data (bad header); "
                        f"replace it with the original file")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise UserError(f"{path} holds {data.size} bytes of data where its header says {math.prod(shape)}; "
                        f"the file is truncated: replace it with the original")
    return data.reshape(shape)


def check_labels(path, labels, n_images, n_classes):
    if len(labels) != n_images:
        raise UserError(f"{path} has {len(labels)} labels for {n_images} images; "
                        f"replace it with the matching original file")
    if len(labels) and not (0 <= labels.min() and labels.max() < n_classes):
        raise UserError(f"{path} has labels outside 0..{n_classes - 1}; replace it with the original file")


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what the real CIFAR-10 batches hold (dicts, lists, strings, bytes, ints and numpy arrays):
    a crafted pickle can't call anything else, so loading a data file never runs code."""
    ALLOWED = {  # numpy 2 renamed numpy.core to numpy._core
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar_batch(path):
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
        if np.asarray(batch["data"]).dtype != np.uint8:  # a cast would turn NaN or 300.0 into some byte
            raise TypeError(f"its pixels are {np.asarray(batch['data']).dtype}, not uint8")
        images = np.asarray(batch["data"]).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as e:
        reason = " ".join(str(e).split())  # a pickle error's text may span lines
        raise UserError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {reason}); "
                        f"replace it with the original file")
    check_labels(path, labels, len(images), 10)
    return images, labels


# ------------------------------------------------------------------------------------------ images
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # of a folder of images


def load_image(path, size, crop=None):
    """An image file as uint8 (3, H, W) RGB for size (H, W): its centre square (at most crop x crop: CelebA's
    178 is the face of its 178x218 aligned images), resized bicubic. celeba_jit.py trains on what this gives
    and evaluate.py scores against it, so that FID compares like with like."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
        side = min(img.width, img.height, crop or img.width)
        left = (img.width - side) // 2
        top = (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize(size[::-1], Image.BICUBIC)
    except Exception as e:  # any decoder failure, PIL's DecompressionBombError included
        raise UserError(f"{path} is not a readable image ({type(e).__name__}: {e}); remove it")
    return np.asarray(img).transpose(2, 0, 1)


def to_uint8(x):
    """[-1, 1] floats -> uint8 in [0, 255], the inverse of x / 127.5 - 1."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def font(size=13):
    return ImageFont.load_default(size=size)  # a scalable font: Pillow >= 10.1


def grid_image(images, nrow, scale=1, pad=2, row_labels=None, col_labels=None, title=None):
    """(N, C, H, W) images in [-1, 1] tiled into a PIL image, nrow per row, with optional labels and title."""
    import torchvision
    grid = torchvision.utils.make_grid(to_uint8(images), nrow=nrow, padding=pad, pad_value=255)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if not (row_labels or col_labels or title):
        return img
    f = font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # the text must be measured before the canvas is sized
    left = 6 + max((measure.textlength(s, font=f) for s in row_labels or []), default=0)
    top = (18 if title else 0) + (16 if col_labels else 0)
    width = max(img.width + int(left), int(measure.textlength(title or "", font=f)) + 8)
    out = Image.new("RGB", (width, img.height + top), "white")
    out.paste(img, (int(left), top))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((4, 2), title, fill="black", font=f)
    cell_h = (images.shape[2] + pad) * scale
    cell_w = (images.shape[3] + pad) * scale
    for i, s in enumerate(row_labels or []):
        draw.text((2, top + i * cell_h + cell_h // 2), s, fill="black", font=f, anchor="lm")
    for j, s in enumerate(col_labels or []):
        draw.text((int(left) + j * cell_w + 2, top - 15), s, fill="black", font=f)
    return out


def save_image(img, path, **kwargs):
    """A PIL image written atomically: a kill mid-write never leaves a truncated figure."""
    atomic_write(path, lambda tmp: img.save(tmp, **kwargs))


def save_grid(images, path, nrow, **kwargs):
    save_image(grid_image(images, nrow, **kwargs), path)


def save_gif(frames, path, nrow, scale=1, ms_per_frame=80, title=None):
    """frames: a list of (N, C, H, W) batches in [-1, 1]; the last frame is held for a second."""
    imgs = [grid_image(f, nrow, scale=scale, title=title).convert("P", palette=Image.ADAPTIVE)
            for f in frames]
    durations = [ms_per_frame] * (len(imgs) - 1) + [1000]
    save_image(imgs[0], path, save_all=True, append_images=imgs[1:], duration=durations, loop=0)


# ------------------------------------------------------------------------------------------- plots
def nice_ticks(lo, hi, count):
    """About `count` whole-number ticks (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    raw = (hi - lo) / max(count - 1, 1) or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    step = max(step, 1)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def log_ticks(e0, e1):
    """Round ticks from 10**e0 to 10**e1: the powers of ten, or 1, 2, 5 (or 1 to 9) times them if too few."""
    decades = range(math.floor(e0), math.ceil(e1) + 1)
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** e for e in decades for m in mantissas if e0 <= math.log10(m * 10.0 ** e) <= e1]
        if len(ticks) >= 3:
            return ticks
    return ticks


def plot_curves(path, curves, title):
    """Loss curves {name: the loss of each step, at least one finite and positive} on a log scale, drawn with
    PIL. A long noisy curve is drawn faint, its moving average on top."""
    series = {}
    for name, losses in curves.items():
        points = [(x, y) for x, y in enumerate(losses, 1) if math.isfinite(y) and y > 0]
        if points:
            series[name] = points
    W, H = 720, 420
    L, R, T, B = 78, 20, 44, 50  # the margins (left, right, top, bottom) hold the tick labels and titles
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    f = font()
    draw.text((W // 2, 6), title, fill="black", font=font(15), anchor="mt")
    draw.text((6, T - 20), "loss (log scale)", fill="black", font=f)
    draw.text(((L + W - R) // 2, H - 6), "step", fill="black", font=f, anchor="mb")
    xs = [x for points in series.values() for x, _ in points]
    ys = [math.log10(y) for points in series.values() for _, y in points]
    x0 = min(xs)
    x1 = max(xs) if max(xs) > x0 else x0 + 1  # a single point or a flat curve still needs axes of some length
    y0 = min(ys)
    y1 = max(ys) if max(ys) > y0 else y0 + 1e-3
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    py = lambda y: H - B - (math.log10(y) - y0) / (y1 - y0) * (H - T - B)
    draw.rectangle([L, T, W - R, H - B], outline="black")
    for x in nice_ticks(x0, x1, 6):
        draw.line([px(x), H - B, px(x), H - B + 4], fill="black")
        draw.text((px(x), H - B + 6), f"{x:,.10g}", fill="black", font=f, anchor="mt")
    for y in log_ticks(y0, y1):
        draw.line([L - 4, py(y), L, py(y)], fill="black")
        draw.text((L - 6, py(y)), f"{y:.3g}", fill="black", font=f, anchor="rm")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for k, (name, points) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        window = len(points) // 50
        if window > 1:
            draw.line([(px(x), py(y)) for x, y in points], fill=tuple(255 - (255 - c) // 4 for c in colour))
            means = np.convolve([y for _, y in points], np.ones(window) / window, mode="valid")
            points = [(x, mean) for (x, _), mean in zip(points[window - 1:], means)]  # at its window's last x
        draw.line([(px(x), py(y)) for x, y in points], fill=colour, width=2)
        draw.text((W - R - 8, T + 8 + 16 * k), name, fill=colour, font=f, anchor="ra")
    save_image(img, path)


# ------------------------------------------------------------------------------------- checkpoints
def atomic_write(path, write):
    """write(tmp) to a hidden temp .NAME.tmp-PID.EXT beside `path` (np.savez and PIL go by EXT), synced, then
    renamed over `path`, the rename synced too: a crash, a kill or a power loss never leaves a half-written
    file. The temp is removed on every exit Python controls (errors, a full disk, Ctrl-C, SIGTERM)."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}{os.path.splitext(name)[1]}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"could not write {path} ({reason}); the previous file is kept; free some space, "
                        f"remove what is in its place, or pass another --out")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checksum(state):
    """sha256 of the tensors' bytes and the other values' repr, in fixed order: a flipped byte changes it."""
    h = hashlib.sha256()

    def visit(value):
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        else:
            h.update(repr(value).encode())
    visit(state)
    return h.hexdigest()


def load_state(obj, state, what):
    """obj.load_state_dict(state), or one sentence saying that `what` (a checkpoint's part) does not fit."""
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise UserError(f"{what} does not fit this run ({reason}); pass the flags it was trained with, or a "
                        f"checkpoint of this version")


def save_checkpoint(path, state):
    """Written atomically, with a checksum that load_checkpoint verifies."""
    atomic_write(path, lambda tmp: torch.save(dict(state, checksum=checksum(state)), tmp))


def load_checkpoint(path, script, config=None, must_match=()):
    """A checkpoint written by `script` (its script, config: the flags as a dict, model, and what the script
    adds), refused unless the keys in must_match agree with config."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass the checkpoint file inside it "
                        f"(e.g. {os.path.join(path, 'last.pt')})")
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; pass a .pt file written by {script}.py")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} is not a regular file (a device or a FIFO?); pass a .pt file "
                        f"written by {script}.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt); "
                        f"pass another one or retrain")
    owner = ckpt.get("script") if isinstance(ckpt, dict) else None
    if owner != script:
        raise UserError(f"{path} was written by {owner or 'another program'}, not {script}.py; "
                        f"pass a checkpoint of {script}.py")
    stored = ckpt.pop("checksum", None)
    if stored is None or checksum(ckpt) != stored:
        raise UserError(f"{path} is corrupt (its checksum does not match its contents); "
                        f"pass another one or retrain")
    if not isinstance(ckpt.get("config"), dict) or not ckpt["config"]:
        raise UserError(f"{path} has no saved settings, so it is not a checkpoint of {script}.py; "
                        f"pass one written by {script}.py")
    for key in must_match:
        theirs = ckpt["config"].get(key)
        ours = (config or {}).get(key)
        if theirs != ours:
            raise UserError(f"{path} was trained with {key}={theirs!r} but this run has {key}={ours!r}; "
                            f"pass the same setting or another checkpoint")
    return ckpt


def append_json(path, **fields):
    """Append one JSON object as a line (metrics.jsonl: for your own plots; a resumed run appends)."""
    with open(path, "a") as f:
        f.write(json.dumps({"time": round(time.time(), 2), **fields}) + "\n")


# ---------------------------------------------------------------------------------------- progress
class Progress:
    """Prints `sampling 3000/50000 | epoch 3/10 | loss 0.0512 | 1234 img/s | ETA 3m12s` about every `every`
    seconds. `total` counts the whole job (every part of a multi-part run), so the ETA is the job's;
    `start` is where a resumed job starts, so that the ETA counts only this process's work."""

    def __init__(self, total, start=0, every=10.0, prefix="step", enabled=True):
        self.total = total
        self.start_count = start
        self.every = every
        self.prefix = prefix
        self.enabled = enabled
        self.start = self.last = time.time()
        self.images = 0

    def update(self, done, images, **fields):
        """done: the work so far, in units of `total`; images: those since the last call; fields: shown as
        `name value` (a tensor is read only when a line is printed, as reading it waits for the GPU)."""
        self.images += images
        now = time.time()
        if not self.enabled or (now - self.last < self.every and done != self.total):
            return
        shown = " | ".join(f"{k} {float(v):.4f}" if isinstance(v, (float, torch.Tensor)) else f"{k} {v}"
                           for k, v in fields.items())
        rate = self.images / max(now - self.last, 1e-9)
        eta = (self.total - done) * (now - self.start) / max(done - self.start_count, 1)
        print(f"{self.prefix} {done}/{self.total} | {shown + ' | ' if shown else ''}{rate:.0f} img/s | "
              f"ETA {format_time(eta)}", flush=True)
        self.last = now
        self.images = 0


def format_time(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------------------------ the training run
def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Run:
    """What a training loop needs around its method, written once for the three training scripts:

        run = common.Run(SCRIPT, args, TRAINING_KEYS)   # --out and --resume checked before any work
        data = run.load(lambda: load_data(...))         # rank 0 first, holding the --out lock
        run.restore(model=net, ema=ema, optimizer=opt)  # from --resume: the states and every rank's RNG
        for epoch in run.epochs(epochs, steps_per_epoch, batch_size):
            for i in range(steps_per_epoch):
                ...one training step...
                run.log(loss, lr)                       # progress, metrics.jsonl, non-finite check
            run.save()                                  # the checkpoint, atomically, with a checksum

    The checkpoint <out>/<name>.pt holds script, config (the flags), each restored object's state dict, epoch,
    step, every rank's RNG state, the loss of every step (averaged over ranks), and the `extra` of save()."""

    def __init__(self, script, args, must_match, name="last", log_every=50, label=None):
        self.script = script
        self.config = vars(args)
        self.rank, self.world = rank_and_world()
        self.out = args.out
        self.path = os.path.join(args.out, f"{name}.pt")
        self.log_every = log_every
        self.label = label  # shown in the progress line and written in metrics.jsonl (mnist's runs)
        self.ckpt = load_checkpoint(args.resume, script, self.config, must_match) if args.resume else None
        if os.path.exists(self.path) and not args.resume and not args.overwrite:
            raise UserError(f"{self.path} already holds a checkpoint of {script}.py; pass --resume "
                            f"{self.path} to continue it, --overwrite to start over, or another --out")
        prepare_out(args.out)  # on every rank: a bad --out stops each of them, none waits for the others
        self.metrics_path = os.path.join(args.out, "metrics.jsonl")
        self.epoch = 0  # epochs done
        self.step = 0
        self.losses = []
        self.pending = []  # the last steps' losses, kept on the device until log_every of them
        self.states = {}

    def load(self, load):
        """load() on rank 0 first (downloads, caches), with the --out lock taken inside it: when another run
        holds the lock, every rank stops with the same message."""
        def lock_and_load():
            if self.rank == 0:
                lock_out(self.out)
                if self.ckpt is None and os.path.exists(self.metrics_path):  # a fresh run's starts anew
                    os.remove(self.metrics_path)
            return load()
        return rank0_first(lock_and_load, self.rank, self.world)

    def restore(self, **states):
        """Remember the objects save() writes (model=, ema=, optimizer=, ...; None for one a run lacks) and,
        on --resume, load their states and this rank's RNG streams from the checkpoint."""
        self.states = states
        if self.ckpt is None:
            return
        for key, obj in states.items():
            if key not in self.ckpt:
                raise UserError(f"{self.config['resume']} holds no {key} state (written by another version "
                                f"of {self.script}.py?); pass a checkpoint of this version or start afresh")
            if obj is not None and self.ckpt[key]:  # an fp16 scaler saves {} when it is off
                load_state(obj, self.ckpt[key], f"the {key} of {self.config['resume']}")
        if not (isinstance(self.ckpt.get("epoch"), int) and isinstance(self.ckpt.get("step"), int)):
            raise UserError(f"{self.config['resume']} has no whole epoch and step count; pass a checkpoint "
                            f"written by {self.script}.py")
        self.epoch = self.ckpt["epoch"]
        self.step = self.ckpt["step"]
        self.losses = list(self.ckpt["losses"])
        if len(self.ckpt["rng"]) == self.world:  # this rank's streams go on where they stopped
            set_rng_state(self.ckpt["rng"][self.rank])
        else:  # saved by another number of processes, the streams can't go on: each rank starts a fresh one
            torch.manual_seed(self.config["seed"] + 1000 * self.step + self.rank)

    def epochs(self, epochs, steps_per_epoch, batch_size):
        """The indices of the epochs still to train (epochs done before each), with progress and timing."""
        if self.ckpt is not None and self.epoch >= epochs:
            raise UserError(f"{self.config['resume']} has trained {self.epoch} epochs already, so --epochs "
                            f"{epochs} leaves nothing to do; pass a larger --epochs")
        if steps_per_epoch < 1:
            raise UserError(f"the training data holds fewer images than --batch-size {batch_size}; pass a "
                            f"smaller --batch-size")
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        prefix = f"[{self.label}] step" if self.label else "step"
        self.progress = Progress(epochs * steps_per_epoch, self.step, prefix=prefix, enabled=self.rank == 0)
        self.total_epochs = epochs
        for epoch in range(self.epoch, epochs):
            self.started = time.time()
            yield epoch

    def log(self, loss, lr):
        """After each step. Every log_every steps (one sync) the losses are averaged over the ranks, checked
        and written to metrics.jsonl: a NaN stops the run before a checkpoint of it replaces a good one."""
        self.step += 1
        self.lr = lr
        loss = loss.detach()
        self.pending.append(loss)
        if len(self.pending) == self.log_every:
            self.flush()
        self.progress.update(self.step, self.batch_size, epoch=f"{self.epoch + 1}/{self.total_epochs}",
                             loss=loss)

    def flush(self):
        group = torch.stack(self.pending).float()
        self.pending = []
        if self.world > 1:
            dist.all_reduce(group)
        group = (group / self.world).tolist()
        for i, value in enumerate(group):
            if not math.isfinite(value):
                raise UserError(f"the loss became {value} at step {self.step - len(group) + i + 1}, so "
                                f"training stopped before writing a checkpoint of it; try a lower --lr or "
                                f"--precision fp32")
        self.losses += group
        self.write_metrics(step=self.step, loss=sum(group) / len(group))

    def write_metrics(self, **fields):
        """A line of metrics.jsonl (rank 0) about the epoch in progress."""
        if self.rank == 0:
            run = {"run": self.label} if self.label else {}
            append_json(self.metrics_path, **run, **fields, epoch=self.epoch + 1, lr=self.lr)

    def save(self, **extra):
        """The end of an epoch: every rank's RNG is gathered, then rank 0 writes the checkpoint and the
        epoch's line of metrics.jsonl."""
        if self.pending:
            self.flush()
        seconds = time.time() - self.started
        rngs = all_rng_states()
        if self.rank == 0:
            states = {key: None if obj is None else obj.state_dict() for key, obj in self.states.items()}
            save_checkpoint(self.path, {"script": self.script, "config": self.config, **states, **extra,
                                        "epoch": self.epoch + 1, "step": self.step, "rng": rngs,
                                        "losses": self.losses})
            mean = sum(self.losses[-self.steps_per_epoch:]) / self.steps_per_epoch
            img_per_s = self.steps_per_epoch * self.batch_size / seconds
            self.write_metrics(loss=mean, img_per_s=round(img_per_s, 1), seconds=round(seconds, 2))
        self.epoch += 1


# ---------------------------------------------------------------------------------- samples for scoring
def sample_noise(seed, j, shape):
    """The starting noise of sample j, from its own generator: samples depend on (seed, j) alone, not on the
    batch size or the ranks. SeedSequence hashes (seed, j) into the 32 bits torch's CPU generator keeps."""
    state = np.random.SeedSequence([seed, j]).generate_state(1)[0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state)))


def save_samples(path, sample, n, batch, shape, labels, seed, evaluate_args):
    """n samples as an .npz for evaluate.py: `images` uint8 (n, C, H, W) and `labels` (-1: unconditional).
    sample(noise, y) -> images in [-1, 1] (y None when unconditional). Chunk i of `batch` samples is made by
    rank i % world, so any number of ranks writes the file of one process; rank 0 gathers and writes it."""
    rank, world = rank_and_world()
    labels = np.asarray(labels, dtype=np.int64)
    progress = Progress(n, prefix="sampling", enabled=rank == 0)
    chunks = {}
    for i, start in enumerate(range(0, n, batch)):
        if i % world != rank:
            continue
        js = range(start, min(n, start + batch))
        noise = torch.stack([sample_noise(seed, j, shape) for j in js])
        y = torch.from_numpy(labels[start:start + len(js)]) if labels[0] >= 0 else None
        images = sample(noise, y)
        if not torch.isfinite(images).all():
            raise UserError(f"the model made non-finite samples (NaN or inf weights?), so {path} was not "
                            f"written; sample another checkpoint")
        chunks[i] = to_uint8(images).numpy()
        progress.update(min(n, (i + world) * batch), len(js) * world)  # all ranks' work, as rank 0 sees it
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, chunks)
        chunks = {i: chunk for part in everyone for i, chunk in part.items()}
    if rank != 0:
        return
    images = np.concatenate([chunks[i] for i in sorted(chunks)])
    atomic_write(path, lambda tmp: np.savez(tmp, images=images, labels=labels))
    print(f"wrote {n} samples to {path}; score them with: python evaluate.py {path} {evaluate_args}",
          flush=True)


# ------------------------------------------------------------------------------ benchmark and estimate
def seconds_per_call(fn, device, calls=3):
    """The best time of `calls` calls of fn after a first one that warms up (allocator, compilation)."""
    times = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # done, not only launched; so the next call starts on an idle GPU
        times.append(time.perf_counter() - start)
    return min(times[1:])


def benchmark(rows, device, calls=3, log=print):
    """rows: {name: (train_step, sample, images)}: a training step and a sampling call (None: not timed),
    each on `images` images. Prints img/s of each and returns {name: (train img/s, sample img/s)}."""
    log(f"device {device}, {torch.get_num_threads()} threads, best of {calls} calls after a warm-up")
    log("| model | train img/s | sample img/s |")
    log("|---|---|---|")
    speeds = {}
    for name, (train_step, sample, images) in rows.items():
        train = images / seconds_per_call(train_step, device, calls)
        made = images / seconds_per_call(sample, device, calls) if sample else None
        speeds[name] = (train, made)
        log(f"| {name} | {train:.1f} | {'-' if made is None else f'{made:.1f}'} |")
    return speeds


def estimate_time(train_step, total_steps, advice, log=print):
    """A GPU-sized recipe on a CPU: time two steps (the RNG streams stay untouched) and say how long the
    whole run would take here. train_step must work on a copy of the model."""
    log("timing 2 steps to estimate the run time on this CPU...")
    with torch.random.fork_rng(devices=[]):
        seconds = seconds_per_call(train_step, torch.device("cpu"), calls=1)
    log(f"note: this recipe is sized for a GPU: its {total_steps:,} steps would take about "
        f"{format_time(seconds * total_steps)} on this CPU; {advice}")
