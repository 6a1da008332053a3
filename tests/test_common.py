"""common.py: the pixel conversions, files, checkpoints, RNG and data loading every script relies on."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
from helpers import make_cifar_root, make_mnist_root, shapes


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
    assert img[2 * 12 + 4, 2 * 12 + 4] == 255 and img[2 * 2 + 4, 2 * 2 + 4] == 0  # image 4 white, image 0 black
    common.save_grid(images, tmp_path / "l.png", nrow=3, row_labels=["a", "b"], col_labels=["x", "y", "z"])
    labelled = Image.open(tmp_path / "l.png")
    assert labelled.width > 3 * 10 + 2 and labelled.height > 2 * 10 + 2


def test_gif_has_one_frame_per_batch(tmp_path):
    frames = [torch.full((2, 3, 8, 8), v) for v in (-1.0, 0.0, 1.0)]
    common.save_gif(frames, tmp_path / "a.gif", nrow=2)
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 3


def test_loss_plot_draws_each_curve(tmp_path):
    common.plot_curves(tmp_path / "loss.png", {"train": [1.0 / (i + 1) for i in range(300)], "val": ([1, 100, 300], [0.5, 0.1, 0.05])})
    img = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB")).reshape(-1, 3)
    assert (np.abs(img - [31, 119, 180]).sum(1) == 0).sum() > 100  # the first curve's colour
    assert (np.abs(img - [214, 39, 40]).sum(1) == 0).sum() > 50  # the second's


def test_samples_npz_layout(tmp_path):
    common.save_samples_npz(tmp_path / "s.npz", torch.zeros(4, 3, 5, 5), [0, 1, 2, 3])
    data = np.load(tmp_path / "s.npz")
    assert data["images"].dtype == np.uint8 and data["images"].shape == (4, 3, 5, 5)
    assert (data["images"] == 128).all() and data["labels"].tolist() == [0, 1, 2, 3]
    assert os.listdir(tmp_path) == ["s.npz"]  # no temp file left behind


def test_checkpoint_round_trip_and_every_refusal(tmp_path):
    path = str(tmp_path / "last.pt")
    common.save_checkpoint(path, {"script": "mnist_unet", "config": {"hidden": 64}, "model": {"w": torch.ones(2)}})
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


def test_rng_state_restores_every_stream():
    common.seed_everything(3)
    state = common.rng_state()
    first = (np.random.rand(), torch.rand(3), __import__("random").random())
    common.set_rng_state(state)
    again = (np.random.rand(), torch.rand(3), __import__("random").random())
    assert first[0] == again[0] and torch.equal(first[1], again[1]) and first[2] == again[2]


@pytest.mark.parametrize("name, make, shape", [("mnist", make_mnist_root, (1, 28, 28)), ("cifar10", make_cifar_root, (3, 32, 32))])
def test_load_dataset_reads_torchvision_layouts_exactly(tmp_path, name, make, shape):
    root = make(tmp_path, n=40)
    images, labels = common.load_dataset(name, root)
    expected, expected_labels = shapes(40, shape[1], shape[0])
    assert images.dtype == torch.uint8 and images.shape == (40, *shape)
    assert torch.equal(images, torch.from_numpy(expected)) and labels.tolist() == expected_labels.tolist()


def test_missing_dataset_names_data_dir(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")  # a folder below a file can't be created, so no download is attempted over the network
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


def test_rank_rng_state_continues_or_reseeds():
    common.seed_everything(5)
    states = common.all_rng_states()  # one process: a list of one state
    expected = torch.rand(3)
    common.set_rank_rng_state(states, fresh_seed=99)
    assert len(states) == 1 and torch.equal(torch.rand(3), expected)  # the saved stream continues
    common.set_rank_rng_state(states * 2, fresh_seed=99)  # saved by 2 processes, resumed by 1: a fresh stream
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(99)))  # seed 99 + rank 0
