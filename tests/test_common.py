"""common.py: the pixel conversions, files, checkpoints, RNG and data loading every script relies on."""
import argparse
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from helpers import REPO, make_cifar_root, make_fashion_root, make_mnist_root, run_script, shapes


def test_to_uint8_inverts_the_model_scaling():
    pixels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(common.to_uint8(pixels.float() / 127.5 - 1), pixels)
    assert common.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # out-of-range values clamp


def test_grid_png_has_the_tiled_size_and_pixels(tmp_path):
    images = torch.full((6, 1, 8, 8), -1.0)
    images[4] = 1.0
    common.save_grid(images, tmp_path / "g.png", nrow=3, pad=2, scale=2)
    img = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    assert img.shape == (2 * (2 * 10 + 2), 2 * (3 * 10 + 2))  # 2 rows x 3 columns of 8 px + 2 px padding, x2
    assert img[2 * 12 + 4, 2 * 12 + 4] == 255  # image 4 is white
    assert img[2 * 2 + 4, 2 * 2 + 4] == 0  # image 0 is black
    common.save_grid(images, tmp_path / "l.png", nrow=3, row_labels=["a", "b"], col_labels=["x", "y", "z"])
    labelled = Image.open(tmp_path / "l.png")
    assert labelled.width > 3 * 10 + 2 and labelled.height > 2 * 10 + 2


def test_gif_has_one_frame_per_batch(tmp_path):
    frames = [torch.full((2, 3, 8, 8), v) for v in (-1.0, 0.0, 1.0)]
    common.save_gif(frames, tmp_path / "a.gif", nrow=2)
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 3


def test_loss_plot_draws_each_curve(tmp_path):
    curves = {"train": [1.0 / (i + 1) for i in range(300)], "val": [0.5, 0.1, 0.05]}
    common.plot_curves(tmp_path / "loss.png", curves, "loss")
    img = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB")).reshape(-1, 3)
    assert (np.abs(img - [31, 119, 180]).sum(1) == 0).sum() > 100  # the first curve's colour
    assert (np.abs(img - [214, 39, 40]).sum(1) == 0).sum() > 50  # the second's


def test_samples_npz_layout_and_noise_independent_of_the_batch(tmp_path, capsys):
    made = []

    def sample(noise, y):  # a stand-in model: the noise itself, clipped, and the labels it was given
        made.append(None if y is None else y.tolist())
        return noise.clamp(-1, 1)
    common.save_samples(str(tmp_path / "a.npz"), sample, 5, 2, (3, 4, 4), [0, 1, 2, 0, 1], 7, "--dataset x")
    common.save_samples(str(tmp_path / "b.npz"), sample, 5, 3, (3, 4, 4), [0, 1, 2, 0, 1], 7, "--dataset x")
    common.save_samples(str(tmp_path / "c.npz"), sample, 5, 5, (3, 4, 4), [-1] * 5, 8, "--dataset x")
    a, b, c = (np.load(tmp_path / f"{k}.npz") for k in "abc")
    assert a["images"].dtype == np.uint8 and a["images"].shape == (5, 3, 4, 4)
    assert a["labels"].tolist() == [0, 1, 2, 0, 1] and c["labels"].tolist() == [-1] * 5
    assert np.array_equal(a["images"], b["images"])  # the same samples at batch 2 and batch 3
    assert not np.array_equal(a["images"], c["images"])  # another seed, other noise
    expected = common.to_uint8(common.sample_noise(7, 3, (3, 4, 4))[None]).numpy()[0]
    assert np.array_equal(a["images"][3], expected)  # sample j's noise comes from (seed, j) alone
    assert made[:3] == [[0, 1], [2, 0], [1]] and made[-1] is None  # labels in chunks; -1: unconditional
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz", "c.npz"]  # no temp file left behind
    assert f"wrote 5 samples to {tmp_path / 'a.npz'}; score them with: python evaluate.py" in capsys.readouterr().out


def test_checkpoint_round_trip_and_every_refusal(tmp_path):
    path = str(tmp_path / "last.pt")
    state = {"script": "mnist_unet", "config": {"hidden": 64}, "model": {"w": torch.ones(2)}}
    common.save_checkpoint(path, state)
    assert os.listdir(tmp_path) == ["last.pt"]
    ckpt = common.load_checkpoint(path, "mnist_unet", {"hidden": 64}, must_match=("hidden",))
    assert torch.equal(ckpt["model"]["w"], torch.ones(2))

    def refused(*args, **kwargs):
        with pytest.raises(common.UserError) as e:
            common.load_checkpoint(*args, **kwargs)
        return str(e.value)

    assert "cifar_cfg.py" in refused(path, "cifar_cfg")
    assert "hidden=64" in refused(path, "mnist_unet", {"hidden": 128}, must_match=("hidden",))
    assert "folder" in refused(str(tmp_path), "mnist_unet")
    assert "does not exist" in refused(str(tmp_path / "nope.pt"), "mnist_unet")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(open(path, "rb").read()[:100])
    assert "truncated or corrupt" in refused(str(truncated), "mnist_unet")


def test_rng_state_restores_the_stream():
    torch.manual_seed(3)
    state = common.rng_state()
    first = torch.rand(3)
    common.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)


@pytest.mark.parametrize("name, make, shape", [("mnist", make_mnist_root, (1, 28, 28)),
                                                ("cifar10", make_cifar_root, (3, 32, 32))])
def test_load_dataset_reads_torchvision_layouts_exactly(tmp_path, name, make, shape):
    root = make(tmp_path, n=40)
    images, labels = common.load_dataset(name, root)
    expected, expected_labels = shapes(40, shape[1], shape[0])
    assert images.dtype == torch.uint8 and images.shape == (40, *shape)
    assert torch.equal(images, torch.from_numpy(expected)) and labels.tolist() == expected_labels.tolist()


def test_missing_dataset_names_data_dir(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")  # no folder can be created below a file, so no download is tried over the network
    with pytest.raises(common.UserError, match="--data-dir"):
        common.load_dataset("mnist", str(blocker / "data"))


def test_unwritable_out_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(common.UserError, match="--out"):
        common.prepare_out(str(blocker / "runs"))


def test_impossible_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(common.UserError, match="--device cpu"):
        common.get_device("cuda")


def test_output_file_in_a_missing_folder_is_refused_up_front(tmp_path):
    assert common.check_output_file(str(tmp_path / "s.npz"), "--save-samples") == str(tmp_path / "s.npz")
    with pytest.raises(common.UserError, match="--save-samples"):
        common.check_output_file(str(tmp_path / "missing" / "s.npz"), "--save-samples")


def test_checkpoint_without_settings_is_refused(tmp_path):
    path = str(tmp_path / "bare.pt")
    common.save_checkpoint(path, {"script": "mnist_unet", "model": {}})
    with pytest.raises(common.UserError, match="no saved settings"):
        common.load_checkpoint(path, "mnist_unet", {"hidden": 8}, must_match=("hidden",))


def test_restore_continues_the_rng_stream_or_reseeds_it(tmp_path):
    toy_training(toy_args(tmp_path), epochs=1)
    last = str(tmp_path / "run" / "last.pt")
    ckpt = common.load_checkpoint(last, "toy")
    assert len(ckpt["rng"]) == 1  # one process: a list of one state
    common.set_rng_state(ckpt["rng"][0])
    expected = torch.rand(3)
    torch.manual_seed(123)
    common.Run("toy", toy_args(tmp_path, resume=last), ()).restore(model=torch.nn.Linear(1, 1))
    assert torch.equal(torch.rand(3), expected)  # the saved stream continues
    ckpt["rng"] = ckpt["rng"] * 2  # saved by 2 processes, resumed by 1: a fresh stream
    common.save_checkpoint(str(tmp_path / "two.pt"), ckpt)
    common.Run("toy", toy_args(tmp_path, resume=str(tmp_path / "two.pt")), ()).restore(model=torch.nn.Linear(1, 1))
    seed, step, rank = 0, 3, 0
    fresh = torch.Generator().manual_seed(seed + 1000 * step + rank)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=fresh))


# ---------------------------------------------------------------------------- precision and GPU decisions
@pytest.mark.parametrize("capability, expected",
                         [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_follows_native_bf16(capability, expected):
    # T4 and V100 get fp16 with a scaler; Ampere and newer, bf16
    assert common.choose_precision("auto", "cuda", capability) == expected
    assert common.choose_precision("auto", "cpu") == "fp32"
    assert common.choose_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("flag, device, capability, message", [
    ("fp16", "cpu", None, "fp16 needs a CUDA GPU"), ("fp16", "mps", None, "fp16 needs a CUDA GPU"),
    ("bf16", "cuda", (7, 5), "bf16 needs a GPU with native bf16")])
def test_precisions_a_device_cannot_run_fast_are_refused(flag, device, capability, message):
    with pytest.raises(common.UserError, match=message):
        common.choose_precision(flag, device, capability)


@pytest.mark.parametrize("precision, dtype",
                         [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_autocast_and_scaler_run_a_step_on_the_cpu(precision, dtype):
    cpu = torch.device("cpu")
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = common.grad_scaler(cpu, precision)
    assert scaler.is_enabled() == (precision == "fp16")
    before = model.weight.detach().clone()
    with common.autocast(cpu, precision):
        out = model(torch.randn(4, 8))
    assert out.dtype == dtype
    scaler.scale(out.float().pow(2).mean()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert model.weight.dtype == torch.float32  # the weights stay fp32
    assert not torch.equal(model.weight, before)  # and the step moved them


# ------------------------------------------------------------------------------------------ bad flags
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_flags_are_refused(value):
    with pytest.raises(common.UserError, match="--lr must be a finite number"):
        common.check_finite(argparse.Namespace(lr=value, epochs=3))
    with pytest.raises(common.UserError, match="--cfg-interval must be a finite number"):
        common.check_finite(argparse.Namespace(cfg_interval=[0.1, value]))


@pytest.mark.parametrize("seed", [-1, 2**31, 2**64])
def test_seeds_numpy_cannot_take_are_refused(seed):
    with pytest.raises(common.UserError, match="--seed must be between 0 and"):
        common.check_seed(argparse.Namespace(seed=seed))


def test_nan_is_not_positive():
    with pytest.raises(common.UserError, match="--lr must be positive"):
        common.check_positive(argparse.Namespace(lr=float("nan")), "lr")


@pytest.mark.parametrize("name", ["gpu", "cuda0", "tpu"])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(common.UserError, match="cpu, cuda, cuda:N or mps"):
        common.get_device(name)


def test_help_shows_each_real_default_once_and_no_none():
    p = argparse.ArgumentParser(formatter_class=common.HelpFormatter)
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate")
    p.add_argument("--resume", help="a checkpoint")
    p.add_argument("--no-flip", action="store_true", help="no flips")
    p.add_argument("--interval", nargs=2, type=float, default=[0.1, 1.0], help="interval")
    p.add_argument("--seed", type=int, default=0, help="seed")
    text = " ".join(p.format_help().split())
    assert "learning rate (default: 0.0002)" in text and "interval (default: 0.1 1.0)" in text
    assert "seed (default: 0)" in text
    assert "None" not in text and "False" not in text


# ------------------------------------------------------------------------------------ files and folders
@pytest.mark.parametrize("make_target, fragment", [
    (lambda p: p.mkdir(), "not a regular file"),              # a directory named x.npz
    (lambda p: None, None),                                    # absent: fine
])
def test_output_file_target_itself_is_checked(tmp_path, make_target, fragment):
    target = tmp_path / "x.npz"
    make_target(target)
    if fragment is None:
        assert common.check_output_file(str(target), "--save-samples") == str(target)
        assert os.listdir(tmp_path) == []  # the probe is removed
    else:
        with pytest.raises(common.UserError, match=fragment):
            common.check_output_file(str(target), "--save-samples")


def test_output_file_in_proc_is_refused_even_as_root():
    with pytest.raises(common.UserError, match="--save-samples"):
        common.check_output_file("/proc/x.npz", "--save-samples")


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    path.write_text("good")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(common.UserError, match="No space left on device.*previous file is kept"):
        common.atomic_write(str(path), fail)
    assert path.read_text() == "good" and os.listdir(tmp_path) == ["last.pt"]


def test_atomic_write_interrupted_leaves_no_temp(tmp_path):
    def interrupted(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        common.atomic_write(str(tmp_path / "s.npz"), interrupted)
    assert os.listdir(tmp_path) == []


def test_atomic_write_names_its_temp_hidden_with_the_files_extension(tmp_path):
    seen = []
    common.atomic_write(str(tmp_path / "s.npz"), lambda tmp: seen.append(os.path.basename(tmp)) or
                        open(tmp, "w").write("x"))
    assert seen == [f".s.npz.tmp-{os.getpid()}.npz"]


def test_atomic_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}")) or fsync(fd))
    common.atomic_write(str(tmp_path / "a.txt"), lambda tmp: open(tmp, "w").write("data"))
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # the data before the rename, the folder after
    assert os.path.basename(synced[0]).startswith(".a.txt.tmp-")


def test_a_figure_interrupted_while_written_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "loss.png"
    common.save_grid(torch.zeros(1, 1, 4, 4), str(path), nrow=1)
    good = path.read_bytes()

    def half_then_killed(self, fp, *args, **kwargs):
        open(fp, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        common.save_grid(torch.ones(1, 1, 4, 4), str(path), nrow=1)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["loss.png"]


def test_a_lock_that_is_a_link_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("VICTIM")
    (tmp_path / "out").mkdir()
    os.symlink(victim, tmp_path / "out" / ".lock")
    with pytest.raises(common.UserError, match="lock file .* link"):
        common.lock_out(str(tmp_path / "out"))
    assert victim.read_text() == "VICTIM"


def test_out_lock_refuses_a_second_holder_saying_how_to_find_it(tmp_path):
    program = ("import sys, time, common; common.lock_out(sys.argv[1]); "
               "print('locked', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", program, str(tmp_path)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(common.UserError, match=re.escape(f"training run (`fuser {tmp_path}/.lock` names it)")):
            common.lock_out(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    common.lock_out(str(tmp_path))  # released by the OS when the holder died, even killed


def test_fresh_run_into_an_existing_run_is_refused(tmp_path):
    common.Run("toy", toy_args(tmp_path), ())  # nothing there: fine
    toy_training(toy_args(tmp_path), epochs=1)
    last = str(tmp_path / "run" / "last.pt")
    with pytest.raises(common.UserError, match="--resume .*--overwrite"):
        common.Run("toy", toy_args(tmp_path), ())
    common.Run("toy", toy_args(tmp_path, resume=last), ())
    common.Run("toy", toy_args(tmp_path, overwrite=True), ())


def test_flipped_checkpoint_bytes_are_refused(tmp_path):
    path = tmp_path / "last.pt"
    state = {"script": "mnist_unet", "config": {"a": 1}, "model": {"w": torch.zeros(4096)}}
    common.save_checkpoint(str(path), state)
    raw = bytearray(path.read_bytes())
    offset = raw.index(bytes(4096 * 4)) + 1000  # inside the stored zeros of w
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(common.UserError, match="checksum does not match"):
        common.load_checkpoint(str(path), "mnist_unet")


def test_checkpoint_with_an_empty_config_is_refused(tmp_path):
    path = str(tmp_path / "empty.pt")
    common.save_checkpoint(path, {"script": "celeba_jit", "config": {}, "model": {}})
    with pytest.raises(common.UserError, match="no saved settings"):
        common.load_checkpoint(path, "celeba_jit")


def test_metrics_file_appends_json_lines(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    common.append_json(path, step=1, loss=0.5)
    common.append_json(path, epoch=1, loss=0.25)  # a resumed run appends
    rows = [json.loads(line) for line in open(path)]
    assert [(r.get("step"), r.get("epoch"), r["loss"]) for r in rows] == [(1, None, 0.5), (None, 1, 0.25)]


# ----------------------------------------------------------------------------------------------- data
def test_fashion_layout_and_class_names(tmp_path):
    root = make_fashion_root(tmp_path, n=30, n_test=20)
    train = common.load_dataset("fashion", root)
    test = common.load_dataset("fashion", root, train=False)
    assert train[0].shape == (30, 1, 28, 28) and test[0].shape == (20, 1, 28, 28)
    assert common.CLASS_NAMES["fashion"][9] == "Ankle boot"


def test_crafted_cifar_pickle_runs_no_code(tmp_path):
    root = make_cifar_root(tmp_path, n=20)
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    batch = os.path.join(root, "cifar-10-batches-py", "data_batch_1")
    with open(batch, "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(common.UserError, match="data_batch_1 is not a CIFAR-10 python batch"):
        common.load_dataset("cifar10", root)
    assert not marker.exists()


def test_label_count_and_range_are_checked_at_load(tmp_path):
    root = make_mnist_root(tmp_path, n=20)
    labels = os.path.join(root, "MNIST", "raw", "train-labels-idx1-ubyte")
    raw = open(labels, "rb").read()
    open(labels, "wb").write(raw[:4] + (19).to_bytes(4, "big") + raw[8:-1])  # 19 labels for 20 images
    with pytest.raises(common.UserError, match="19 labels for 20 images"):
        common.load_dataset("mnist", root)
    open(labels, "wb").write(raw[:-1] + bytes([12]))  # a label 12 in a 10-class set
    with pytest.raises(common.UserError, match="labels outside 0..9"):
        common.load_dataset("mnist", root)


def test_failed_download_names_the_layout_in_one_line(tmp_path, monkeypatch):
    import torchvision

    def offline(root, train, download):  # as torchvision does: the folders first, then a multi-line error
        os.makedirs(os.path.join(root, "FashionMNIST", "raw"))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...,\n"
                           "got: network is unreachable")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    data = tmp_path / "data"
    with pytest.raises(common.UserError) as e:
        common.load_dataset("fashion", str(data))
    message = str(e.value)
    assert "\n" not in message
    for fragment in (str(data), "network is unreachable", "gunzipped", "dataset-fashion-mnist",
                     "Running offline", "FashionMNIST/raw/"):
        assert fragment in message, message


# ------------------------------------------------------------------------------------- plots and grids
def test_ticks_are_round():
    assert common.nice_ticks(0, 39.75, 6) == [0, 10, 20, 30]
    assert common.nice_ticks(1, 390.8, 6) == [100, 200, 300]
    assert common.log_ticks(-1.3, 0) == [0.1, 0.2, 0.5, 1.0]


def test_grid_title_and_labels_are_drawn_in_black(tmp_path):
    images = torch.ones(4, 1, 8, 8)  # white images: any dark pixel is text
    plain = common.grid_image(images, nrow=2)
    titled = common.grid_image(images, nrow=2, title="samples, w=3", row_labels=["Ankle boot", "Bag"])
    assert titled.height >= plain.height + 15 and titled.width > plain.width
    ink = np.asarray(titled.convert("L"))
    assert (ink[:16] < 100).sum() > 20  # the title's pixels at the top
    assert (ink[16:, :40] < 100).sum() > 20  # the row labels at the left


def test_progress_line_shows_fields_and_whole_job_eta(capsys):
    progress = common.Progress(total=100, every=0.0, prefix="sampling")
    progress.update(50, 10, epoch="2/4", loss=torch.tensor(0.25))
    line = capsys.readouterr().out.strip()
    assert line.startswith("sampling 50/100 | epoch 2/4 | loss 0.2500 |") and "ETA" in line


def ignore_sigint():  # what a shell does to a job started with `cmd &`
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig, code, before", [(signal.SIGINT, 130, None), (signal.SIGTERM, 130, None),
                                               (signal.SIGINT, 130, ignore_sigint)])
def test_interrupt_is_one_line(tmp_path, sig, code, before):
    program = ("import time, common\n"
               "def main():\n"
               "    print('ready', flush=True)\n"
               "    time.sleep(30)\n"
               "common.run(main)\n")
    proc = subprocess.Popen([sys.executable, "-c", program], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=before)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and "Traceback" not in err
    assert err.strip() == "interrupted"


def test_output_file_in_the_runs_new_out_folder_is_left_to_prepare_out(tmp_path):
    out = tmp_path / "run"
    target = str(out / "s.npz")
    assert common.check_output_file(target, "--save-samples", out=str(out)) == target
    assert not out.exists()  # nothing made before the run starts
    with pytest.raises(common.UserError, match="--save-samples"):  # any other missing folder is refused
        common.check_output_file(str(tmp_path / "elsewhere" / "s.npz"), "--save-samples", out=str(out))


def test_rank0_first_in_one_process_returns_or_raises():
    assert common.rank0_first(lambda: 42, 0, 1) == 42

    def broken():
        raise common.UserError("no data in ROOT; pass --data-dir")
    with pytest.raises(common.UserError, match="no data in ROOT"):
        common.rank0_first(broken, 0, 1)


RANK0_FIRST = '''
import os, sys, time
sys.path.insert(0, {repo!r})
import common
rank, world, _ = common.setup_ddp("cpu")
log = {log!r}

def load():
    if rank == 0:
        time.sleep(1)  # rank 1 must wait for this, not race it
        if {fail} == "user":
            raise common.UserError("rank 0 found no data")
        if {fail} == "os":
            raise OSError(5, "Input/output error")
    with open(log, "a") as f:
        f.write(f"{{rank}} {{time.time()}}\\n")
    return rank
def main():  # common.run ends the process group, as in the scripts
    try:
        print("loaded", common.rank0_first(load, rank, world), flush=True)
    except common.UserError as e:
        print("error on rank", rank, e, flush=True)
common.run(main)
'''


@pytest.mark.slow
@pytest.mark.parametrize("fail", ["", "user", "os"])
def test_rank0_first_under_torchrun_loads_rank0_first_and_sends_its_error(tmp_path, fail):
    log = tmp_path / "order.txt"
    script = tmp_path / "rank0_first.py"
    script.write_text(RANK0_FIRST.format(repo=REPO, log=str(log), fail=repr(fail)))
    r = run_script(str(script), torchrun=2, timeout=120)
    if fail == "os":  # not a UserError: rank 0 fails with it, rank 1 hears of it instead of waiting
        assert "error on rank 1 rank 0 stopped (OSError: [Errno 5] Input/output error)" in r.stdout, r.stderr[-2000:]
        assert "OSError" in r.stderr and not log.exists()
        return
    assert r.returncode == 0, r.stderr[-2000:]
    if fail:  # both ranks get rank 0's error, neither hangs, nobody loads
        assert r.stdout.count("error on rank") == 2 and "rank 0 found no data" in r.stdout
        assert not log.exists()
    else:
        order = [line.split()[0] for line in log.read_text().splitlines()]
        assert order == ["0", "1"] and "loaded 0" in r.stdout and "loaded 1" in r.stdout


# --------------------------------------------------------------------------------------- the run harness
def toy_args(tmp_path, **flags):
    return argparse.Namespace(**{"out": str(tmp_path / "run"), "resume": None, "overwrite": False, "seed": 0,
                                 "lr": 0.05, **flags})


def toy_training(args, epochs, loss_scale=1.0):
    """A linear model fitted to y = 2x by the loop the training scripts use, 3 steps of 4 an epoch."""
    try:
        run = common.Run("toy", args, ("lr", "seed"), log_every=2)
        data = run.load(lambda: torch.linspace(-1, 1, 12)[:, None])
        torch.manual_seed(args.seed)
        net = torch.nn.Linear(1, 1)
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        run.restore(model=net, optimizer=opt)
        for epoch in run.epochs(epochs, steps_per_epoch=3, batch_size=4):
            for i in range(3):
                x = data[torch.randint(0, 12, (4,))]
                loss = loss_scale * (net(x) - 2 * x - 0.01 * torch.randn(4, 1)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.log(loss, opt.param_groups[0]["lr"])
            run.save(data_size=12)
        return run, net
    finally:
        while common.LOCKS:  # the end of a process releases its lock
            common.LOCKS.pop().close()


def test_run_resumed_equals_uninterrupted_and_writes_checkpoint_and_metrics(tmp_path):
    straight, net = toy_training(toy_args(tmp_path / "a"), epochs=2)
    toy_training(toy_args(tmp_path / "b"), epochs=1)
    resumed, net_b = toy_training(toy_args(tmp_path / "b", resume=str(tmp_path / "b" / "run" / "last.pt")), epochs=2)
    a, b = (common.load_checkpoint(str(p / "run" / "last.pt"), "toy") for p in (tmp_path / "a", tmp_path / "b"))
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6 and a["data_size"] == 12
    assert a["losses"] == b["losses"] and len(a["losses"]) == 6 and a["losses"][-1] < a["losses"][0]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the RNG streams continued
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    assert set(a) >= {"script", "config", "model", "optimizer", "epoch", "step", "rng", "losses"}
    lines = [json.loads(line) for line in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert [m.get("step") for m in lines] == [2, 3, None, 5, 6, None]  # every 2 steps and at an epoch's end
    assert [m["epoch"] for m in lines] == [1, 1, 1, 2, 2, 2] and lines[2]["loss"] == pytest.approx(
        sum(a["losses"][:3]) / 3)
    assert {"img_per_s", "seconds", "lr"} <= set(lines[2])


def test_run_refusals_are_one_sentence(tmp_path):
    toy_training(toy_args(tmp_path), epochs=1)
    last = str(tmp_path / "run" / "last.pt")
    with pytest.raises(common.UserError, match="already holds a checkpoint"):
        toy_training(toy_args(tmp_path), epochs=1)
    with pytest.raises(common.UserError, match="trained 1 epochs already, so --epochs 1 leaves nothing to do"):
        toy_training(toy_args(tmp_path, resume=last), epochs=1)
    with pytest.raises(common.UserError, match="trained with lr=0.05 but this run has lr=0.1"):
        toy_training(toy_args(tmp_path, resume=last, lr=0.1), epochs=2)
    ckpt = torch.load(last, weights_only=True)
    ckpt.pop("checksum")
    ckpt["model"]["weight"] = torch.zeros(3, 3)  # another version's shapes
    common.save_checkpoint(str(tmp_path / "other.pt"), ckpt)
    with pytest.raises(common.UserError, match="the model of .*other.pt does not fit this run"):
        toy_training(toy_args(tmp_path, resume=str(tmp_path / "other.pt")), epochs=2)
    ckpt = torch.load(last, weights_only=True)
    ckpt.pop("checksum")
    del ckpt["optimizer"]
    common.save_checkpoint(str(tmp_path / "old.pt"), ckpt)
    with pytest.raises(common.UserError, match="holds no optimizer state"):
        toy_training(toy_args(tmp_path, resume=str(tmp_path / "old.pt")), epochs=2)
    ckpt = torch.load(last, weights_only=True)
    ckpt.pop("checksum")
    ckpt["epoch"] = "1"  # an edited file
    common.save_checkpoint(str(tmp_path / "edited.pt"), ckpt)
    with pytest.raises(common.UserError, match="has no whole epoch and step count"):
        toy_training(toy_args(tmp_path, resume=str(tmp_path / "edited.pt")), epochs=2)


def test_a_run_refused_by_the_lock_leaves_the_running_jobs_metrics_alone(tmp_path):
    toy_training(toy_args(tmp_path), epochs=1)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    common.lock_out(str(tmp_path / "run"))  # another training run holds this --out
    try:
        with pytest.raises(common.UserError, match="in use by another training run"):
            common.Run("toy", toy_args(tmp_path, overwrite=True), ()).load(lambda: None)
    finally:
        common.LOCKS.pop().close()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_run_stops_on_a_nan_loss_before_writing_its_checkpoint(tmp_path):
    with pytest.raises(common.UserError, match="the loss became nan at step 1, so training stopped before"):
        toy_training(toy_args(tmp_path), epochs=1, loss_scale=float("nan"))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_run_refuses_a_batch_larger_than_the_data(tmp_path):
    args = toy_args(tmp_path)
    run = common.Run("toy", args, ())
    with pytest.raises(common.UserError, match="fewer images than --batch-size 64"):
        next(run.epochs(1, steps_per_epoch=256 // 1000, batch_size=64))


@pytest.mark.parametrize("flag, value, fragment", [
    ("epochs", 10**30, "--epochs must be between 1 and 100,000"), ("batch_size", 0, "--batch-size"),
    ("steps", 0, "--steps"), ("num_samples", 0, "--num-samples"), ("seed", -1, "--seed")])
def test_run_flags_out_of_range_are_refused(flag, value, fragment):
    args = argparse.Namespace(epochs=1, batch_size=4, steps=2, num_samples=10, seed=0, device="cpu", sample=None,
                              resume=None, save_samples=None, benchmark=False, out="runs/x")
    setattr(args, flag, value)
    with pytest.raises(common.UserError, match=fragment):
        common.check_run_flags(args)


# ------------------------------------------------------------------ inputs that load but do not fit (break-it)
def test_a_checkpoint_path_that_is_no_file_says_so():
    with pytest.raises(common.UserError, match="/dev/null is not a regular file"):
        common.load_checkpoint("/dev/null", "toy")


def test_a_state_that_does_not_fit_is_one_sentence():
    with pytest.raises(common.UserError, match="the weights of x.pt does not fit this run .*size mismatch"):
        common.load_state(torch.nn.Linear(2, 2), {"weight": torch.zeros(3, 3), "bias": torch.zeros(3)},
                          "the weights of x.pt")


def test_mnist_files_of_another_image_size_are_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    make_mnist_root(tmp_path, n=8)
    with open(raw / "train-images-idx3-ubyte", "wb") as f:  # a well-formed idx file of 8 16x16 images
        f.write(bytes([0, 0, 8, 3]) + (8).to_bytes(4, "big") + (16).to_bytes(4, "big") * 2 + bytes(8 * 256))
    with pytest.raises(common.UserError, match="holds 16x16 images, not MNIST's 28x28"):
        common.load_dataset("mnist", str(tmp_path))


def test_cifar_batches_of_float_pixels_or_random_bytes_are_one_line(tmp_path):
    make_cifar_root(tmp_path, n=10)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "wb") as f:
        pickle.dump({"data": np.full((2, 3072), np.nan), "labels": [0, 1]}, f)
    with pytest.raises(common.UserError, match="its pixels are float64, not uint8"):
        common.load_dataset("cifar10", str(tmp_path))
    batch.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(5000)))
    with pytest.raises(common.UserError) as error:
        common.load_dataset("cifar10", str(tmp_path))
    assert "\n" not in str(error.value) and "not a CIFAR-10 python batch" in str(error.value)


def test_samples_of_nan_weights_are_not_written(tmp_path):
    with pytest.raises(common.UserError, match="non-finite samples .* was not written"):
        common.save_samples(str(tmp_path / "s.npz"), lambda noise, y: noise * float("nan"), 4, 2, (1, 2, 2),
                            [0, 1, 0, 1], 0, "")
    assert os.listdir(tmp_path) == []
