"""evaluate.py: the Frechet distance against closed forms, class accuracy and FD on made-up Fashion data, the
classifier cache, the CLI and its metrics line, every bad input, and the RGB path's missing-package and
offline messages (torch-fidelity is replaced by a fake: it is optional, and its weights need the internet)."""
import contextlib
import io
import json
import os
import re
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import celeba_jit
import common
import evaluate
from helpers import (assert_user_error, make_cifar_root, make_fashion_root, make_image_folder, run_script,
                     shapes)


def npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def refused(argv, capsys):
    """Run the CLI in-process on argv that must be refused: returns its one `error: ...` line."""
    with pytest.raises(SystemExit) as exit_:
        common.run(lambda: evaluate.main(argv))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return assert_user_error(types.SimpleNamespace(returncode=exit_.value.code, stdout="", stderr=err))


def random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    return b @ b.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A made-up Fashion root, samples that are a fresh draw of its real images, and a cache holding its
    classifier, trained here once with fewer, smaller steps. RECIPE (the cache name) keeps its default text,
    so later evaluations, the CLI subprocess included, load this classifier instead of training the recipe."""
    tmp = tmp_path_factory.mktemp("fashion")
    root = make_fashion_root(tmp / "data", n=300, n_test=300)
    images, labels = shapes(300, seed=7)
    real = npz(tmp / "real.npz", images=images, labels=labels)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(evaluate, "EPOCHS", 2)
        mp.setattr(evaluate, "BATCH", 32)
        first = evaluate.evaluate(real, "fashion", root, str(tmp / "cache"))
    return types.SimpleNamespace(root=root, cache=str(tmp / "cache"), real=real, images=images, labels=labels,
                                 first=first, out=out.getvalue())


# ------------------------------------------------------------------------------------ Frechet distance
def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * (a * b).sqrt()).sum()  # 7.25 + (4 + 1 + 0)
    assert evaluate.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(float(expected))
    assert float(expected) == pytest.approx(12.25)


def test_frechet_distance_of_full_covariances_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = random_spd(6, 1), random_spd(6, 2)
    mu1, mu2 = torch.zeros(6, dtype=torch.float64), torch.linspace(-1, 1, 6, dtype=torch.float64)
    root = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float(((mu1 - mu2) ** 2).sum()) + np.trace(s1.numpy() + s2.numpy() - 2 * root)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert evaluate.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_frechet_distance_of_a_distribution_with_itself_is_zero():
    full = random_spd(20, 3)
    b = torch.randn(20, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    low_rank = b @ b.T
    for sigma in (full, low_rank):  # ReLU features often have a singular covariance
        mu = torch.arange(20.0)
        assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * float(sigma.trace())
    assert evaluate.frechet_distance(torch.zeros(20), full, torch.ones(20), full) == pytest.approx(20.0)


def test_feature_stats_recovers_a_known_gaussian():
    mu, sigma = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), random_spd(3, 5)
    g = torch.Generator().manual_seed(6)
    x = mu + torch.randn(200_000, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    m, s = evaluate.feature_stats(x.float())
    assert m.dtype == s.dtype == torch.float64
    assert torch.allclose(m, mu, atol=0.02) and torch.allclose(s, sigma, atol=0.03)
    few = x[:7].numpy()
    assert np.allclose(evaluate.feature_stats(few)[1].numpy(), np.cov(few, rowvar=False))  # / (N - 1)


# ------------------------------------------------------------------------------ classifier metrics
def test_real_images_are_recognised_and_close_noise_is_far(fashion, tmp_path):
    real = fashion.first
    assert real["classifier_test_accuracy"] > 0.95 and real["class_accuracy"] > 0.95
    assert all(a > 0.8 for a in real["per_class_accuracy"].values())
    assert list(real["per_class_accuracy"]) == common.CLASS_NAMES["fashion"]
    assert 0 < real["fd_floor"] < 1e6 and real["floor_n"] == 300 and real["n"] == 300
    assert re.search(r"floor \(the same for 300 real training images\): \S+ +FD / floor = ", fashion.out)
    noise = np.random.default_rng(0).integers(0, 256, fashion.images.shape, dtype=np.uint8)
    far = evaluate.evaluate(npz(tmp_path / "noise.npz", images=noise, labels=fashion.labels), "fashion",
                            fashion.root, fashion.cache)
    assert far["fd"] > 10 * real["fd"] and far["fd"] > 10 * real["fd_floor"]
    assert far["fd_floor"] == real["fd_floor"]  # the same seed picks the same real training images


def test_shuffled_labels_drop_class_accuracy_to_chance_but_not_the_fd(fashion, tmp_path):
    shuffled = np.random.default_rng(1).permutation(fashion.labels)
    result = evaluate.evaluate(npz(tmp_path / "s.npz", images=fashion.images, labels=shuffled), "fashion",
                               fashion.root, fashion.cache)
    assert result["class_accuracy"] < 0.3
    assert result["fd"] == pytest.approx(fashion.first["fd"])  # FD never looks at labels


def test_unconditional_samples_skip_the_class_accuracy(fashion, tmp_path, capsys):
    unlabelled = npz(tmp_path / "u.npz", images=fashion.images, labels=np.full(300, -1))
    result = evaluate.evaluate(unlabelled, "fashion", fashion.root, fashion.cache)
    assert result["class_accuracy"] is None and result["per_class_accuracy"] is None
    assert "class accuracy: skipped" in capsys.readouterr().out
    assert result["fd"] == pytest.approx(fashion.first["fd"])
    no_labels = npz(tmp_path / "n.npz", images=fashion.images)
    again = evaluate.evaluate(no_labels, "fashion", fashion.root, fashion.cache, unconditional=True)
    assert again["class_accuracy"] is None and again["fd"] == pytest.approx(fashion.first["fd"])


def test_the_classifier_trains_once_and_is_loaded_after(fashion, capsys):
    path = fashion.first["classifier"]
    assert os.path.dirname(path) == fashion.cache and re.fullmatch(r"classifier-fashion-[0-9a-f]{12}\.pt",
                                                                   os.path.basename(path))
    assert "classifier epoch 2/2" in fashion.out and "classifier: loaded" not in fashion.out
    mtime = os.path.getmtime(path)
    again = evaluate.evaluate(fashion.real, "fashion", fashion.root, fashion.cache)
    out = capsys.readouterr().out
    assert f"classifier: loaded {path}" in out and "epoch" not in out
    assert os.path.getmtime(path) == mtime and os.listdir(fashion.cache) == [os.path.basename(path)]
    assert again["classifier_test_accuracy"] == fashion.first["classifier_test_accuracy"]
    assert again["fd"] == pytest.approx(fashion.first["fd"])


class SameShapesOtherCode(evaluate.Classifier):
    """The classifier with its input negated: every weight keeps its shape, so only the code tells the caches
    apart."""

    def forward(self, x):
        return self.head(self.features(-x))


def test_a_changed_classifier_with_the_same_shapes_trains_anew(fashion, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(fashion.cache, cache)
    monkeypatch.setattr(evaluate, "Classifier", SameShapesOtherCode)
    monkeypatch.setattr(evaluate, "EPOCHS", 1)
    monkeypatch.setattr(evaluate, "BATCH", 32)
    result = evaluate.evaluate(fashion.real, "fashion", fashion.root, str(cache))
    out = capsys.readouterr().out
    assert "classifier: loaded" not in out and "classifier epoch 1/1" in out
    old, new = os.path.basename(fashion.first["classifier"]), os.path.basename(result["classifier"])
    assert old != new and sorted(os.listdir(cache)) == sorted([old, new])


def test_the_floor_says_the_classifier_was_trained_on_its_images(fashion, capsys):
    assert "the classifier was trained on the floor's images" in fashion.out
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the flags' help
    assert "The classifier was trained on these images" in help_text
    assert "the real training images of the floor (images the classifier was trained on)" in help_text


def test_fd_and_floor_print_their_n_and_fall_as_n_grows(fashion, tmp_path, capsys):
    few = npz(tmp_path / "few.npz", images=fashion.images[:120], labels=fashion.labels[:120])
    result = evaluate.evaluate(few, "fashion", fashion.root, fashion.cache)
    out = capsys.readouterr().out
    assert result["n"] == result["floor_n"] == 120
    assert f"FD (classifier features, 120 samples vs the 300 test images): {result['fd']:.4g}\n" in out
    assert f"floor (the same for 120 real training images): {result['fd_floor']:.4g}" in out
    assert "compare only at equal n" in out
    assert "FD (classifier features, 300 samples vs the 300 test images)" in fashion.out
    # why n must match: the same images, fewer of them, score worse
    assert result["fd"] > fashion.first["fd"] and result["fd_floor"] > fashion.first["fd_floor"]


def test_a_classifier_cache_of_nan_weights_is_one_sentence(fashion, tmp_path, capsys):
    cache, metrics = tmp_path / "cache", tmp_path / "metrics.jsonl"
    shutil.copytree(fashion.cache, cache)
    path = cache / os.path.basename(fashion.first["classifier"])
    saved = torch.load(path, weights_only=True)
    saved["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v
                      for k, v in saved["model"].items()}
    torch.save(saved, path)
    before = path.read_bytes()
    message = refused([fashion.real, "--dataset", "fashion", "--data-dir", fashion.root, "--device", "cpu",
                       "--cache-dir", str(cache), "--metrics", str(metrics)], capsys)
    assert f"the classifier cache {path} holds non-finite weights" in message and "delete it" in message
    assert path.read_bytes() == before and not metrics.exists()


def test_cli_appends_a_metrics_line_matching_its_printout(fashion, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"earlier": 1}\n')
    result = run_script("evaluate.py", fashion.real, "--dataset", "fashion", "--data-dir", fashion.root,
                        "--cache-dir", fashion.cache, "--device", "cpu", "--metrics", metrics)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "classifier: loaded" in out  # the subprocess found the fixture's classifier
    lines = metrics.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": 1}
    line = json.loads(lines[1])
    assert {"time", "npz", "dataset", "n", "classifier", "classifier_test_accuracy", "class_accuracy",
            "per_class_accuracy", "fd", "fd_floor", "floor_n", "fd_ratio"} <= set(line)
    assert (line["npz"], line["dataset"], line["n"]) == (fashion.real, "fashion", 300)
    number = lambda pattern: float(re.search(pattern, out).group(1))
    assert number(r"class accuracy: ([\d.]+)%") == pytest.approx(100 * line["class_accuracy"], abs=0.006)
    assert number(r"classifier test accuracy: ([\d.]+)%") == pytest.approx(
        100 * line["classifier_test_accuracy"], abs=0.006)
    assert number(r"test images\): (\S+)") == pytest.approx(line["fd"], rel=1e-3)
    assert number(r"training images\): (\S+)") == pytest.approx(line["fd_floor"], rel=1e-3)
    assert number(r"FD / floor = (\S+)") == pytest.approx(line["fd_ratio"], rel=1e-2)
    assert line["fd"] == pytest.approx(fashion.first["fd"])


# ----------------------------------------------------------------------------------------- bad input
def write_bad_file(case, path):
    images, labels = shapes(20, seed=3)
    save = lambda **arrays: np.savez(path, **arrays)
    as_npy = io.BytesIO()
    np.save(as_npy, images)
    {
        "missing_file": lambda: None,
        "not_an_npz": lambda: path.write_bytes(b"not a zip file\n"),
        "empty_file": lambda: path.write_bytes(b""),
        "npy_not_npz": lambda: path.write_bytes(as_npy.getvalue()),
        "no_images": lambda: save(samples=images, labels=labels),
        "float_images": lambda: save(images=images / 127.5 - 1, labels=labels),
        "images_3d": lambda: save(images=images[:, 0], labels=labels),
        "no_images_in_file": lambda: save(images=images[:0], labels=labels[:0]),
        "rgb_for_fashion": lambda: save(images=images.repeat(3, 1), labels=labels),
        "wrong_size": lambda: save(images=shapes(20, 32)[0], labels=labels),
        "no_labels": lambda: save(images=images),
        "label_count": lambda: save(images=images, labels=labels[:-1]),
        "float_labels": lambda: save(images=images, labels=labels * 1.0),
        "label_10": lambda: save(images=images, labels=np.where(labels == 0, 10, labels)),
        "label_minus_2": lambda: save(images=images, labels=np.where(labels == 0, -2, labels)),
    }[case]()


@pytest.mark.parametrize("case, fragment", [
    ("missing_file", "does not exist"), ("not_an_npz", "not a readable .npz"),
    ("empty_file", "not a readable .npz"), ("npy_not_npz", "not an .npz archive"),
    ("no_images", "no `images` array"), ("float_images", "needs uint8"),
    ("images_3d", "N x C x H x W"), ("no_images_in_file", "holds 0 images"),
    ("rgb_for_fashion", "needs 1 x 28 x 28"), ("wrong_size", "needs 1 x 28 x 28"),
    ("no_labels", "--unconditional"), ("label_count", "for 20 images"), ("float_labels", "integer label"),
    ("label_10", "outside 0..9"), ("label_minus_2", "outside 0..9")])
def test_bad_input_is_one_sentence_and_writes_nothing(case, fragment, fashion, tmp_path, capsys):
    path, cache, metrics = tmp_path / f"{case}.npz", tmp_path / "cache", tmp_path / "metrics.jsonl"
    write_bad_file(case, path)
    argv = [str(path), "--dataset", "fashion", "--data-dir", fashion.root, "--device", "cpu",
            "--cache-dir", str(cache), "--metrics", str(metrics)]
    with pytest.raises(SystemExit) as exit_:
        common.run(lambda: evaluate.main(argv))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert_user_error(types.SimpleNamespace(returncode=exit_.value.code, stdout="", stderr=err), fragment)
    assert not cache.exists() and not metrics.exists()


@pytest.mark.parametrize("case", ["samples", "checkpoint.pt", "notes.txt"])
def test_a_metrics_file_that_is_not_json_lines_is_left_alone(case, fashion, tmp_path, capsys):
    samples = tmp_path / "s.npz"
    shutil.copy(fashion.real, samples)
    metrics = samples if case == "samples" else tmp_path / case
    if case == "checkpoint.pt":
        torch.save({"model": {"w": torch.ones(3)}}, metrics)
    if case == "notes.txt":
        metrics.write_text("my notes\n")
    before = metrics.read_bytes()
    message = refused([str(samples), "--dataset", "fashion", "--data-dir", fashion.root, "--device", "cpu",
                       "--cache-dir", str(tmp_path / "cache"), "--metrics", str(metrics)], capsys)
    assert "exists and is not a JSON-lines file" in message and "pass a new path or a .jsonl file" in message
    assert metrics.read_bytes() == before and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kind, fragment", [
    ("folder", "is a folder"), ("device", "is not a regular file (a device or a FIFO)"),
    ("fifo", "is not a regular file (a device or a FIFO)")])
def test_samples_that_are_not_a_regular_file_say_what_they_are(kind, fragment, tmp_path, capsys):
    path = {"folder": tmp_path / "photos", "device": os.devnull, "fifo": tmp_path / "s.npz"}[kind]
    if kind == "folder":
        make_image_folder(path, n=2)  # a folder of images, not the npz --save-samples writes
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this system")
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    message = refused([str(path), "--dataset", "fashion", "--data-dir", str(tmp_path / "data"),
                       "--cache-dir", str(tmp_path / "cache")], capsys)
    assert message == f"error: {path} {fragment}; pass the .npz file a script's --save-samples wrote"


def test_a_cache_dir_that_is_a_file_is_refused(fashion, tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(common.UserError, match="pass a writable --cache-dir"):
        evaluate.evaluate(fashion.real, "fashion", fashion.root, str(tmp_path / "cache"))


def test_bad_input_exits_2_without_traceback_in_a_real_process(tmp_path):
    result = run_script("evaluate.py", tmp_path / "absent.npz", "--dataset", "mnist",
                        "--cache-dir", tmp_path / "c")
    assert_user_error(result, "does not exist", "--save-samples")
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------- RGB
@pytest.fixture
def cifar(tmp_path):
    images = shapes(30, 32, 3, seed=2)[0]
    samples = npz(tmp_path / "c.npz", images=images, labels=np.full(30, -1))
    return samples, make_cifar_root(tmp_path / "data", n=100)


def fake_torch_fidelity(monkeypatch, calls):
    """A stand-in for the optional package: records what calculate_metrics is handed, returns a fixed FID."""
    module = types.ModuleType("torch_fidelity")
    module.calculate_metrics = lambda **kwargs: calls.append(kwargs) or {"frechet_inception_distance": 3.5}
    monkeypatch.setitem(sys.modules, "torch_fidelity", module)


def test_rgb_without_torch_fidelity_names_the_install(cifar, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(common.UserError, match="pip install torch-fidelity"):
        evaluate.evaluate(cifar[0], "cifar10", cifar[1])


def test_rgb_offline_says_the_inception_weights_need_a_download_once(cifar, monkeypatch, tmp_path):
    import urllib.error
    module = types.ModuleType("torch_fidelity")

    def offline(**kwargs):  # torch-fidelity's first use downloads its Inception weights through torch.hub
        raise urllib.error.URLError("[Errno 111] Connection refused")
    module.calculate_metrics = offline
    monkeypatch.setitem(sys.modules, "torch_fidelity", module)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(common.UserError, match="Inception weights") as e:
        evaluate.evaluate(cifar[0], "cifar10", cifar[1])
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(e.value) and "internet" in str(e.value)
    assert "Connection refused" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dataset", ["cifar10", "folder"])
def test_rgb_hands_torch_fidelity_uint8_samples_and_all_real_images(dataset, cifar, monkeypatch, tmp_path,
                                                                     capsys):
    calls = []
    fake_torch_fidelity(monkeypatch, calls)
    data = cifar[1] if dataset == "cifar10" else make_image_folder(tmp_path / "photos", n=12, size=(48, 40))
    result = evaluate.evaluate(cifar[0], dataset, data)
    assert result["fid"] == 3.5 and result["n"] == 30
    assert (f"of the 30 samples against the {result['reference_n']} real training images: 3.5 "
            f"(compare only at equal n)") in capsys.readouterr().out
    assert result["reference_n"] == (100 if dataset == "cifar10" else 12)  # every real training image
    (kwargs,) = calls
    assert kwargs["fid"] is True and kwargs["cuda"] is False
    samples, real = kwargs["input1"], kwargs["input2"]
    assert len(samples) == 30 and torch.equal(samples[4], torch.from_numpy(np.load(cifar[0])["images"][4]))
    assert len(real) == result["reference_n"]
    assert real[0].dtype == torch.uint8 and real[0].shape == (3, 32, 32)


def test_folder_reads_every_image_format_celeba_jit_trains_on(cifar, monkeypatch, tmp_path):
    calls = []
    fake_torch_fidelity(monkeypatch, calls)
    folder = make_image_folder(tmp_path / "photos", n=2)  # a .jpg and a .png
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    for name in ("a.gif", "b.tif", "c.tiff", "d.BMP", "e.webp"):
        Image.fromarray(pixels).save(os.path.join(folder, name))
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    result = evaluate.evaluate(cifar[0], "folder", folder)
    assert result["reference_n"] == 7
    real = calls[0]["input2"]
    assert [real[i].shape for i in range(7)] == [(3, 32, 32)] * 7  # each one decodes
    trained_on = celeba_jit.load_folder(folder, 32, None, str(tmp_path))[0]  # the images celeba_jit trains on
    assert all(torch.equal(real[i], torch.from_numpy(trained_on[i].copy())) for i in range(7))
