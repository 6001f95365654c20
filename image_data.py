"""The images, from files to the tensors the VAE sees, prepared the same way for training and
sampling: finding them (a folder, or the Hub), opening one (RGB on white, upright), making it
square, the decode-once cache, the split, augmented batches on the device; a grid as a PNG."""
import glob
import hashlib
import io
import math
import os
import shutil
import socket
import time
import urllib.parse

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from cli import UserError, counted
from vae_model import atomic_write

DEFAULT_CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "vae_pokemon")
GPU_DATA_SHARE = 0.25  # the most of a GPU's free memory that the training images may take there
WHITE = (255, 255, 255)
DECODER_VERSION = 2  # raise it when open_rgb or to_square change: caches made before are not used
FINGERPRINT_BYTES = 16384  # read from each end of a file to know it: its whole if smaller
CACHE_UNUSED_DAYS = 30  # a cache not used for this long is removed when another is made
# PIL raises many types for broken or foreign files; whatever it is, that one file is skipped.
UNREADABLE = Exception
# Larger images are skipped, and named: one of 100 megapixels takes 300 MB and seconds to decode.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None  # Pillow's own guard (a raw warning, then an error): MAX_PIXELS's


class TooLarge(ValueError):
    """An image over MAX_PIXELS."""


# --- Finding the images -----------------------------------------------------------------------
def image_files(source, flag="--data"):
    """Every file under a local folder (whatever the names), or a Hub data set's images."""
    if os.path.isdir(source):
        files, passed_by = walk(source)
        if passed_by:
            print(f"passed by under {source}: {', '.join(passed_by)}")
        if not files:
            raise UserError(f"the folder {source} holds no image files; put .png or .jpg images "
                            f"in it or pass another {flag}")
        return sorted(files)
    looks_like_a_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if os.path.exists(source) or looks_like_a_path:
        what = "is a file" if os.path.exists(source) else "does not exist"
        raise UserError(f"the data folder {source} {what}; pass --data with an existing folder "
                        "of images or a Hub data set name")
    return hub_images(source)


def walk(folder):
    """(the files under folder, what was passed by and why). One rule for the hidden: a file or
    folder whose name starts with "." is passed by. Linked folders are followed, each real
    folder once (a link back up would loop); a link to nothing, or a folder that cannot be
    read, is passed by. All that is passed by is counted, never silent."""
    files, seen = [], set()
    passed = {"unreadable folder": 0, "broken link": 0, "repeated linked folder": 0}
    hidden = 0
    def unreadable(error):
        passed["unreadable folder"] += 1
    for root, dirs, names in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # reached again through a link
            passed["repeated linked folder"] += 1
            dirs[:] = []
            continue
        seen.add(real)
        hidden += sum(name.startswith(".") for name in dirs + names)
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))  # in a fixed order
        for name in names:
            path = os.path.join(root, name)
            if name.startswith("."):
                continue
            if os.path.exists(path):  # False for a link to nothing, or a loop of links
                files.append(path)
            else:
                passed["broken link"] += 1
    said = [counted(n, what) for what, n in passed.items() if n]
    return files, said + ([f"{hidden} hidden (a name that starts with .)"] if hidden else [])


def hub_images(name):
    """The Hub data set's images, undecoded: a corrupt one is skipped by the cache, not fatal."""
    import datasets  # here only: loading it takes seconds, and a folder needs none of it
    from huggingface_hub import constants  # HF_HUB_OFFLINE: datasets has it from 2.20 only
    # One quick connect first: offline, huggingface_hub retries for half a minute, and no setting
    # stops it. Behind a proxy a direct connect proves nothing; offline mode reads the local cache.
    url = urllib.parse.urlparse(datasets.config.HF_ENDPOINT)
    proxied = any(os.environ.get(proxy) for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
    try:
        if not (constants.HF_HUB_OFFLINE or proxied):
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), 5).close()
    except OSError:
        raise UserError(f"{name} is no folder here, and the Hugging Face Hub, where it would "
                        "be a data set, cannot be reached; check the path given to --data, or "
                        "connect to the internet for the Hub") from None
    try:
        table = datasets.load_dataset(name, split="train")
    except Exception as error:  # datasets raises many types for a wrong name or a failed download
        raise UserError(f"could not load the Hub data set {name} ({type(error).__name__}); "
                        "check the name or train offline with --data path/to/images") from error
    columns = [key for key, kind in table.features.items() if isinstance(kind, datasets.Image)]
    if not columns:
        raise UserError(f"the data set {name} has no image column; pass --data with a folder")
    items = table.cast_column(columns[0], datasets.Image(decode=False))[columns[0]]
    return [item["bytes"] or item["path"] for item in items]


# --- Opening one image and making it square ---------------------------------------------------
def open_rgb(file):
    """An image file (path or file object) of any mode as RGB on a white background, upright."""
    image = Image.open(file)
    if image.width * image.height > MAX_PIXELS:  # known from the header, before decoding
        raise TooLarge(f"{image.width} x {image.height} px, over the limit of "
                       f"{MAX_PIXELS / 1e6:.0f} megapixels")
    image.load()  # decode now, so that a truncated file fails here and not later
    return to_rgb(image)


def to_rgb(image):
    """A PIL image of any mode as RGB on a white background, upright."""
    image = ImageOps.exif_transpose(image)  # a photo stored sideways, turned as viewers show it
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: scale to 8 bits
        scale = 255 / 65535 if image.mode.startswith("I") else 255
        image = image.point(lambda v: v * scale).convert("L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa", "P") or "transparency" in image.info:
        # Composited on white: dropping the alpha channel would turn transparent pixels black.
        white = Image.new("RGBA", image.size, WHITE + (255,))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def to_square(image, size, fit="pad"):
    """size x size, undistorted: padded with white (artwork), or cropped to the centre (photos)."""
    if fit == "crop":
        return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=WHITE)


def square_pixels(file, size, fit):
    """One image (a file's path, a file object, a PIL image) as a uint8 tensor (3, size, size):
    what training and sampling both see."""
    from torchvision.transforms.v2.functional import pil_to_tensor  # torchvision: where used
    image = to_rgb(file) if isinstance(file, Image.Image) else open_rgb(file)
    return pil_to_tensor(to_square(image, size, fit))


def to_model_range(batch_uint8):
    return batch_uint8.float().div(127.5).sub(1.0)  # [0, 255] -> [-1, 1], as tanh outputs


def to_uint8(batch):
    """[-1, 1] -> [0, 255], rounded as torchvision's save_image rounds: what a PNG holds."""
    return batch.float().add(1).div(2).clamp(0, 1).mul(255).add(0.5).to(torch.uint8)


# --- The images' identity: their names and bytes, wherever the folder lies ---------------------
def images_key(files, source):
    """A key of the images: each file's name under the folder `source`, its size and a hash of
    its first and last FINGERPRINT_BYTES (a Hub image's: all its bytes), and DECODER_VERSION.
    Moved or copied (cp -r, a cluster's scratch disk) they keep it; an edited image changes it
    (a PNG's last bytes hold the checksum of all its pixels)."""
    key = hashlib.sha256(f"decoder {DECODER_VERSION}\n".encode())
    root = source if os.path.isdir(source) else None
    for file in files:
        key.update(hashlib.sha256(file).digest() if isinstance(file, bytes) else
                   fingerprint(file, root))
    return key.hexdigest()[:16]


def fingerprint(file, root):
    """The name (relative to root), size, and a hash of the two ends of one file, as bytes."""
    name = os.path.relpath(file, root) if root else os.path.basename(file)
    digest = hashlib.sha256(name.replace(os.sep, "/").encode() + b"\0")
    try:
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(FINGERPRINT_BYTES)
            handle.seek(max(len(head), size - FINGERPRINT_BYTES))
            digest.update(f"{size}\0".encode() + head + handle.read())
    except OSError:  # unreadable, a broken link: the cache skips it, and its name still counts
        digest.update(b"unreadable")
    return digest.digest()


# --- The cache: every image decoded once into a file on disk ----------------------------------
def cached_images(files, size, fit, source, cache_dir, path=None):
    """All images as uint8 (N, 3, size, size), decoded once into `path`, and memory-mapped."""
    path = path or cache_path(images_key(files, source), size, fit, source, cache_dir)
    path = same_images_elsewhere(path)
    try:  # copy-on-write: writable as torch wants, never written
        images = np.load(path, mmap_mode="c")
    except (OSError, ValueError, EOFError):  # none yet, or cut short (numpy checks the size)
        print(f"decoding {counted(len(files), 'file')} once, at {size} px ({fit}), into {path}")
        images = build_cache(files, size, fit, path)
    used(path)
    print(f"{counted(len(images), 'image')} at {size} px ({fit}) cached in {path}"
          + skipped_files(files, len(images)))
    if len(images) < 2:
        remove(path)  # no cache is left of a folder that cannot be trained on
        raise UserError(f"{source} holds {len(images)} readable image(s) and at least 2 are "
                        "needed; add images or pass another folder")
    return torch.from_numpy(images)


def skipped_files(files, kept):
    """The end of the cache's line: how many files were skipped, the too large named. Found
    again from the headers on each run, as the cache keeps the images only, not who is missing."""
    if kept == len(files):
        return ""
    too_large = []
    for file in files:
        try:
            with Image.open(as_file(file)) as image:  # the header only: nothing decoded
                width, height = image.size
        except UNREADABLE:
            continue
        if width * height > MAX_PIXELS:
            name = "an image of the Hub" if isinstance(file, bytes) else file
            too_large.append(f"{name} ({width} x {height} px)")
    unreadable = len(files) - kept - len(too_large)
    reasons = [counted(unreadable, "file") + " not readable as an image"] if unreadable else []
    if too_large:
        reasons.append(f"{len(too_large)} over the limit of {MAX_PIXELS / 1e6:.0f} megapixels: "
                       + ", ".join(too_large))
    return f"; skipped {len(files) - kept} file(s): " + "; ".join(reasons)


def as_file(file):
    """A path, or a Hub image's bytes as a file object: what PIL opens."""
    return io.BytesIO(file) if isinstance(file, bytes) else file


def cache_path(key, size, fit, source, cache_dir):
    """{where the images are}-{size}px-{fit}-{their key}.npy in the cache folder."""
    where = os.path.abspath(source) if os.path.isdir(source) else source
    name = hashlib.sha256(where.encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(cache_dir), f"{name}-{size}px-{fit}-{key}.npy")


def same_images_elsewhere(path):
    """path, or the cache of the same images made from another folder (a copy of it)."""
    if os.path.exists(path):
        return path
    same = os.path.basename(path).split("-", 1)[1]  # all but where they were
    made = glob.glob(os.path.join(glob.escape(os.path.dirname(path)), "*-" + same))
    return made[0] if made else path


def build_cache(files, size, fit, path):
    """Decode every readable image into `path`, written whole or not at all (atomic_write)."""
    folder, shape = os.path.dirname(path), (3, size, size)
    def write(tmp):
        out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(files),) + shape)
        count = 0
        for file in tqdm(files, desc=f"caching images at {size} px", leave=False):
            try:
                out[count] = square_pixels(as_file(file), size, fit).numpy()
            except UNREADABLE:  # TooLarge too: skipped_files names those
                continue
            count += 1
        if count < len(files):  # the readable images only, in a file their size
            part = np.lib.format.open_memmap(tmp + ".part", "w+", np.uint8, (count,) + shape)
            part[:] = out[:count]
            del out, part  # closes the memory maps, so that the file can be replaced
            os.replace(tmp + ".part", tmp)

    # The room is checked first: a memory map that runs out of disk crashes, it cannot say so.
    need = len(files) * math.prod(shape)
    try:
        os.makedirs(folder, exist_ok=True)
        if shutil.disk_usage(folder).free < need + 2**26:
            raise UserError(f"caching {counted(len(files), 'image')} at {size} px needs "
                            f"{need / 1e9:.2f} GB free in {folder}; make room there or pass "
                            "--cache-dir with a folder on another disk")
        atomic_write(path, write)
    except OSError as error:
        raise UserError(f"cannot write the image cache in {folder} ({error.strerror or error}); "
                        "pass --cache-dir with a folder you can write to") from error
    remove_old_caches(path)
    return np.load(path, mmap_mode="c")


def remove_old_caches(path):
    """The rule that keeps the cache folder from growing without bound: a folder's earlier cache
    at this size goes when its images changed, and any cache unused for CACHE_UNUSED_DAYS goes.
    Only finished caches (*.npy) are looked at: another run's file being written is never."""
    earlier = os.path.basename(path).rsplit("-", 1)[0] + "-"
    too_old = time.time() - CACHE_UNUSED_DAYS * 86400
    for cache in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), "*.npy")):
        if cache == path:
            continue
        try:
            if os.path.basename(cache).startswith(earlier) or os.path.getmtime(cache) < too_old:
                os.remove(cache)
        except OSError:  # removed by another run meanwhile, or not ours to remove
            pass


def used(path):
    """Mark the cache as used now (its time), so that the rule above keeps it."""
    try:
        os.utime(path)
    except OSError:  # a cache folder that is read-only is read, never cleaned
        pass


def remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def split(count, fraction, seed):
    """A fixed, seeded train/validation split, as indices: the images themselves stay on disk."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_val = min(count - 1, max(1, round(count * fraction)))
    return order[n_val:], order[:n_val]


# --- Batches on the training device -----------------------------------------------------------
def place_images(images, index, device):
    """(images, index) for training: on a GPU if they fit in GPU_DATA_SHARE of it, else as is."""
    if device.type != "cuda":
        return images, index
    size = len(index) * images[0].numel()  # bytes: uint8
    if not fits_on_gpu(size, device):
        print(f"training images ({size / 1e6:.0f} MB) in host memory, a pinned batch at a time")
        return images, index
    print(f"training images ({size / 1e6:.0f} MB) on the GPU")
    return gathered_on(images, index, device)


def fits_on_gpu(size, device):
    """Whether `size` bytes take at most GPU_DATA_SHARE of the GPU's free memory."""
    return size <= GPU_DATA_SHARE * torch.cuda.mem_get_info(device)[0]


def gathered_on(images, index, device):
    """(images[index] on `device`, their index there), copied a chunk at a time through host
    memory, so that the copy never holds them all twice."""
    moved = torch.cat([images[chunk].to(device) for chunk in index.split(256)])
    return moved, torch.arange(len(index), device=device)


def fetch(images, pick, device):
    """A batch on the device; for a GPU via pinned memory: the copy overlaps the last step."""
    if images.device.type == "cpu" and device.type == "cuda":
        pinned = torch.empty((len(pick),) + images.shape[1:], dtype=images.dtype, pin_memory=True)
        return torch.index_select(images, 0, pick, out=pinned).to(device, non_blocking=True)
    return images[pick].to(device)


# --- Augmentation: on uint8 batches already on the training device ----------------------------
def make_augment(rotation, fit="pad", size=None):
    """Flip, rotation and light colour jitter (no hue shift: a blue Pikachu is no Pikachu). One
    flip and angle per batch, cheaper than per image; batches are reshuffled every epoch, so an
    image still meets new ones. A cropped photo's edges are mirrored out: no turned corner shows."""
    from torchvision.transforms import v2  # here, not at the top: --help answers without it
    rotate = v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=255)
    if fit == "crop":
        turn = math.radians(min(rotation, 45.0))
        margin = math.ceil(size * (math.cos(turn) + math.sin(turn) - 1) / 2) + 1
        rotate = v2.Compose([v2.Pad(margin, padding_mode="reflect"), rotate, v2.CenterCrop(size)])
    jitter = v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1)
    return v2.Compose([v2.RandomHorizontalFlip(), rotate, jitter])


# --- Out: a grid of images as a PNG -----------------------------------------------------------
PICTURE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}  # by the name's suffix


def picture_format(path):
    """The format a picture's name asks for: PNG, or JPEG for .jpg and .jpeg."""
    return PICTURE_FORMATS.get(os.path.splitext(path)[1].lower(), "png")


def save_png(images, path, nrow=8):
    """A grid of images, in [-1, 1] or uint8, as a PNG (a JPEG if the name says so), written
    whole or not at all."""
    from torchvision.transforms.v2.functional import to_pil_image
    from torchvision.utils import make_grid
    pixels = images if images.dtype == torch.uint8 else to_uint8(images)
    grid = to_pil_image(make_grid(pixels.cpu(), nrow=nrow, padding=2, pad_value=255))
    atomic_write(path, lambda tmp: grid.save(tmp, format=picture_format(path)))
