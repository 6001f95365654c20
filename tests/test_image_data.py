"""image_data.py: finding the images of a folder or of the Hub's table, opening any image as
RGB on white and upright, making it square, the decode-once cache, augmentation, and where the
training images live."""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

import image_data
import sample_vae
import vae_api
from conftest import ROOT, blob_image, make_folder
from image_data import cached_images, image_files, make_augment, open_rgb, place_images, to_square
from vae_model import VAE


@pytest.fixture
def decodes(monkeypatch):
    """How many images the cache decodes (each goes through open_rgb once)."""
    count, real = [], image_data.open_rgb
    monkeypatch.setattr(image_data, "open_rgb", lambda *args: count.append(1) or real(*args))
    return count


def decoded(folder, size=32, fit="pad"):
    """The images of a folder decoded straight, without the cache."""
    return torch.stack([pil_to_tensor(to_square(open_rgb(file), size, fit))
                        for file in image_files(folder)])


def cached(folder, cache, size=32, fit="pad"):
    return cached_images(image_files(folder), size, fit, folder, str(cache))


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_the_cache_is_built_once_and_holds_the_pixels_decoded_directly(tmp_path, decodes, fit, capsys):
    folder = make_folder(tmp_path / "images", count=5, size=(48, 30))
    first = cached(folder, tmp_path / "cache", fit=fit)
    assert len(decodes) == 5
    [name] = os.listdir(tmp_path / "cache")
    said = capsys.readouterr().out
    assert said.startswith(f"decoding 5 files once, at 32 px ({fit}), into {tmp_path / 'cache' / name}\n")
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
               lambda: blob_image(99).save(os.path.join(folder, "blob_01.png"))]  # one edited
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
    with pytest.raises(image_data.UserError, match=r"caching 3 images at 32 px needs 0.00 GB free in .*cache"):
        cached(folder, tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []


def test_a_folder_loads_every_image_whatever_the_names(tmp_path):
    """datasets' imagefolder would infer splits from these names and keep only "train"."""
    names = ["test_1.png", "train_2.jpg", "my-validation.png", "eval_4.jpg", "valid.png", "dev_6.png",
             "train/a.png", "train/b.jpg", "test/c.png", "validation/d.png", "deep/er/e.bmp", "x.gif"]
    for i, name in enumerate(names):
        os.makedirs(os.path.dirname(tmp_path / "data" / name), exist_ok=True)
        blob_image(i).save(tmp_path / "data" / name)
    (tmp_path / "data" / ".DS_Store").write_bytes(b"\0\1")  # a hidden file is not an image to count
    folder = str(tmp_path / "data")
    files = image_files(folder)
    assert sorted(os.path.relpath(file, folder) for file in files) == sorted(names)
    images = cached_images(files, 32, "pad", folder, str(tmp_path / "cache"))
    assert images.shape == (len(names), 3, 32, 32) and images.dtype == torch.uint8


def test_a_table_with_the_hub_data_sets_schema_loads_through_the_hub_path(tmp_path, monkeypatch, capsys):
    """svjack/pokemon-blip-captions-en-zh is a table of encoded image bytes next to text columns.
    A copy of that schema, saved locally, goes through the very code that reads the Hub's."""
    import datasets
    import huggingface_hub
    import io as bytes_io
    pictures = [blob_image(i, (40 + i, 30)) for i in range(5)]
    encoded = []
    for picture in pictures:
        buffer = bytes_io.BytesIO()
        picture.save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    encoded.append({"bytes": b"not an image at all", "path": None})  # one corrupt row: skipped
    table = datasets.Dataset.from_dict(
        {"image": encoded, "text": ["a pokemon"] * 6, "zh_text": ["宝可梦"] * 6},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "zh_text": datasets.Value("string")}))
    os.makedirs(tmp_path / "hub" / "data")
    table.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    load_dataset = datasets.load_dataset
    asked = []

    def from_the_local_copy(name, split):
        asked.append((name, split))
        return load_dataset(str(tmp_path / "hub"), split=split)
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # as the tests run: no connect to the Hub first
    monkeypatch.setattr(datasets, "load_dataset", from_the_local_copy)
    name = "svjack/pokemon-blip-captions-en-zh"
    files = image_files(name)
    assert asked == [(name, "train")]
    images = cached_images(files, 32, "pad", name, str(tmp_path / "cache"))
    assert "skipped 1 file(s)" in capsys.readouterr().out  # the Hub's images go through the same cache
    expected = torch.stack([pil_to_tensor(to_square(picture, 32)) for picture in pictures])
    assert torch.equal(images, expected)


# ------------------------------------------------------------------ opening an image of any mode


def open_rgb_from(image):
    """Save the image to a file in memory and open it the way the scripts do."""
    import io
    buffer = io.BytesIO()
    image.save(buffer, format={"CMYK": "JPEG", "I": "TIFF"}.get(image.mode, "PNG"))
    buffer.seek(0)
    return open_rgb(buffer)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_become_white(mode):
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent black
    image.paste((200, 30, 30, 255), (5, 5, 15, 15))
    converted = open_rgb_from(image.convert(mode) if mode != "PA" else image.convert("P"))
    assert converted.mode == "RGB"
    assert converted.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_becomes_white():
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    image.paste(1, (3, 3, 7, 7))
    image.info["transparency"] = 0
    converted = open_rgb_from(image)
    assert converted.getpixel((0, 0)) == (255, 255, 255)
    assert converted.getpixel((5, 5)) == (250, 0, 0)


@pytest.mark.parametrize("mode", ["L", "I;16", "I", "CMYK", "1", "RGB"])
def test_every_mode_loads_as_rgb(mode):
    image = blob_image(0, (24, 16))
    if mode.startswith("I"):  # real 16-bit data spans 0..65535
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257).convert(mode)
    else:
        image = image.convert(mode)
    converted = open_rgb_from(image)
    assert converted.mode == "RGB" and converted.size == (24, 16)
    assert converted.getpixel((0, 0))[0] > 200  # white stays (nearly) white


def test_sixteen_bit_grey_keeps_its_brightness():
    image = Image.new("I;16", (4, 4), 32768)
    assert abs(open_rgb_from(image).getpixel((0, 0))[0] - 128) <= 1


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
    assert open_rgb(tmp_path / "photos" / "phone.jpg").size == (32, 64)
    assert is_upright(cached(str(tmp_path / "photos"), tmp_path / "cache", size=64)[0])  # training
    model = VAE(64, 2, (8, 8, 8))
    # --image and --interpolate read through vae_api.to_input, --latent-map and --prior data through load_folder.
    x = vae_api.to_input(vae_api.Trained(model, None, None, ""), str(tmp_path / "photos" / "phone.jpg"))
    assert is_upright(x[0].add(1).mul(127.5).round().byte())
    assert is_upright(sample_vae.load_folder(str(tmp_path / "photos"), model, "--latent-map")[0])


# ------------------------------------------------------------------ square, augmented, placed


@pytest.mark.parametrize("size", [(16, 16), (4000, 3000), (30, 90)])
def test_to_square_keeps_the_shape_and_pads_white(size):
    square = to_square(Image.new("RGB", size, (0, 0, 0)), 32)
    assert square.size == (32, 32)
    if size[0] != size[1]:
        assert square.getpixel((0, 0)) == (255, 255, 255)  # padding, not stretching
    assert square.getpixel((16, 16)) == (0, 0, 0)


def wide_photo():
    """A 'photo' three times as wide as high: red, green (the centre) and blue thirds, no white."""
    photo = Image.new("RGB", (96, 32), (200, 30, 30))
    photo.paste((30, 200, 30), (32, 0, 64, 32))
    photo.paste((30, 30, 200), (64, 0, 96, 32))
    return photo


def test_crop_keeps_the_centre_of_a_wide_photo_and_pad_keeps_it_all_on_white():
    r, g, b = pil_to_tensor(to_square(wide_photo(), 16, "crop")).int()
    assert (g > 180).all() and (r < 60).all() and (b < 60).all()  # green from edge to edge, no red, blue, white
    pad = pil_to_tensor(to_square(wide_photo(), 24, "pad"))
    assert (pad[:, :8] == 255).all() and (pad[:, -8:] == 255).all()  # white above and below the strip
    assert pad[0, 12, 2] > 180 and pad[2, 12, 21] > 180  # red on the left, blue on the right


def test_augmentation_flips_rotates_and_keeps_uint8():
    torch.manual_seed(0)
    batch = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    batch[:, :, :, :8] = 0  # a black stripe on the left edge of every image
    left_dark, right_dark, rotated = 0, 0, 0
    for _ in range(40):
        out = make_augment(10.0)(batch)
        assert out.dtype == torch.uint8 and out.shape == batch.shape
        left_dark += int(out[0, :, 12:20, :4].float().mean() < 128)
        right_dark += int(out[0, :, 12:20, -4:].float().mean() < 128)
        # A rotation tilts the stripe's edge: its top and bottom rows then differ.
        rotated += int((out[0, 0, 2] < 128).sum() != (out[0, 0, -3] < 128).sum())
    assert left_dark > 5 and right_dark > 5 and left_dark + right_dark == 40
    assert rotated > 20


@pytest.mark.parametrize("fit, white_corners", [("crop", False), ("pad", True)])
def test_a_rotated_crop_shows_no_white_corner(fit, white_corners):
    """A cropped photo is mirrored out before it turns, so that no corner is filled; a padded
    picture on white turns on white."""
    torch.manual_seed(0)
    photo = torch.tensor([60, 90, 120], dtype=torch.uint8).view(1, 3, 1, 1).expand(4, 3, 32, 32).contiguous()
    photo[:, :, ::7] = 20  # stripes, so that the mirrored edge is not just a plain colour
    augment = make_augment(45.0, fit, 32)
    brightest = max(augment(photo).max().item() for _ in range(10))
    assert (brightest == 255) == white_corners, brightest


@pytest.mark.parametrize("free_gb, fits", [(0.4, True), (0.39, False)])
def test_the_training_images_go_to_the_gpu_where_they_fit_in_its_share_of_free_memory(monkeypatch, free_gb, fits):
    monkeypatch.setattr(image_data, "GPU_DATA_SHARE", 0.25)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gb * 1e9, 80e9))
    assert image_data.fits_on_gpu(100 * 1_000_000, torch.device("cuda")) == fits  # 100 images of 1 MB
    images, rows = torch.zeros(1000, 3, 4, 4, dtype=torch.uint8), torch.arange(1000)[:100]
    assert place_images(images, rows, torch.device("cpu"))[0] is images  # the CPU trains where they are


def test_the_images_are_gathered_in_chunks_in_the_order_of_their_index():
    """What place_images does on a GPU, here on the CPU: 300 images cross a chunk of 256."""
    images = torch.randint(0, 256, (400, 3, 4, 4), dtype=torch.uint8)
    index = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:300]
    moved, moved_index = image_data.gathered_on(images, index, torch.device("cpu"))
    assert torch.equal(moved, images[index]) and torch.equal(moved_index, torch.arange(300))


# ------------------------------------------------------------------ the images' identity, caches on shared disks
def copy_without_times(folder, to):
    """cp -r without -p: the same bytes, new modification times."""
    shutil.copytree(folder, to, copy_function=shutil.copyfile)
    return str(to)


def test_the_same_images_elsewhere_have_the_same_key_and_share_the_cache(tmp_path, decodes):
    folder = make_folder(tmp_path / "images", count=4)
    time.sleep(0.01)  # the copies' times differ from the originals'
    copy = copy_without_times(folder, tmp_path / "scratch" / "copy")
    assert os.path.getmtime(os.path.join(copy, "blob_00.png")) != os.path.getmtime(os.path.join(folder, "blob_00.png"))
    assert image_data.images_key(image_files(copy), copy) == image_data.images_key(image_files(folder), folder)
    first = cached(folder, tmp_path / "cache")
    assert torch.equal(cached(copy, tmp_path / "cache"), first) and len(decodes) == 4  # not decoded again


@pytest.mark.parametrize("change", ["edited", "renamed", "a byte in the middle of a large file"])
def test_other_images_have_another_key(tmp_path, change, monkeypatch):
    folder = make_folder(tmp_path / "images", count=3)
    key = image_data.images_key(image_files(folder), folder)
    if change == "edited":
        blob_image(99).save(os.path.join(folder, "blob_01.png"))
    elif change == "renamed":
        os.rename(os.path.join(folder, "blob_01.png"), os.path.join(folder, "blob_09.png"))
    else:  # the fingerprint reads the two ends only: a file read whole (small) has every byte counted
        monkeypatch.setattr(image_data, "FINGERPRINT_BYTES", 10**6)
        key = image_data.images_key(image_files(folder), folder)
        path = os.path.join(folder, "blob_01.png")
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 1
        open(path, "wb").write(bytes(data))
    assert image_data.images_key(image_files(folder), folder) != key


def test_a_new_decoder_version_decodes_the_images_again(tmp_path, decodes, monkeypatch):
    folder = make_folder(tmp_path / "images", count=3)
    cached(folder, tmp_path / "cache")
    monkeypatch.setattr(image_data, "DECODER_VERSION", image_data.DECODER_VERSION + 1)
    cached(folder, tmp_path / "cache")
    assert len(decodes) == 6 and len(os.listdir(tmp_path / "cache")) == 1  # the stale cache replaced


def test_caches_unused_for_weeks_are_removed_and_recent_ones_kept(tmp_path):
    cached(make_folder(tmp_path / "old", count=2), tmp_path / "cache")  # other images in each
    [old] = os.listdir(tmp_path / "cache")
    weeks_ago = time.time() - (image_data.CACHE_UNUSED_DAYS + 1) * 86400
    os.utime(tmp_path / "cache" / old, (weeks_ago, weeks_ago))
    cached(make_folder(tmp_path / "recent", count=3), tmp_path / "cache")
    [recent] = set(os.listdir(tmp_path / "cache")) - {old}
    cached(make_folder(tmp_path / "new", count=4), tmp_path / "cache")
    left = set(os.listdir(tmp_path / "cache"))
    assert old not in left and recent in left and len(left) == 2


def test_a_used_cache_is_kept_however_old_it_was(tmp_path):
    folder = make_folder(tmp_path / "images", count=2)
    cached(folder, tmp_path / "cache")
    [name] = os.listdir(tmp_path / "cache")
    weeks_ago = time.time() - (image_data.CACHE_UNUSED_DAYS + 1) * 86400
    os.utime(tmp_path / "cache" / name, (weeks_ago, weeks_ago))
    cached(folder, tmp_path / "cache")  # used again: its time is now
    cached(make_folder(tmp_path / "other", count=3), tmp_path / "cache")
    assert name in os.listdir(tmp_path / "cache")


BUILDER = """
import sys, time
import image_data
real = image_data.square_pixels
def slow(*args):  # 0.2 s an image: the runs decode at the same time, whenever each starts
    time.sleep(0.2)
    return real(*args)
image_data.square_pixels = slow
images = image_data.cached_images(image_data.image_files(sys.argv[1]), 32, "pad", sys.argv[1], sys.argv[2])
print("built", len(images))
"""


def test_runs_that_decode_the_same_folder_at_once_all_succeed(tmp_path):
    """Two processes (a sweep's, or two machines' sharing a home folder) decode into one cache
    folder at the same time: the first to finish removes no file of the other's."""
    folder = make_folder(tmp_path / "images", count=25)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", BUILDER, folder, str(tmp_path / "cache")]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache"):
        time.sleep(0.05)  # the first is decoding: 5 s, while the second starts and decodes too
    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for run in (first, second):
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0 and "built 25" in out, err[-2000:]
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_the_cache_skips_what_sample_vae_refuses(tmp_path, monkeypatch, capsys):
    """Both catch image_data.UNREADABLE: an error of any type that PIL raises for an odd file."""
    folder = make_folder(tmp_path / "images", count=3)
    odd = os.path.join(folder, "blob_01.png")
    real = image_data.open_rgb

    def open_rgb(file):
        if file == odd:
            raise ZeroDivisionError("a header that divides by zero")
        return real(file)
    monkeypatch.setattr(image_data, "open_rgb", open_rgb)
    monkeypatch.setattr(sample_vae, "open_rgb", open_rgb)
    assert len(cached(folder, tmp_path / "cache")) == 2
    with pytest.raises(image_data.UserError, match="is not a readable image \\(ZeroDivisionError\\)"):
        sample_vae.open_picture(odd)


# ------------------------------------------------------------------ whatever a folder holds
def test_every_file_under_a_messy_folder_is_used_or_passed_by_and_counted(tmp_path, monkeypatch, capsys):
    """Hidden files and folders alike are passed by; a linked folder is followed, each real folder
    once; a link to nothing, a loop of links and a folder that cannot be read are passed by;
    every one of them is counted in one line, and the images left are cached."""
    folder = tmp_path / "images"
    make_folder(folder / "a", count=3)
    make_folder(tmp_path / "elsewhere", count=2)
    make_folder(folder / ".thumbs", count=2)  # a hidden folder
    (folder / ".hidden.png").write_bytes((folder / "a" / "blob_00.png").read_bytes())  # a hidden file
    os.symlink(tmp_path / "elsewhere", folder / "linked")  # a linked folder: followed
    os.symlink(folder, folder / "a" / "up")  # a link back up: a loop of folders
    os.symlink(tmp_path / "nowhere.png", folder / "dangling.png")  # a link to nothing
    os.symlink(folder / "loop2.png", folder / "loop1.png")  # a loop of links
    os.symlink(folder / "loop1.png", folder / "loop2.png")
    make_folder(folder / "locked", count=2)
    real_scandir = os.scandir

    def scandir(path="."):  # tests run as root, whom chmod does not stop: the walk is refused here
        if os.fspath(path) == str(folder / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    files = image_files(str(folder))
    assert [os.path.relpath(file, folder) for file in files] == [
        "a/blob_00.png", "a/blob_01.png", "a/blob_02.png", "linked/blob_00.png", "linked/blob_01.png"]
    said = capsys.readouterr().out
    assert said == (f"passed by under {folder}: 1 unreadable folder, 3 broken links, 1 repeated linked folder, "
                    "2 hidden (a name that starts with .)\n")
    assert len(cached(str(folder), tmp_path / "cache")) == 5
