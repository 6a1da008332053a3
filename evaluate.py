"""Evaluate generated samples: the .npz a script's --save-samples writes (uint8 `images` N x C x H x W, int64
`labels`, -1 = unconditional), against the real images they imitate.

mnist, fashion (28x28 grey): a small CNN classifier, trained once on the training split and cached, measures
  class accuracy  how often the classifier names the class each sample was drawn for, overall and per class
  FD              the Frechet distance of its 128 penultimate features, samples vs the real test split: FID
                  with this classifier for Inception, comparable within this project, not with published FIDs
  floor           the same for N real training images: FD / floor near 1 is as good as it gets. The
                  classifier was trained on these images, so the floor is approximate. FD falls as N grows:
                  compare FDs and FIDs only at equal N.
cifar10, folder (RGB): the standard FID by torch-fidelity (pip install torch-fidelity): every sample against
  every real training image (a folder's cropped and resized as celeba_jit.py trains on them), as uint8.

  python evaluate.py cfg.npz --dataset mnist --data-dir data --metrics runs/evaluate/metrics.jsonl
  python evaluate.py fid50k.npz --dataset cifar10 --data-dir data --device cuda
"""
import argparse
import hashlib
import inspect
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ------------------------------------------------------------------------------------------- config
GREY, RGB = ("mnist", "fashion"), ("cifar10", "folder")
SHAPES = {"mnist": (1, 28, 28), "fashion": (1, 28, 28), "cifar10": (3, 32, 32)}  # folder: any 3 x H x W
NUM_CLASSES = 10
# The classifier recipe: 91.4% test accuracy on Fashion-MNIST from 3 epochs of ~175 CPU-seconds (about 1.5-2
# minutes on 2 idle cores). Its numbers name the cache: changing one (or RECIPE) trains a new classifier.
EPOCHS, BATCH, LR, CLASSIFIER_SEED = 3, 128, 1e-3, 0
RECIPE = f"cnn 32-64-128 bn v1, adam {LR}, batch {BATCH}, {EPOCHS} epochs, seed {CLASSIFIER_SEED}"


# ------------------------------------------------------------------------------------ Frechet distance
def feature_stats(features):
    """Mean and covariance of N x D features, in float64; unbiased (/ (N-1)) as np.cov and the FID code."""
    f = torch.as_tensor(features, dtype=torch.float64)
    return f.mean(0), torch.cov(f.T)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), the distance between two Gaussians.
    S1 S2 is not symmetric, but it is similar to the symmetric PSD A = S1^{1/2} S2 S1^{1/2}
    (S1 S2 = S1^{1/2} A S1^{-1/2}), so Tr (S1 S2)^{1/2} = sum_i sqrt(eig_i(A)): two eigh calls, no sqrtm."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    root1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T  # rounding makes tiny eigenvalues slightly negative
    a = root1 @ sigma2 @ root1
    trace_root = torch.linalg.eigvalsh((a + a.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root)


# ------------------------------------------------------------------------------- the grey classifier
class Classifier(nn.Module):
    """conv 32 - pool - conv 64 - pool - conv 128 - pool - linear 128 (the features) - linear 10. A pool after
    every conv, not only after the 2nd and 3rd, cuts the cost 4x, to 7.6M multiply-adds an image."""

    def __init__(self):
        super().__init__()
        block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), nn.Flatten(),
                                      nn.Linear(128 * 3 * 3, 128), nn.ReLU())  # 28 -> 14 -> 7 -> 3 px
        self.head = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.features(x))


@torch.no_grad()
def embed(model, images, device, batch_size):
    """(features, logits) of uint8 images, scaled to [-1, 1] (x / 127.5 - 1) as the scripts train on them."""
    feats, logits = [], []
    for x in images.split(batch_size):
        f = model.features(x.to(device).float() / 127.5 - 1)
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def train_classifier(images, labels, device):
    torch.manual_seed(CLASSIFIER_SEED)
    model = Classifier().to(device)
    opt = torch.optim.Adam(model.parameters(), LR)
    for epoch in range(EPOCHS):
        start, total = time.time(), 0.0
        for idx in torch.randperm(len(images)).split(BATCH):
            loss = F.cross_entropy(model(images[idx].to(device).float() / 127.5 - 1), labels[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"classifier epoch {epoch + 1}/{EPOCHS} | loss {total / len(images):.4f} | "
              f"{time.time() - start:.0f}s", flush=True)
    return model.eval()


def get_classifier(dataset, train, test, cache_dir, device, batch_size):
    """(model, test accuracy, cache path). Trained once, cached by a sha1 of the training set, RECIPE and code
    (network, training, input scaling: a changed network of the same shapes must not load stale weights)."""
    code = "".join(inspect.getsource(f) for f in (Classifier, train_classifier, embed))
    h = hashlib.sha1(train[0].numpy().tobytes() + train[1].numpy().tobytes() + (RECIPE + code).encode())
    path = os.path.join(cache_dir, f"classifier-{dataset}-{h.hexdigest()[:12]}.pt")
    model = Classifier()
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
            print(f"classifier: loaded {path}")
            return model.to(device).eval(), saved["test_accuracy"], path
        except Exception as e:  # a truncated or foreign file: a new classifier is cheap
            print(f"classifier: {path} is unreadable ({type(e).__name__}); training a new one")
    print(f"classifier: training on the {len(train[0]):,} {dataset} training images, once (cached as {path})")
    start = time.time()
    model = train_classifier(*train, device)
    accuracy = (embed(model, test[0], device, batch_size)[1].argmax(1) == test[1]).float().mean().item()
    print(f"classifier: trained in {time.time() - start:.0f}s")
    state = {"model": model.state_dict(), "test_accuracy": accuracy, "recipe": RECIPE}
    common.atomic_write(path, lambda tmp: torch.save(state, tmp))
    return model, accuracy, path


# ------------------------------------------------------------------------------------- the samples
def load_samples(path, dataset, unconditional):
    """The npz's images (uint8 N x C x H x W) and labels (int64, -1 = none) as tensors, checked up front."""
    if not os.path.isfile(path):  # a FIFO or a device is never opened: reading one could hang
        what = ("is a folder" if os.path.isdir(path) else "is not a regular file (a device or a FIFO)"
                if os.path.exists(path) else "does not exist")
        raise common.UserError(f"{path} {what}; pass the .npz file a script's --save-samples wrote")
    try:
        npz = np.load(path, allow_pickle=False)  # no pickles: loading a file never runs code
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as e:
        raise common.UserError(f"{path} is not a readable .npz file ({e}); pass what --save-samples wrote")
    if "images" not in arrays:
        raise common.UserError(f"{path} has no `images` array (it holds {sorted(arrays) or 'nothing'}); "
                               f"pass the file --save-samples wrote")
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise common.UserError(f"{path} holds {images.dtype} images of shape {images.shape}; evaluation "
                               f"needs uint8 N x C x H x W, as --save-samples writes them")
    if len(images) < 2:
        raise common.UserError(f"{path} holds {len(images)} images, too few for a distance: save thousands")
    want, got = SHAPES.get(dataset, (3,) + images.shape[2:]), images.shape[1:]
    if got != want:
        raise common.UserError(f"{path} holds {' x '.join(map(str, got))} images but {dataset} needs "
                               f"{' x '.join(map(str, want))}; pass samples of a {dataset} model")
    if dataset in RGB or unconditional:  # FID ignores labels; --unconditional says there are none
        return torch.from_numpy(images), torch.full((len(images),), -1)
    if "labels" not in arrays:
        raise common.UserError(f"{path} has no `labels` array; pass --unconditional to report only distances")
    labels = arrays["labels"]
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise common.UserError(f"{path} has {labels.dtype} labels of shape {labels.shape} for {len(images)} "
                               f"images; it needs one integer label per image (-1 = unconditional)")
    if ((labels < -1) | (labels >= NUM_CLASSES)).any():
        raise common.UserError(f"{path} has labels outside 0..{NUM_CLASSES - 1} (and -1, unconditional); "
                               f"pass samples of a {dataset} model")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# ------------------------------------------------------------------------------------------ RGB: FID
class ArrayImages(torch.utils.data.Dataset):
    """uint8 C x H x W tensors one at a time: the input torch-fidelity takes."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


class FolderImages(ArrayImages):
    """Image files, decoded when asked for (a photo set need not fit in memory) as celeba_jit.py trains on
    them: centre-cropped square and resized to the samples' H x W."""

    def __init__(self, files, size):
        self.images = files
        self.size = size

    def __getitem__(self, i):
        return torch.from_numpy(common.load_image(self.images[i], self.size).copy())


def inception_fid(images, dataset, data_dir, device, batch_size):
    """(FID, number of real images): all samples against the real training images."""
    try:
        import torch_fidelity
    except ImportError:
        raise common.UserError("RGB samples are scored (FID) by torch-fidelity: pip install torch-fidelity")
    if dataset == "cifar10":
        reference = ArrayImages(common.load_dataset("cifar10", data_dir, train=True)[0])
    else:
        names = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
        files = [os.path.join(data_dir, f) for f in names if f.lower().endswith(common.IMAGE_EXTS)]
        if not files:
            extensions = ", ".join(common.IMAGE_EXTS)
            raise common.UserError(f"no images ({extensions}) in {data_dir}; pass --data-dir DIR, the folder "
                                   f"of real images")
        reference = FolderImages(files, images.shape[2:])
    print(f"FID: Inception features of {len(images):,} samples and {len(reference):,} real images")
    try:
        metrics = torch_fidelity.calculate_metrics(input1=ArrayImages(images), input2=reference, fid=True,
                                                   cuda=device.type == "cuda", batch_size=batch_size,
                                                   verbose=False)
    except OSError as e:  # usually a URLError: torch-fidelity downloads its Inception weights on first use
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise common.UserError(f"torch-fidelity failed ({e}); if it could not fetch its Inception weights, "
                               f"run once with internet or put weights-inception-2015-12-05-6726825d.pth "
                               f"in {folder}")
    return metrics["frechet_inception_distance"], len(reference)


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(npz_path, dataset, data_dir, cache_dir="runs/evaluate", device="cpu", seed=0, batch_size=500,
             unconditional=False):
    """Print the numbers of the module docstring; return them as a dict (the --metrics line less its time)."""
    device = common.get_device(str(device) if device else None)
    images, labels = load_samples(npz_path, dataset, unconditional)
    n = len(images)
    print(f"samples: {n:,} of {' x '.join(map(str, images.shape[1:]))} from {npz_path}")
    if dataset in RGB:
        fid, n_real = inception_fid(images, dataset, data_dir, device, batch_size)
        print(f"class accuracy: not provided for RGB data\nFID (Inception-v3, torch-fidelity) of the {n:,} "
              f"samples against the {n_real:,} real training images: {fid:.4g} (compare only at equal n)")
        return {"npz": npz_path, "dataset": dataset, "n": n, "fid": fid, "reference_n": n_real}
    train = common.load_dataset(dataset, data_dir, train=True)
    test = common.load_dataset(dataset, data_dir, train=False)
    try:  # fail now, not after training
        os.makedirs(cache_dir, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            raise PermissionError(13, "read-only")
    except OSError as e:
        raise common.UserError(f"cannot write to {cache_dir} ({e.strerror}); pass a writable --cache-dir")
    model, test_accuracy, path = get_classifier(dataset, train, test, cache_dir, device, batch_size)
    feats, logits = embed(model, images, device, batch_size)
    test_feats = embed(model, test[0], device, batch_size)[0]
    if not (feats.isfinite().all() and test_feats.isfinite().all()):  # eigh would fail with LinAlgError
        raise common.UserError(f"the classifier cache {path} holds non-finite weights; delete it to retrain")
    test_stats = feature_stats(test_feats)
    fd = frechet_distance(*feature_stats(feats), *test_stats)
    subset = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(seed))[:n]  # at most all
    real = embed(model, train[0][subset], device, batch_size)[0]
    floor = frechet_distance(*feature_stats(real), *test_stats)
    result = {"npz": npz_path, "dataset": dataset, "n": n, "classifier": path,
              "classifier_test_accuracy": test_accuracy, "class_accuracy": None, "per_class_accuracy": None,
              "fd": fd, "fd_floor": floor, "floor_n": len(subset), "fd_ratio": fd / floor if floor else None}
    print(f"classifier test accuracy: {test_accuracy:.2%}")
    if (labels < 0).all():
        print("class accuracy: skipped (unconditional samples: every label is -1)")
    else:
        right, y = (logits.argmax(1) == labels)[labels >= 0].float(), labels[labels >= 0]
        per_class = {name: right[y == k].mean().item() if (y == k).any() else None
                     for k, name in enumerate(common.CLASS_NAMES[dataset])}
        result.update(class_accuracy=right.mean().item(), per_class_accuracy=per_class)
        shown = [f"{name} {'-' if a is None else f'{a:.0%}'}" for name, a in per_class.items()]
        print(f"class accuracy: {right.mean().item():.2%} of {len(y):,} labelled samples\n"
              f"  per class: {', '.join(shown[:5])}\n             {', '.join(shown[5:])}")
    ratio = "" if result["fd_ratio"] is None else f"   FD / floor = {result['fd_ratio']:.3g}"
    print(f"FD (classifier features, {n:,} samples vs the {len(test[0]):,} test images): {fd:.4g}")
    print(f"floor (the same for {len(subset):,} real training images): {floor:.4g}{ratio}")
    print("  both fall as n grows: compare only at equal n; the classifier was trained on the floor's images")
    return result


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("samples", metavar="SAMPLES.npz", help="the file a script's --save-samples wrote")
    add("--dataset", required=True, choices=GREY + RGB, help="the real data the samples imitate")
    add("--data-dir", default="data", help="torchvision root (mnist, fashion, cifar10) or the image folder")
    add("--cache-dir", default=os.path.join("runs", "evaluate"), help="where trained classifiers are kept")
    add("--device", help="cuda, cuda:N, mps or cpu (default: the best available; FID: cuda or cpu)")
    add("--seed", type=int, default=0, help="picks the real training images of the floor (images the "
        "classifier was trained on)")
    add("--batch-size", type=int, default=500, help="images per forward pass of the feature networks")
    add("--unconditional", action="store_true", help="the samples have no labels: skip the class accuracy")
    add("--metrics", metavar="FILE.jsonl", help="append the numbers to FILE.jsonl as one JSON line")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.check_positive(args, "batch_size")
    common.check_seed(args)
    if args.metrics:
        common.check_output_file(args.metrics, "--metrics")  # refuses a FIFO: the read below never hangs
    if args.metrics and os.path.isfile(args.metrics):
        with open(args.metrics, "rb") as f:
            first = f.read(1)
        if first not in (b"", b"{"):  # every line append_json writes is a JSON object; an .npz starts "PK"
            raise common.UserError(f"--metrics {args.metrics} exists and is not a JSON-lines file; appending "
                                   f"a line would corrupt it: pass a new path or a .jsonl file")
    result = evaluate(args.samples, args.dataset, args.data_dir, args.cache_dir, args.device, args.seed,
                      args.batch_size, args.unconditional)
    if args.metrics:
        common.append_json(args.metrics, **result)
        print(f"appended to {args.metrics}")


if __name__ == "__main__":
    common.run(main)
