"""Your own images: the on-disk cache of decoded images, --fit pad and crop, EXIF orientation."""
import os
import shutil

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

import sample_vae
import train_vae
from conftest import assert_user_error, make_folder, run_script, train_in_process
from vae_model import VAE, load_vae


@pytest.fixture
def decodes(monkeypatch):
    """How many images train_vae decodes (each goes through open_rgb once)."""
    count, real = [], train_vae.open_rgb
    monkeypatch.setattr(train_vae, "open_rgb", lambda *args: count.append(1) or real(*args))
    return count


def decoded(folder, size=32, fit="pad"):
    """The images of a folder decoded straight, without the cache."""
    return torch.stack([pil_to_tensor(train_vae.to_square(train_vae.open_rgb(file), size, fit))
                        for file in train_vae.image_files(folder)])


def cached(folder, cache, size=32, fit="pad"):
    return train_vae.cached_images(train_vae.image_files(folder), size, fit, folder, str(cache))


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_the_cache_is_built_once_and_holds_the_pixels_decoded_directly(tmp_path, decodes, fit, capsys):
    folder = make_folder(tmp_path / "images", count=5, size=(48, 30))
    first = cached(folder, tmp_path / "cache", fit=fit)
    assert len(decodes) == 5
    [name] = os.listdir(tmp_path / "cache")
    said = capsys.readouterr().out
    assert said.startswith(f"decoding 5 files once, at 32 px ({fit}), into the cache {tmp_path / 'cache' / name}\n")
    second = cached(folder, tmp_path / "cache", fit=fit)
    assert len(decodes) == 5  # the second run decodes nothing
    assert capsys.readouterr().out == f"5 images at 32 px ({fit}) cached in {tmp_path / 'cache' / name}\n"
    direct = decoded(folder, fit=fit)
    assert torch.equal(first, direct) and torch.equal(second, direct)


def test_a_changed_folder_is_noticed_and_its_cache_rebuilt(tmp_path, decodes):
    folder = make_folder(tmp_path / "images", count=4)
    cached(folder, tmp_path / "cache")
    changes = [lambda: make_folder(tmp_path / "images", count=5),  # a file added
               lambda: os.remove(os.path.join(folder, "blob_00.png")),  # one removed
               lambda: os.utime(os.path.join(folder, "blob_01.png"), ns=(0, 123456789))]  # one touched
    for change, count in zip(changes, (5, 4, 4)):
        before = len(decodes)
        change()
        images = cached(folder, tmp_path / "cache")
        assert len(decodes) - before == count and len(images) == count
        assert len(os.listdir(tmp_path / "cache")) == 1  # the stale cache is gone
    assert torch.equal(images, decoded(folder))
    other = cached(folder, tmp_path / "cache", size=16)  # another size is another cache, beside it
    assert other.shape == (4, 3, 16, 16) and len(os.listdir(tmp_path / "cache")) == 2


def test_a_cut_off_cache_is_rebuilt_never_read(tmp_path, decodes):
    folder = make_folder(tmp_path / "images", count=4)
    cached(folder, tmp_path / "cache")
    [name] = os.listdir(tmp_path / "cache")
    path = tmp_path / "cache" / name
    os.truncate(path, os.path.getsize(path) - 3 * 32 * 32)  # one image short, as after a kill
    images = cached(folder, tmp_path / "cache")
    assert len(decodes) == 8 and torch.equal(images, decoded(folder))
    assert os.path.getsize(path) == 128 + 4 * 3 * 32 * 32  # the npy header, then every image whole


def test_an_unreadable_file_leaves_no_row_in_the_cache(tmp_path, capsys):
    folder = make_folder(tmp_path / "images", count=3)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    for _ in range(2):
        assert len(cached(folder, tmp_path / "cache")) == 3
        assert "skipped 1 file(s)" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "cache")) == 1  # the cache alone: no temporary file left


def test_a_full_disk_is_said_before_the_cache_is_written(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "images", count=3)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(train_vae.UserError, match=r"caching 3 images at 32 px needs 0.00 GB free in .*cache"):
        cached(folder, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []


def wide_photo():
    """A 'photo' three times as wide as high: red, green (the centre) and blue thirds, no white."""
    photo = Image.new("RGB", (96, 32), (200, 30, 30))
    photo.paste((30, 200, 30), (32, 0, 64, 32))
    photo.paste((30, 30, 200), (64, 0, 96, 32))
    return photo


def test_crop_keeps_the_centre_of_a_wide_photo_and_pad_keeps_it_all_on_white():
    r, g, b = pil_to_tensor(train_vae.to_square(wide_photo(), 16, "crop")).int()
    assert (g > 180).all() and (r < 60).all() and (b < 60).all()  # green from edge to edge, no red, blue, white
    pad = pil_to_tensor(train_vae.to_square(wide_photo(), 24, "pad"))
    assert (pad[:, :8] == 255).all() and (pad[:, -8:] == 255).all()  # white above and below the strip
    assert pad[0, 12, 2] > 180 and pad[2, 12, 21] > 180  # red on the left, blue on the right


@pytest.mark.parametrize("fit, white_corners", [("crop", False), ("pad", True)])
def test_a_rotated_crop_shows_no_white_corner(fit, white_corners):
    """A cropped photo is mirrored out before it turns, so that no corner is filled; a padded
    picture on white turns on white."""
    torch.manual_seed(0)
    photo = torch.tensor([60, 90, 120], dtype=torch.uint8).view(1, 3, 1, 1).expand(4, 3, 32, 32).contiguous()
    photo[:, :, ::7] = 20  # stripes, so that the mirrored edge is not just a plain colour
    augment = train_vae.make_augment(45.0, fit, 32)
    brightest = max(augment(photo).max().item() for _ in range(10))
    assert (brightest == 255) == white_corners, brightest


def exif_rotated_jpeg(path):
    """A JPEG stored 64 x 32 with EXIF orientation 6: upright, 32 wide and 64 high, red above blue."""
    upright = Image.new("RGB", (32, 64), (220, 20, 20))
    upright.paste((20, 20, 220), (0, 32, 32, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    return str(path)


def is_upright(pixels):
    """A (3, 64, 64) uint8 image of exif_rotated_jpeg, padded to a square: red above blue,
    white at the sides."""
    pixels = pixels.int()
    red, blue, side = pixels[:, 4:28, 24:40], pixels[:, 36:60, 24:40], pixels[:, :, :10]
    return (red[0] > 180).all() and (red[2] < 60).all() and (blue[2] > 180).all() and (blue[0] < 60).all() \
        and (side > 240).all()


def test_an_exif_rotated_photo_loads_upright_in_training_and_in_sample_vae(tmp_path):
    os.makedirs(tmp_path / "photos")
    for name in ("phone.jpg", "again.jpg"):
        exif_rotated_jpeg(tmp_path / "photos" / name)
    with Image.open(tmp_path / "photos" / "phone.jpg") as stored:
        assert stored.size == (64, 32)  # sideways, as stored
    assert train_vae.open_rgb(tmp_path / "photos" / "phone.jpg").size == (32, 64)
    assert is_upright(cached(str(tmp_path / "photos"), tmp_path / "cache", size=64)[0])  # training
    model = VAE(64, 2, (8, 8, 8))
    # --image and --interpolate read through load_image, --latent-map and --prior data through load_folder.
    for x in (sample_vae.load_image(str(tmp_path / "photos" / "phone.jpg"), model),
              sample_vae.load_folder(str(tmp_path / "photos"), model, "--latent-map")):
        assert is_upright(x[0].add(1).mul(127.5).round().byte())


def test_sample_vae_prepares_images_with_the_models_fit(tmp_path):
    wide_photo().save(tmp_path / "photo.png")
    x = sample_vae.load_image(str(tmp_path / "photo.png"), VAE(16, 2, (8, 8, 8), fit="crop"))
    r, g, b = x[0].add(1).mul(127.5).round()
    assert (g > 180).all() and (r < 60).all() and (b < 60).all()  # the green centre, not the red and blue edges
    padded = sample_vae.load_image(str(tmp_path / "photo.png"), VAE(16, 2, (8, 8, 8)))
    assert (padded[0, :, 0] == 1).all()  # the default pads: white on top


def test_a_resumed_run_keeps_its_fit(tmp_path, image_folder, monkeypatch):
    run = ("--data", image_folder, "--epochs", 3, "--image-size", 32, "--batch-size", 4, "--prior-steps", 0,
           "--device", "cpu", "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth")
    real = train_vae.train_one_epoch

    def ctrl_c_in_epoch_2(*args):
        if args[-1] == 2:
            os.kill(os.getpid(), __import__("signal").SIGINT)
        return real(*args)
    monkeypatch.setattr(train_vae, "train_one_epoch", ctrl_c_in_epoch_2)
    assert train_in_process(*run, "--fit", "crop") == 130
    monkeypatch.setattr(train_vae, "train_one_epoch", real)
    assert train_in_process(*run, "--resume") == 0
    assert load_vae(tmp_path / "m.pth").fit == "crop"


def test_a_cache_dir_that_is_a_file_is_one_sentence(tmp_path, image_folder):
    (tmp_path / "file").write_text("not a folder")
    result = run_script("train_vae.py", "--data", image_folder, "--image-size", 32, "--epochs", 1,
                        "--prior-steps", 0, "--device", "cpu", "--cache-dir", tmp_path / "file" / "cache",
                        "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth")
    assert_user_error(result, "cannot write the image cache", "--cache-dir")
    assert sorted(os.listdir(tmp_path)) == ["file"]
