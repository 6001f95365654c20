"""
Train the VAE of vae_model.py on Pokémon images, then a learned prior over its latent space.

    python train_vae.py                          # the Hugging Face Hub data set
    python train_vae.py --data path/to/folder    # any folder of images, offline

Read top to bottom: settings, loading, augmentation, one epoch, evaluation and pictures, stage
two (the prior of latent_prior.py), train() which joins them; then the plumbing (device, resume,
paths) and the command line, which a first reading can skip.
"""
import argparse
import glob
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.parse

import datasets
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import save_image
from tqdm import tqdm

from latent_prior import fit_prior, sample_prior
from vae_model import (VAE, CheckpointError, atomic_write, load_checkpoint, psnr, save_checkpoint, vae_checkpoint,
                       vae_loss)

# -----------------------------------------------------------------------------------------------
DATASET = "svjack/pokemon-blip-captions-en-zh"  # Hub data set name, or a local folder of images
IMAGE_SIZE = 512          # px, side of the square training image (with a CUDA GPU)
FIT = "pad"               # how images become square: "pad" with white (artwork on white) or "crop" the centre (photos)
EPOCHS = 200              # passes over the training images (with a CUDA GPU)
CPU_IMAGE_SIZE = 128      # px, used instead of IMAGE_SIZE without a CUDA GPU (CPU, Apple GPU)
CPU_EPOCHS = 80           # used instead of EPOCHS without a CUDA GPU
BATCH_SIZE = 8            # images per optimizer step (with a CUDA GPU)
CPU_BATCH_SIZE = 2        # used instead of BATCH_SIZE without a CUDA GPU: more, smaller steps
LEARNING_RATE = 2e-3      # peak learning rate of the one-cycle schedule
WARMUP = 0.3              # share of the steps in which the learning rate climbs to its peak
KL_WEIGHT = 0.02          # weight of the KL term against the summed reconstruction error
LATENT_CHANNELS = 6       # channels of the latent (H/8 x W/8): more reconstruct sharper, fewer are easier to sample
CHANNELS = [32, 64, 128]  # widths at 1/2, 1/4 and 1/8 of the image size (the decoder mirrors them)
VAL_FRACTION = 0.05       # share of images held out, never augmented, for validation
SAVE_EVERY = 10           # epochs between reconstruction / sample grids
SEED = 0                  # seeds the split, the shuffling, the augmentation and the weights
ROTATION = 10.0           # degrees, largest random rotation of a training image
AMP = "auto"              # bfloat16 autocast: "auto" (on where bf16 is fast), "on" or "off"
COMPILE = False           # torch.compile the model (faster steps after a minute of compiling)
PRIOR_STEPS = 4000        # optimizer steps of the learned prior (stage two); 0 skips it
PRIOR_BATCH_SIZE = 32     # latents per step of the prior
PRIOR_LR = 1e-3           # learning rate of the prior, decayed to 0 along a cosine
PRIOR_WIDTH = 64          # channels of the prior's U-Net at the latent's resolution
PRIOR_GUIDE_STEPS = 1000  # optimizer steps of the prior's smaller guide (autoguidance); 0 skips it
PRIOR_GUIDE_WIDTH = 32    # channels of the guide's U-Net
MODEL_PATH = "vae_model.pth"   # where the final model (config + weights) is written
RESULTS_DIR = "vae_results"    # grids, metrics.jsonl, loss curve, resumable checkpoint
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "vae_pokemon")  # decoded images; delete to free
# -----------------------------------------------------------------------------------------------
GRID_IMAGES = 8           # validation images shown in each reconstruction grid
GPU_DATA_SHARE = 0.25     # the training images live on a GPU if they take at most this share of its free memory
WHITE = (255, 255, 255)


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one sentence and exits with status 2."""


# --- Loading: every image decoded once (RGB on white, square, resized) into a cache on disk --

def image_files(source, flag="--data"):
    """Every file under a local folder (no split inferred from names), or a Hub data set's images."""
    if os.path.isdir(source):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(source) for name in names
                       if not name.startswith("."))
        if not files:
            raise UserError(f"the folder {source} holds no image files; put .png or .jpg images in it "
                            f"or pass another {flag}")
        return files
    if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"the data folder {source} {'is a file' if os.path.exists(source) else 'does not exist'}; "
                        "pass --data with an existing folder of images or a Hub data set name")
    if not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face Hub to download {source}; "
                        "connect to the internet or train offline with --data path/to/images")
    try:
        table = datasets.load_dataset(source, split="train")
    except Exception as error:  # datasets raises many types for a wrong name or a failed download
        raise UserError(f"could not load the Hub data set {source} ({type(error).__name__}); "
                        "check the name or train offline with --data path/to/images") from error
    column = next((key for key, kind in table.features.items() if isinstance(kind, datasets.Image)), None)
    if column is None:
        raise UserError(f"the data set {source} has no image column; pass --data with a folder of images")
    # Undecoded bytes, so that one corrupt image is skipped in build_cache instead of ending the run.
    return [item["bytes"] or item["path"] for item in table.cast_column(column, datasets.Image(decode=False))[column]]


def open_rgb(file):
    """An image file (path or file object) of any mode as RGB on a white background, upright."""
    image = Image.open(file)
    image.load()  # decode now, so that a truncated file fails here and not later
    image = ImageOps.exif_transpose(image)  # a phone photo stored sideways, turned as viewers show it
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: scale to 8 bits
        image = image.point(lambda v: v * (255 / 65535 if image.mode.startswith("I") else 255)).convert("L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa", "P") or "transparency" in image.info:
        # Composited on white: dropping the alpha channel would turn transparent pixels black.
        image = Image.alpha_composite(Image.new("RGBA", image.size, WHITE + (255,)), image.convert("RGBA"))
    return image.convert("RGB")


def to_square(image, size, fit=FIT):
    """Resize to size x size without distorting the shape: fit, then pad with white (artwork on
    white), or fill the square and cut off what sticks out of its centre (photos)."""
    if fit == "crop":
        return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=WHITE)


def cached_images(files, size, fit, source, cache_dir):
    """All images as one uint8 tensor (N, 3, size, size), decoded once into a file on disk and
    memory-mapped from then on: the page cache holds the pixels, not this process, so memory does
    not grow with the data set. The file is keyed by every file's path, size and modification
    time (a Hub image's bytes), the size and the fit: a changed folder gets a new one."""
    key = hashlib.sha256()
    for file in files:
        stat = None if isinstance(file, bytes) else os.stat(file)
        key.update(file if stat is None else f"{os.path.abspath(file)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    name = hashlib.sha256((os.path.abspath(source) if os.path.isdir(source) else source).encode()).hexdigest()[:12]
    path = os.path.join(os.path.expanduser(cache_dir), f"{name}-{size}px-{fit}-{key.hexdigest()[:16]}.npy")
    try:  # copy-on-write: writable as torch wants, never written
        images = np.load(path, mmap_mode="c")
    except (OSError, ValueError, EOFError):  # none yet, or cut short (numpy checks the size): build it
        print(f"decoding {len(files)} files once, at {size} px ({fit}), into the cache {path}")
        images = build_cache(files, size, fit, path)
    skipped = len(files) - len(images)
    print(f"{len(images)} images at {size} px ({fit}) cached in {path}"
          + (f"; skipped {skipped} file(s) that are not readable images" if skipped else ""))
    if len(images) < 2:
        raise UserError(f"{source} holds {len(images)} readable image(s) and at least 2 are needed; "
                        "add images or pass another folder")
    return torch.from_numpy(images)


def build_cache(files, size, fit, path):
    """Decode every image (skipping unreadable files) into a temporary file renamed to `path`
    once whole: Ctrl-C, a kill or a full disk leaves no cache that could be read half-written."""
    folder, shape = os.path.dirname(path), (3, size, size)

    def write(tmp):
        out, count = np.lib.format.open_memmap(tmp, "w+", np.uint8, (len(files),) + shape), 0
        for file in tqdm(files, desc=f"caching images at {size} px", leave=False):
            try:
                image = open_rgb(io.BytesIO(file) if isinstance(file, bytes) else file)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue
            out[count], count = pil_to_tensor(to_square(image, size, fit)).numpy(), count + 1
        if count < len(files):  # the readable images only, in a file their size
            np.lib.format.open_memmap(tmp + ".part", "w+", np.uint8, (count,) + shape)[:] = out[:count]
            del out  # closes the memory map, so that its file can be replaced
            os.replace(tmp + ".part", tmp)

    try:  # the room is checked first: a memory map that runs out of disk crashes, it cannot say so
        os.makedirs(folder, exist_ok=True)
        if shutil.disk_usage(folder).free < (need := len(files) * math.prod(shape)) + 2**26:
            raise UserError(f"caching {len(files)} images at {size} px needs {need / 1e9:.2f} GB free in {folder}; "
                            "make room there or pass --cache-dir with a folder on another disk")
        atomic_write(path, write)
    except OSError as error:
        raise UserError(f"cannot write the image cache in {folder} ({error.strerror or error}); "
                        "pass --cache-dir with a folder you can write to") from error
    for old in set(glob.glob(glob.escape(path.rsplit("-", 1)[0]) + "-*")) - {path}:  # before the folder changed
        os.remove(old)
    return np.load(path, mmap_mode="c")


def split(count, fraction, seed):
    """A fixed, seeded train/validation split, as indices: the images themselves stay on disk."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_val = min(count - 1, max(1, round(count * fraction)))
    return order[n_val:], order[:n_val]


# --- Augmentation: on uint8 batches already in memory, on the training device --------------

def make_augment(rotation=ROTATION, fit=FIT, size=None):
    """Flip, rotation and light colour jitter (no hue shift: a blue Pikachu is no Pikachu). A v2
    transform on a batch draws one flip and angle for all of it, cheaper than one per image;
    batches are reshuffled every epoch, so an image still meets a new one each time. A cropped
    photo is not on white: its edges are mirrored out so that no turned corner shows."""
    rotate = v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=255)
    if fit == "crop":
        turn = math.radians(min(rotation, 45.0))
        margin = math.ceil(size * (math.cos(turn) + math.sin(turn) - 1) / 2) + 1
        rotate = v2.Compose([v2.Pad(margin, padding_mode="reflect"), rotate, v2.CenterCrop(size)])
    return v2.Compose([v2.RandomHorizontalFlip(), rotate, v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1)])


def to_model_range(batch_uint8):
    return batch_uint8.float().div(127.5).sub(1.0)  # [0, 255] -> [-1, 1], as tanh outputs


# --- One epoch of training ----------------------------------------------------------------------

def place_images(images, index, device):
    """Where the training images images[index] live, and their indices there: on a GPU, where
    they take at most GPU_DATA_SHARE of its free memory (833 images at 512 px: 655 MB as uint8),
    so that a batch is an index into them and nothing is copied per step; else in the cache."""
    if device.type == "cuda" and len(index) * images[0].numel() <= GPU_DATA_SHARE * torch.cuda.mem_get_info(device)[0]:
        on_gpu = torch.cat([images[chunk].to(device) for chunk in index.split(256)])  # a chunk at a time through RAM
        return on_gpu, torch.arange(len(index), device=device)
    return images, index


def fetch(images, pick, device):
    """One batch of uint8 images on the device. For a GPU it is gathered straight into pinned
    memory (PyTorch caches those buffers): its copy runs while the GPU works on the last step."""
    if images.device.type == "cpu" and device.type == "cuda":
        pinned = torch.empty((len(pick),) + images.shape[1:], dtype=images.dtype, pin_memory=True)
        return torch.index_select(images, 0, pick, out=pinned).to(device, non_blocking=True)
    return images[pick].to(device)


def train_one_epoch(model, images, index, augment, optimizer, scheduler, shuffle, args, device, epoch):
    """One pass over images[index], shuffled; the mean MSE and KL per image, summed on the device
    and read once, so that the loop never waits for the GPU (no .item(), no test of a tensor)."""
    batches = index[torch.randperm(len(index), generator=shuffle).to(index.device)].split(args.batch_size)
    sums = torch.zeros(2, device=device)
    for pick in tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", leave=False):
        x = to_model_range(augment(fetch(images, pick, device))).contiguous(memory_format=torch.channels_last)
        # bfloat16 keeps float32's range, so unlike float16 it needs no loss scaling.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.use_amp):
            recon, mu, log_var = model(x)
        loss, mse, kl = vae_loss(recon.float(), x, mu.float(), log_var.float(), args.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        sums += torch.stack([mse.detach(), kl.detach()])
    return (sums / len(batches)).tolist()


# --- Evaluation and pictures ----------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, images, device, kl_weight, batch_size=32):
    """Validation loss, MSE, KL and PSNR per image, decoding mu: the deterministic reconstruction."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in images.split(batch_size):
        x = to_model_range(batch.to(device)).contiguous(memory_format=torch.channels_last)
        mu, log_var = model.encode(x)
        recon = model.decode(mu)
        loss, mse, kl = vae_loss(recon, x, mu, log_var, kl_weight)
        totals += torch.tensor([loss.item(), mse.item(), kl.item(), psnr(recon, x)], dtype=torch.float64) * len(x)
    model.train()
    return dict(zip(("val_loss", "val_mse", "val_kl", "val_psnr"), (totals / len(images)).tolist()))


def save_png(images, path, nrow=8):
    """A grid of images in [-1, 1] as a PNG, written whole or not at all."""
    atomic_write(path, lambda tmp: save_image(images.float(), tmp, format="png", nrow=nrow, normalize=True,
                                              value_range=(-1, 1), padding=2, pad_value=1))


@torch.no_grad()
def save_pictures(model, grid_images, noise, epoch, results_dir):
    # Originals on the top row, their reconstructions underneath; then samples of the same
    # fixed noise every time, so that successive grids show how the decoder develops.
    model.eval()
    x = to_model_range(grid_images).contiguous(memory_format=torch.channels_last)
    save_png(torch.cat([x, model.decode(model.encode(x)[0])]), f"{results_dir}/recon_epoch_{epoch:03d}.png", len(x))
    save_png(model.decode(noise), f"{results_dir}/samples_epoch_{epoch:03d}.png")
    model.train()


def write_metrics(metrics, results_dir):
    def write(tmp):
        with open(tmp, "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in metrics)
    atomic_write(os.path.join(results_dir, "metrics.jsonl"), write)


def plot_loss_curve(metrics, results_dir):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in metrics]
    for key, label in (("train_mse", "train reconstruction (summed MSE)"),
                       ("val_loss", "val loss (MSE + weight x KL)"), ("train_kl", "train KL (nats)")):
        left.plot(epochs, [row[key] for row in metrics], label=label)
    left.set(xlabel="epoch", ylabel="per image", yscale="log", title="Loss")
    left.legend()
    right.plot(epochs, [row["val_psnr"] for row in metrics])
    right.set(xlabel="epoch", ylabel="dB", title="Validation PSNR (decoding mu)")
    fig.tight_layout()
    atomic_write(os.path.join(results_dir, "loss_curve.png"), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# --- Stage two: a learned prior over the trained VAE's latent space ---------------------------

def train_prior(model, images, index, args, device, stop):
    """Fit the prior to the latent means of the training images and of their mirror images (a
    Pokémon facing the other way is still a Pokémon). Not to the training augmentation: the prior
    draws whatever its codes show, and a rotated copy shows a tilted frame, a darker one a grey
    background. Means, not samples z ~ q(z|x): the posterior's noise is about as large as the
    means' spread, and the decoder ignores it. Then the guide, smaller and shorter, on the same
    codes (it trains after the prior, which thus trains as it would alone). Returns (prior, guide
    or None), or None after Ctrl-C."""
    model.eval()
    with torch.no_grad():
        batches = (images[pick].to(device) for pick in index.split(32))
        mus = torch.cat([model.encode(to_model_range(x).contiguous(memory_format=torch.channels_last))[0]
                         for batch in batches for x in (batch, batch.flip(-1))]).float()
    generator, fits = torch.Generator().manual_seed(args.seed), []
    for width, steps, what in ((args.prior_width, args.prior_steps, "learned prior"),
                               (args.prior_guide_width, args.prior_guide_steps, "its guide")):
        try:
            fits.append(fit_prior(mus, width, steps, args.prior_batch_size, args.prior_lr, generator, args.use_amp,
                                  stop, f"stage two: {what}") if steps else None)
        except FloatingPointError as error:
            raise UserError(f"{error}; lower --prior-lr (now {args.prior_lr})") from None
        if stop:
            return None
    return tuple(fits)


# --- The run: the pieces above, in the order the data meets them ------------------------

def train(args):
    """Train the VAE, then its prior; returns the exit status (130 after Ctrl-C)."""
    device = pick_device(args.device)
    checkpoint_path = os.path.join(args.results_dir, "checkpoint.pth")
    args, resumed = settings(args, device, checkpoint_path)
    check_writable(args.out, "--out")
    check_writable(checkpoint_path, "--results-dir")
    images = cached_images(image_files(args.data), args.image_size, args.fit, args.data, args.cache_dir)
    os.makedirs(args.results_dir, exist_ok=True)  # only now, so that a bad input changes no file
    torch.manual_seed(args.seed)
    train_rows, val_rows = split(len(images), args.val_fraction, args.seed)
    print(f"{len(train_rows)} training and {len(val_rows)} validation images from {args.data}")
    augment, val_images = make_augment(args.rotation, args.fit, args.image_size), images[val_rows].to(device)
    images, train_rows = place_images(images, train_rows, device)
    if device.type == "cuda":
        print(f"training images ({len(train_rows) * images[0].numel() / 1e6:.0f} MB) " + (
            "on the GPU" if images.is_cuda else "in host memory, a pinned batch at a time"))
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls autocast leaves

    # channels_last (NHWC) is the layout the oneDNN and cuDNN convolution kernels prefer.
    model = VAE(args.image_size, args.latent_channels, args.channels, args.fit)
    model = model.to(device, memory_format=torch.channels_last)
    side = args.image_size // 8
    noise = torch.randn(16, args.latent_channels, side, side, generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * math.ceil(len(train_rows) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, steps, pct_start=args.warmup)
    shuffle = torch.Generator().manual_seed(args.seed)
    saved_epoch, metrics = 0, []
    if resumed:  # everything that changes during training, so that the run goes on exactly
        for part, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler")):
            part.load_state_dict(resumed[key])
        shuffle.set_state(resumed["shuffle_state"])
        torch.set_rng_state(resumed["rng_state"])
        saved_epoch, metrics = resumed["epoch"], resumed["metrics"]
        print(f"resuming after epoch {saved_epoch} of {args.epochs} from {checkpoint_path}")
    step_model = torch.compile(model) if args.compile else model  # the same weights, compiled
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"latent {args.latent_channels} x {side} x {side}")

    # Ctrl-C only raises a flag: the epoch (or prior step) under way ends, is saved, and the run
    # stops cleanly. A second Ctrl-C stops at once; the saves are atomic either way.
    stop = []
    def on_ctrl_c(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: stopping after this epoch (press it again to stop at once)", file=sys.stderr)
    signal.signal(signal.SIGINT, on_ctrl_c)
    resume = "python train_vae.py --resume" + (f" --results-dir {shlex.quote(args.results_dir)}"
                                                 if args.results_dir != RESULTS_DIR else "")
    started = time.perf_counter() - (metrics[-1]["elapsed_s"] if metrics else 0.0)
    for epoch in range(saved_epoch + 1, args.epochs + 1):
        tick = time.perf_counter()
        mse, kl = train_one_epoch(step_model, images, train_rows, augment, optimizer, scheduler, shuffle, args,
                                  device, epoch)
        seconds = time.perf_counter() - tick  # the epoch's training alone, without its evaluation
        row = {"epoch": epoch, "train_mse": mse, "train_kl": kl, **evaluate(model, val_images, device, args.kl_weight),
               "images_per_s": len(train_rows) / seconds, "elapsed_s": time.perf_counter() - started}
        # A non-finite loss or weight is never saved: the last good checkpoint stays as it is.
        if not all(map(math.isfinite, row.values())) or not all(p.isfinite().all() for p in model.parameters()):
            raise UserError(f"training diverged in epoch {epoch} (loss {mse + kl:g}, val loss {row['val_loss']:g}); "
                            f"lower --lr (now {args.lr}) or --kl-weight (now {args.kl_weight}) and start again; "
                            f"the checkpoint of epoch {saved_epoch} is kept in {args.results_dir}")
        metrics.append(row)
        print(f"epoch {epoch:3d}/{args.epochs}  train mse {mse:8.1f}  kl {kl:7.1f}  val loss {row['val_loss']:8.1f}  "
              f"val psnr {row['val_psnr']:5.2f} dB  {row['images_per_s']:5.1f} img/s")
        write_metrics(metrics, args.results_dir)
        if epoch % args.save_every == 0 or epoch == args.epochs:
            save_pictures(model, val_images[:GRID_IMAGES], noise.to(device), epoch, args.results_dir)
        # Every epoch: everything needed to continue exactly here after a crash or Ctrl-C.
        save_checkpoint({**vae_checkpoint(model), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch, "metrics": metrics,
                         "shuffle_state": shuffle.get_state(), "rng_state": torch.get_rng_state(),
                         "args": vars(args)}, checkpoint_path)
        saved_epoch = epoch
        if stop:
            print(f"interrupted after epoch {epoch}; epochs 1-{epoch} are saved in {checkpoint_path}: "
                  f"continue with `{resume}`", file=sys.stderr)
            return 130
    plot_loss_curve(metrics, args.results_dir)
    save_checkpoint(vae_checkpoint(model), args.out)  # before stage two: a stopped prior costs no VAE
    print(f"VAE done in {metrics[-1]['elapsed_s'] / 60:.1f} min: val PSNR {metrics[-1]['val_psnr']:.2f} dB, "
          f"val KL {metrics[-1]['val_kl']:.0f} nats per image; saved to {args.out}")
    if args.prior_steps:
        tick = time.perf_counter()
        priors = train_prior(model, images, train_rows, args, device, stop)
        if priors is None:
            print(f"interrupted in stage two; the trained VAE is saved in {args.out} and usable; "
                  f"to train its prior, run `{resume}`", file=sys.stderr)
            return 130
        checkpoint = vae_checkpoint(model, *priors)
        checkpoint["prior"]["seconds"] = time.perf_counter() - tick  # for benchmarks/bench_samples.py
        save_checkpoint(checkpoint, args.out)
        with torch.no_grad():
            save_png(model.decode(sample_prior(priors[0], noise.to(device), guide=priors[1])),
                     f"{args.results_dir}/samples_learned_prior.png")
        print(f"learned prior done in {(time.perf_counter() - tick) / 60:.1f} min; saved with the VAE to {args.out}")
    print(f"pictures and metrics in {args.results_dir}/")
    return 0


# --- Plumbing: the device, the run's settings, the paths (not needed to follow the VAE) ----

def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    try:
        torch.empty(1, device=name)  # the one sure test that the device exists here
    except (RuntimeError, AssertionError) as error:  # a bad name, or no such device or driver
        raise UserError(f"the device {name!r} is not available here ({str(error).splitlines()[0]}); "
                        "use --device auto to pick the best one") from error
    return torch.device(name)


def bf16_is_fast(device):
    """bfloat16 pays off on a GPU with bf16 and on a CPU with bf16 instructions (AMX, AVX-512
    BF16); other CPUs emulate it. torch.cpu's helpers are private, so looked up, not assumed."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return device.type == "cpu" and any(check is not None and check() for check in checks)


def settings(args, device, checkpoint_path):
    """The run's settings: a resumed run's own, else the flags, with the CPU defaults without a
    CUDA GPU (512 px costs 16x the work per image of 128 px: far beyond a laptop's hour)."""
    resumed = None
    if args.resume:
        try:
            resumed = load_checkpoint(checkpoint_path)
        except (FileNotFoundError, CheckpointError):
            raise UserError(f"there is no resumable checkpoint at {checkpoint_path}; "
                            "start a new run without --resume") from None
        # The run goes on as it started; the device, --results-dir, and --out and the prior's
        # flags where given (stage two starts afresh), are this command line's.
        defaults = vars(parse_args([]))
        given = {key: value for key, value in vars(args).items() if value != defaults[key]}
        fresh = {key: value for key, value in given.items() if key == "out" or key.startswith("prior_")}
        fresh.update(device=args.device, resume=True, results_dir=args.results_dir, cache_dir=args.cache_dir)
        ignored = [f"--{key.replace('_', '-')}" for key in sorted(given.keys() - fresh.keys())
                   if given[key] != resumed["args"].get(key, given[key])]
        if ignored:
            print(f"note: a resumed run keeps the settings it started with; ignoring {', '.join(ignored)}")
        args = argparse.Namespace(**{**vars(args), **resumed["args"], **fresh})
    cpu = device.type != "cuda"
    unset = [f"--{key.replace('_', '-')}" for key in ("image_size", "epochs", "batch_size") if not getattr(args, key)]
    args.image_size = args.image_size or (CPU_IMAGE_SIZE if cpu else IMAGE_SIZE)
    args.epochs = args.epochs or (CPU_EPOCHS if cpu else EPOCHS)
    args.batch_size = args.batch_size or (CPU_BATCH_SIZE if cpu else BATCH_SIZE)
    args.use_amp = args.amp == "on" or (args.amp == "auto" and bf16_is_fast(device))
    print(f"device {device}: {args.image_size} px, {args.epochs} epochs, batch {args.batch_size}"
          + (", bfloat16 autocast" if args.use_amp else "") + (", torch.compile" if args.compile else "")
          + (f" (CPU defaults for {', '.join(unset)}; with a CUDA GPU: {IMAGE_SIZE} px, {EPOCHS} epochs, "
             f"batch {BATCH_SIZE})" if cpu and unset else ""))
    return args, resumed


def hub_reachable():
    # One quick connect: offline, huggingface_hub retries for half a minute, and no setting stops
    # it. Behind a proxy a direct connect proves nothing; offline mode asks for the local cache.
    if datasets.config.HF_HUB_OFFLINE or any(map(os.environ.get, ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))):
        return True
    url = urllib.parse.urlparse(datasets.config.HF_ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 5).close()
    except OSError:
        return False
    return True


def check_writable(path, flag):
    """Say now, not after an hour of training, that `path` cannot be written. An unnamed
    temporary file in the nearest existing folder on its way proves it and leaves nothing."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; pass {flag} with the path of a file")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"cannot write to the folder {folder} ({error.strerror}); pass {flag} with a path "
                        "in a folder you can write to") from error


# --- Command line: every setting above has a flag, and the constant is its default -----------

def checked(kind, ok, rule):
    """An argparse type: convert the text with `kind`, then insist on `ok(value)`."""
    def parse(text):
        try:
            if ok(value := kind(text)):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive whole number")
positive_float = checked(float, lambda v: v > 0, "a positive number")
fraction = checked(float, lambda v: 0 < v < 1, "a number between 0 and 1")
steps_or_0 = checked(int, lambda v: v >= 0, "zero or a positive whole number")
width = checked(int, lambda v: v >= 8 and v % 8 == 0, "a multiple of 8, like 64")
channel_list = checked(lambda text: [int(w) for w in text.split(",")], lambda ws: len(ws) == 3 and all(
    w >= 4 and w % 4 == 0 for w in ws), "three comma-separated multiples of 4, like 32,64,128")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a convolutional VAE on Pokémon images, then a learned prior.")
    by_device = "default {} with a CUDA GPU, {} without".format
    p.add_argument("--data", default=DATASET, help="Hub data set name or local image folder")
    p.add_argument("--epochs", type=positive_int, help=by_device(EPOCHS, CPU_EPOCHS))
    p.add_argument("--image-size", type=checked(int, lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8 (the "
                   "encoder halves the image three times)"), help="px; " + by_device(IMAGE_SIZE, CPU_IMAGE_SIZE))
    p.add_argument("--fit", choices=["pad", "crop"], default=FIT, help="pad with white (artwork) or crop (photos)")
    p.add_argument("--batch-size", type=positive_int, help=by_device(BATCH_SIZE, CPU_BATCH_SIZE))
    p.add_argument("--lr", type=positive_float, default=LEARNING_RATE, help="peak learning rate")
    p.add_argument("--warmup", type=fraction, default=WARMUP, help="share of the steps spent warming up")
    p.add_argument("--kl-weight", type=checked(float, lambda v: v >= 0, "zero or positive"), default=KL_WEIGHT)
    p.add_argument("--latent-channels", type=positive_int, default=LATENT_CHANNELS)
    p.add_argument("--channels", type=channel_list, default=CHANNELS, help="widths at 1/2, 1/4, 1/8 of the image")
    p.add_argument("--val-fraction", type=fraction, default=VAL_FRACTION)
    p.add_argument("--rotation", type=checked(float, lambda v: 0 <= v <= 180, "an angle from 0 to 180 degrees"),
                   default=ROTATION, help="degrees, largest random rotation of a training image")
    p.add_argument("--save-every", type=positive_int, default=SAVE_EVERY, help="epochs between picture grids")
    p.add_argument("--amp", choices=["auto", "on", "off"], default=AMP, help="bfloat16 autocast")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=COMPILE, help="torch.compile the model")
    p.add_argument("--prior-steps", type=steps_or_0, default=PRIOR_STEPS,
                   help="optimizer steps of the learned prior; 0 skips stage two")
    p.add_argument("--prior-batch-size", type=positive_int, default=PRIOR_BATCH_SIZE)
    p.add_argument("--prior-lr", type=positive_float, default=PRIOR_LR)
    p.add_argument("--prior-width", type=width, default=PRIOR_WIDTH, help="channels of the prior's U-Net")
    p.add_argument("--prior-guide-steps", type=steps_or_0, default=PRIOR_GUIDE_STEPS,
                   help="optimizer steps of the prior's guide; 0 trains none")
    p.add_argument("--prior-guide-width", type=width, default=PRIOR_GUIDE_WIDTH, help="channels of the guide's U-Net")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", default=MODEL_PATH, help="where to save the final model")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--cache-dir", default=CACHE_DIR, help="where the decoded images are kept between runs")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --results-dir")
    return p.parse_args(argv)


def main():
    try:
        sys.exit(train(parse_args()))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("\ninterrupted; every file written so far is whole", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
