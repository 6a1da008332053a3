"""The CUDA paths of the three training scripts, run for real: skipped on a machine without a CUDA GPU. On one,
`python3 -m pytest -q tests/test_gpu.py` trains each script tiny with --precision auto, fp16 and bf16, eager
and compiled, resumes it, samples it over `torchrun --nproc_per_node=1` and benchmarks it."""
import numpy as np
import pytest
import torch

from helpers import make_mnist_root, run_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# each script's tiny run on 28 px data made here; 256 images, 4 steps an epoch
TINY = {
    "mnist_unet.py": ["--part", "cfg", "--hidden", "8", "--batch-size", "64", "--steps", "2"],
    "cifar_cfg.py": ["--dataset", "mnist", "--channels", "32", "32", "32", "32", "--batch-size", "64",
                     "--steps", "2", "--warmup", "2"],
    "celeba_jit.py": ["--dataset", "mnist", "--model", "tiny", "--batch-size", "64", "--steps", "2",
                      "--warmup-epochs", "0.5"],
}
CHECKPOINT = {"mnist_unet.py": "cfg.pt", "cifar_cfg.py": "last.pt", "celeba_jit.py": "last.pt"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mnist_root(tmp_path_factory.mktemp("gpu") / "data", n=256)


def train(script, data, out, *extra):
    r = run_script(script, "--data-dir", data, "--out", out, "--device", "cuda", *TINY[script], *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("script", list(TINY))
@pytest.mark.parametrize("precision", ["auto", "fp16", "bf16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_trains_resumes_and_samples_on_cuda(script, precision, compiled, data, tmp_path):
    if precision == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0")
    flags = ["--precision", precision] + (["--compile"] if compiled else [])
    r = train(script, data, tmp_path, "--epochs", "1", *flags)
    expected = {"auto": "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"}.get(precision, precision)
    assert f"precision: {expected}" in r.stdout
    ckpt = tmp_path / CHECKPOINT[script]
    train(script, data, tmp_path, "--epochs", "2", "--resume", ckpt, *flags)
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["epoch"] == 2 and np.isfinite(state["losses"]).all()
    assert all(v.device.type == "cpu" and v.dtype != torch.float16 for v in state["model"].values()
               if v.is_floating_point())  # checkpoints stay fp32 on the CPU, whatever the precision
    samples = tmp_path / "s.npz"
    r = run_script(script, "--sample", ckpt, "--out", tmp_path / "sampled", "--device", "cuda", "--steps", "2",
                   "--save-samples", samples, "--num-samples", "20", *flags, torchrun=1)
    assert r.returncode == 0, r.stderr[-3000:]
    images = np.load(samples)["images"]
    assert images.shape[0] == 20 and images.dtype == np.uint8 and images.std() > 0


@pytest.mark.parametrize("script", list(TINY))
def test_benchmark_on_cuda(script, data, tmp_path):
    r = run_script(script, "--benchmark", "--device", "cuda", *TINY[script])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| eager |" in r.stdout or "eager" in r.stdout
