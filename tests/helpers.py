"""Test helpers shared by the test files: small datasets in the on-disk layouts the scripts read, and a CLI
runner. Every dataset here is made by the tests; nothing is downloaded."""
import os
import pickle
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes(n, size=28, channels=1, classes=10, seed=0):
    """n structured images (uint8, N x C x H x W) and labels: class k is a bright square whose side and
    position depend on k, jittered by a pixel or two, so a model can learn each class and tell them apart."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = np.zeros((n, channels, size, size), np.uint8)
    for i, k in enumerate(labels):
        side = size // 4 + (k % 3) * size // 8
        top = (k * size // (2 * classes) + rng.integers(0, 2)) % (size - side)
        left = ((classes - 1 - k) * size // (2 * classes) + rng.integers(0, 2)) % (size - side)
        colour = 255 if channels == 1 else np.array([255 * (k % 2), 255 * (k // 2 % 2), 200])[:, None, None]
        images[i, :, top:top + side, left:left + side] = colour
    return images, labels.astype(np.int64)


def _idx(path, array, code):
    """Write an MNIST idx file (big-endian dims, then raw uint8)."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, code]))
        for dim in array.shape:
            f.write(int(dim).to_bytes(4, "big"))
        f.write(array.astype(np.uint8).tobytes())


def make_mnist_root(root, n=256, seed=0, folder="MNIST", n_test=None):
    """A torchvision MNIST root (MNIST/raw/*-ubyte, train and t10k) holding `shapes` digits;
    folder="FashionMNIST" gives the Fashion-MNIST layout. The test split is another draw of the same shapes
    (n_test images, default n)."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, count, s in (("train", n, seed), ("t10k", n_test or n, seed + 1)):
        images, labels = shapes(count, 28, 1, seed=s)
        _idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images[:, 0], 3)
        _idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels, 1)
    return str(root)


def make_fashion_root(root, n=256, seed=0, n_test=None):
    """A torchvision FashionMNIST root (FashionMNIST/raw/*-ubyte) holding `shapes` images."""
    return make_mnist_root(root, n, seed, folder="FashionMNIST", n_test=n_test)


def make_cifar_root(root, n=100, seed=0):
    """A CIFAR-10 root in the python-pickle layout (cifar-10-batches-py/data_batch_1..5, test_batch,
    batches.meta)."""
    images, labels = shapes(n, 32, 3, seed=seed)
    where = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(where, exist_ok=True)
    parts = np.array_split(np.arange(n), 5)
    batches = [(f"data_batch_{i + 1}", p) for i, p in enumerate(parts)] + [("test_batch", np.arange(n))]
    for name, idx in batches:
        with open(os.path.join(where, name), "wb") as f:
            pickle.dump({"data": images[idx].reshape(len(idx), -1), "labels": labels[idx].tolist()}, f)
    with open(os.path.join(where, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer",
                                     "dog", "frog", "horse", "ship", "truck"]}, f)
    return str(root)


def make_image_folder(folder, n=12, size=(48, 40), seed=0):
    """A folder of RGB images of mixed formats and sizes, like a downloaded photo set."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w = size[0] + 4 * (i % 3)
        h = size[1] + 2 * (i % 2)
        pixels = (rng.random((h, w, 3)) * 60 + np.linspace(0, 190, w)[None, :, None]).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.{'png' if i % 2 else 'jpg'}"))
    return str(folder)


def run_script(script, *args, cwd=None, timeout=600, torchrun=None):
    """Run `python script.py args` (or under torchrun with `torchrun` processes) and return the
    CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    cmd += [os.path.join(REPO, script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(result, *fragments):
    """A bad input ends with exit code 2, one `error: ...` line naming what to do, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in message, message
    return message
