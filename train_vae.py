"""
Train the VAE of vae_model.py on Pokémon images, then a learned prior over its latent.

    python train_vae.py                              # the Hugging Face Hub data set
    python train_vae.py --data path/to/folder        # any folder of images, offline

The chapter, top to bottom: settings, loading the images (once, into memory), augmenting
batches, the training loop, saving (reconstruction grids, prior samples, metrics, the loss
curve, a resumable checkpoint and the final model), and stage two: the learned prior
(LatentPrior of vae_model.py), trained on the VAE's codes and saved next to it.
"""
import argparse
import json
import math
import os
import signal
import socket
import sys
import time
import urllib.parse

import torch
from PIL import Image, ImageOps

from vae_model import (VAE, CheckpointError, LatentPrior, load_checkpoint, prior_loss, psnr, sample_prior, save_atomic,
                       vae_checkpoint, vae_loss)

# -----------------------------------------------------------------------------------------------
DATASET = "svjack/pokemon-blip-captions-en-zh"  # Hub data set name, or a local folder of images
IMAGE_SIZE = 512          # px, side of the square training image (with a GPU)
EPOCHS = 200              # passes over the training images (with a GPU)
CPU_IMAGE_SIZE = 128      # px, used instead of IMAGE_SIZE when there is no GPU
CPU_EPOCHS = 80           # used instead of EPOCHS when there is no GPU
BATCH_SIZE = 8            # images per optimizer step (with a GPU)
CPU_BATCH_SIZE = 2        # used instead of BATCH_SIZE when there is no GPU: more, smaller steps
LEARNING_RATE = 2e-3      # peak learning rate of the one-cycle schedule
WARMUP = 0.3              # share of the steps in which the learning rate climbs to its peak
KL_WEIGHT = 0.2           # weight of the KL term against the summed reconstruction error
LATENT_CHANNELS = 8       # channels of the latent; it is H/8 x W/8 in space
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
PRIOR_COPIES = 8          # augmented copies of each training image encoded for the prior
MODEL_PATH = "vae_model.pth"   # where the final model (config + weights) is written
RESULTS_DIR = "vae_results"    # grids, metrics.jsonl, loss curve, resumable checkpoint
# -----------------------------------------------------------------------------------------------

GRID_IMAGES = 8           # validation images shown in each reconstruction grid
EVAL_BATCH_SIZE = 32      # validation images per forward pass (no gradients: larger is fine)
WHITE = (255, 255, 255)


class UserError(Exception):
    """A mistake the user can fix; main() prints it as one sentence and exits with status 2."""


# ---------------------------------------------------------------------------------------
# Loading: decode every image once, make it RGB on white, pad it square, resize
# ---------------------------------------------------------------------------------------

def open_rgb(file):
    """Open an image file (path or file object) of any mode as RGB on a white background."""
    image = Image.open(file)
    image.load()  # decode now, so that a truncated file fails here and not later
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: scale to 8 bits
        scale = 255 / 65535 if image.mode.startswith("I") else 255
        image = image.point(lambda v: v * scale).convert("L")
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Composite on white: dropping alpha would turn transparent pixels black.
        background = Image.new("RGBA", image.size, WHITE + (255,))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def to_square(image, size):
    """Resize to size x size without distorting the shape: fit, then pad with white."""
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BICUBIC, color=WHITE)


def hub_reachable(timeout=5.0):
    """One quick TCP connect, so that an offline machine hears so in seconds, not after
    the minutes of retries that the Hub client would spend."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return True  # the user asked for the local cache; let datasets use it
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connect proves nothing; let datasets try
    from huggingface_hub import constants
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def open_dataset(source):
    """A `datasets` table of undecoded images, from a local folder or the Hub."""
    import datasets
    datasets.logging.set_verbosity_error()
    if os.path.isdir(source):
        try:
            table = datasets.load_dataset("imagefolder", data_dir=source, split="train")
        except Exception:  # datasets raises several types for "no image files here"
            raise UserError(f"the folder {source} holds no image files; "
                            "put .png or .jpg images in it or pass another --data") from None
    elif os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"the data folder {source} does not exist; "
                        "pass --data with an existing folder of images or a Hub data set name")
    elif not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face Hub to download {source}; "
                        "connect to the internet or train offline with --data path/to/images")
    else:
        try:
            table = datasets.load_dataset(source, split="train")
        except Exception as error:
            raise UserError(f"could not load the Hub data set {source} ({type(error).__name__}); "
                            "check the name or train offline with --data path/to/images") from None
    column = next((name for name, feature in table.features.items()
                   if isinstance(feature, datasets.Image)), None)
    if column is None:
        raise UserError(f"the data set {source} has no image column; pass --data with images")
    # decode=False hands us the raw bytes, so one corrupt file is skipped, not fatal.
    return table.cast_column(column, datasets.Image(decode=False))[column]


def load_images(source, size):
    """All images as one uint8 tensor (N, 3, size, size), decoded and resized once per run:
    the epochs then read memory, not JPEG files."""
    import io
    from torchvision.transforms.v2.functional import pil_to_tensor
    from tqdm import tqdm
    images, skipped = [], 0
    for item in tqdm(open_dataset(source), desc=f"loading images at {size} px", leave=False):
        try:
            file = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
            images.append(pil_to_tensor(to_square(open_rgb(file), size)))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            skipped += 1
    if skipped:
        print(f"skipped {skipped} file(s) that are not readable images")
    if len(images) < 2:
        raise UserError(f"{source} holds {len(images)} readable image(s) and at least 2 are "
                        "needed; add images or pass another folder")
    return torch.stack(images)


def split(images, fraction, seed):
    """A fixed, seeded train/validation split."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_val = min(len(images) - 1, max(1, round(len(images) * fraction)))
    return images[order[n_val:]], images[order[:n_val]]


# ---------------------------------------------------------------------------------------
# Augmentation: on uint8 tensors already in memory, on the training device
# ---------------------------------------------------------------------------------------

def make_augment(rotation=ROTATION):
    """Random flip, rotation and colour jitter for a whole uint8 batch (B, 3, H, W)."""
    from torchvision.transforms import v2
    # A v2 transform called on a batch draws one flip, one angle and one colour shift for
    # all of its images: cheaper than one call per image (1.2 against 2.1 ms per image at
    # 128 px and batch 2 on a 2-core CPU), and as the batches are reshuffled every epoch,
    # each image still meets a new flip, angle and colour shift every time it is seen.
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=255),  # white corners
        # Light colour jitter without a hue shift: at 128 px the jitter costs 2.7 ms per image
        # on a 2-core CPU with a hue shift and 0.6 ms without (benchmarks/bench_step.py).
        v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
    ])


def to_model_range(batch_uint8):
    return batch_uint8.float().div(127.5).sub(1.0)  # [0, 255] -> [-1, 1], as tanh outputs


# ---------------------------------------------------------------------------------------
# Evaluation and pictures
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, images, device, kl_weight, batch_size):
    """Validation loss, KL and PSNR per image, decoding mu (the deterministic reconstruction)."""
    model.eval()
    totals = {"val_loss": 0.0, "val_mse": 0.0, "val_kl": 0.0, "val_psnr": 0.0}
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start:start + batch_size].to(device))
        x = x.contiguous(memory_format=torch.channels_last)
        mu, log_var = model.encode(x)
        recon = model.decode(mu)
        loss, mse, kl = vae_loss(recon, x, mu, log_var, kl_weight)
        for key, value in zip(totals, (loss.item(), mse.item(), kl.item(), psnr(recon, x))):
            totals[key] += value * len(x)
    model.train()
    return {key: value / len(images) for key, value in totals.items()}


def save_png(tensor, path, **grid_options):
    """save_image to a temporary file, then rename: a crash never leaves a truncated PNG."""
    from torchvision.utils import save_image
    tmp = f"{path}.tmp{os.getpid()}.png"
    save_image(tensor, tmp, **grid_options)
    os.replace(tmp, path)


@torch.no_grad()
def save_pictures(model, grid_images, noise, epoch, results_dir):
    model.eval()
    x = to_model_range(grid_images).contiguous(memory_format=torch.channels_last)
    recon = model.decode(model.encode(x)[0])
    # Originals on the top row, their reconstructions underneath.
    save_png(torch.cat([x, recon]).float(), os.path.join(results_dir, f"recon_epoch_{epoch:03d}.png"),
             nrow=len(x), normalize=True, value_range=(-1, 1), padding=2, pad_value=1)
    # The same fixed noise every time, so successive grids show how the decoder develops.
    samples = model.decode(noise)
    save_png(samples.float(), os.path.join(results_dir, f"samples_epoch_{epoch:03d}.png"),
             nrow=8, normalize=True, value_range=(-1, 1), padding=2, pad_value=1)
    model.train()


def write_metrics(metrics, results_dir):
    """Rewrite metrics.jsonl whole and atomically: never a half-written line."""
    path = os.path.join(results_dir, "metrics.jsonl")
    with open(path + ".tmp", "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in metrics)
    os.replace(path + ".tmp", path)


def plot_loss_curve(metrics, results_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in metrics]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_mse"] for row in metrics], label="train reconstruction (summed MSE)")
    left.plot(epochs, [row["val_loss"] for row in metrics], label="val loss (MSE + weight x KL)")
    left.plot(epochs, [row["train_kl"] for row in metrics], label="train KL (nats)")
    left.set(xlabel="epoch", ylabel="per image", yscale="log", title="Loss")
    left.legend()
    right.plot(epochs, [row["val_psnr"] for row in metrics])
    right.set(xlabel="epoch", ylabel="dB", title="Validation PSNR (decoding mu)")
    fig.tight_layout()
    path = os.path.join(results_dir, "loss_curve.png")
    fig.savefig(path + ".tmp", format="png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------

def pick_device(name):
    if name != "auto":
        kind, _, index = name.partition(":")
        available = {"cpu": not index, "mps": torch.backends.mps.is_available() and not index,
                     "cuda": index.isdigit() and int(index) < torch.cuda.device_count()
                     or not index and torch.cuda.is_available()}
        if not available.get(kind, False):
            raise UserError(f"the device {name!r} is not available here; "
                            "use --device auto to pick the best one")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bf16_is_fast(device):
    """Where bfloat16 autocast pays off: a GPU with bf16 support, or a CPU with AMX matrix
    tiles (Intel Xeon since Sapphire Rapids), where it measured 1.9x the fp32 training step of
    an earlier version of this model. Other CPUs have no bf16 matrix unit and emulate it: on
    a 2-core AMD EPYC a step took 7 to 10 times longer. So "auto" leaves autocast off there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # a private helper: guard it
    return device.type == "cpu" and amx is not None and amx()


def settings(args, device, checkpoint_path):
    """The run's settings: those a resumed run started with, else the flags, with the CPU
    defaults filled in when there is no GPU (the seed's 512 px costs 16x the work per image
    of 128 px, and 200 epochs of it is far beyond a laptop CPU's hour)."""
    resumed = None
    if args.resume:
        try:
            resumed = load_checkpoint(checkpoint_path)
        except (FileNotFoundError, CheckpointError):
            raise UserError(f"there is no resumable checkpoint at {checkpoint_path}; "
                            "start a new run without --resume") from None
        # The VAE's settings are those it started with. The device, the prior's settings
        # (stage two starts afresh) and an --out given now come from this command line.
        defaults = vars(parse_args([]))
        fresh = {name: value for name, value in vars(args).items()
                 if name in ("device", "resume", "results_dir") or name.startswith("prior_")
                 or name == "out" and value != defaults[name]}
        ignored = [name for name, value in vars(args).items()
                   if name in resumed["args"] and name not in fresh
                   and value != defaults[name] and value != resumed["args"][name]]
        if ignored:
            print("note: a resumed run keeps the settings it started with; ignoring "
                  + ", ".join("--" + name.replace("_", "-") for name in sorted(ignored)))
        args = argparse.Namespace(**{**vars(args), **resumed["args"], **fresh})
    cpu = device.type != "cuda"
    args.image_size = args.image_size or (CPU_IMAGE_SIZE if cpu else IMAGE_SIZE)
    args.epochs = args.epochs or (CPU_EPOCHS if cpu else EPOCHS)
    args.batch_size = args.batch_size or (CPU_BATCH_SIZE if cpu else BATCH_SIZE)
    args.use_amp = args.amp == "on" or (args.amp == "auto" and bf16_is_fast(device))
    print(f"device {device}: {args.image_size} px, {args.epochs} epochs, batch {args.batch_size}"
          + (", bfloat16 autocast" if args.use_amp else "") + (", torch.compile" if args.compile else "")
          + (f" (CPU defaults: {CPU_IMAGE_SIZE} px, {CPU_EPOCHS} epochs, batch {CPU_BATCH_SIZE} instead of the"
             f" GPU's {IMAGE_SIZE} px, {EPOCHS} epochs, batch {BATCH_SIZE}; change them with --image-size,"
             " --epochs and --batch-size)" if cpu else ""))
    return args, resumed


def train_one_epoch(model, images, augment, optimizer, scheduler, shuffle, args, device, epoch):
    """One pass over the training images; returns mean MSE, mean KL and seconds spent on data.
    The loop never waits for the device: losses are summed as tensors, read once per epoch
    (plus every 10th step for the progress bar)."""
    from tqdm import tqdm
    order = torch.randperm(len(images), generator=shuffle)
    steps = math.ceil(len(images) / args.batch_size)
    sums, data_time = torch.zeros(2, device=device), 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{args.epochs}", leave=False)
    for step in bar:
        tick = time.perf_counter()
        batch = images[order[step * args.batch_size:(step + 1) * args.batch_size]]
        if device.type == "cuda":
            # Indexing made a new, pageable tensor; page-locked (pinned) memory lets the copy
            # below run in the background instead of holding the CPU until it is done.
            batch = batch.pin_memory()
        x = to_model_range(augment(batch.to(device, non_blocking=True)))
        x = x.contiguous(memory_format=torch.channels_last)
        data_time += time.perf_counter() - tick

        # bfloat16 keeps fp32's range, so unlike float16 it needs no loss scaling.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.use_amp):
            recon, mu, log_var = model(x)
        loss, mse, kl = vae_loss(recon.float(), x, mu.float(), log_var.float(), args.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        sums += torch.stack([mse.detach(), kl.detach()])
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.1f}")
    mse, kl = (sums / steps).tolist()
    if not (math.isfinite(mse) and math.isfinite(kl)):  # a NaN anywhere in the epoch ends up here
        raise UserError(f"the loss became {mse + kl} in epoch {epoch}; training is unstable, "
                        f"so lower --lr (now {args.lr}) or --kl-weight (now {args.kl_weight}); "
                        f"the last good checkpoint is kept in {args.results_dir}")
    return mse, kl, data_time


# ---------------------------------------------------------------------------------------
# Stage two: a learned prior over the trained VAE's latent space
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def encode_for_prior(model, images, augment, copies, device, generator):
    """The latent means of `copies` augmented versions of every training image: the encoder
    learned to read flipped and rotated Pokémon, so their codes are real codes too, and
    eight times as many of them keep the prior from learning the training set by heart."""
    model.eval()
    mus = []
    for _ in range(copies):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 8):  # small batches: each gets its own flip and angle
            x = to_model_range(augment(images[order[start:start + 8]].to(device)))
            mus.append(model.encode(x.contiguous(memory_format=torch.channels_last))[0].float())
    model.train()
    return torch.cat(mus)


def train_prior(model, images, augment, args, device):
    """Fit LatentPrior to the latent means of the training images. Means, not samples
    z ~ q(z|x): the posterior's noise is about as large as the means' spread, so a prior
    of samples would spend itself on noise that the decoder ignores anyway.
    Returns an exponential moving average of the weights, which samples more cleanly than
    the last step's weights (as in every diffusion model since Ho et al. 2020)."""
    from tqdm import tqdm
    generator = torch.Generator().manual_seed(args.seed)
    mus = encode_for_prior(model, images, augment, args.prior_copies, device, generator)
    prior = LatentPrior(args.latent_channels, args.prior_width,
                        mus.mean((0, 2, 3)), mus.std((0, 2, 3))).to(device)
    ema = torch.optim.swa_utils.AveragedModel(
        prior, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999), use_buffers=True)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.prior_lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.prior_steps)
    bar = tqdm(range(args.prior_steps), desc="stage two: learned prior", leave=False)
    total = torch.zeros((), device=device)
    for step in bar:
        pick = torch.randint(len(mus), (args.prior_batch_size,), generator=generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.use_amp):
            loss = prior_loss(prior, mus[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(prior)
        total += loss.detach()
        if step % 100 == 99:
            bar.set_postfix(loss=f"{total.item() / 100:.3f}")
            total.zero_()
    if not math.isfinite(loss.item()):
        raise UserError(f"the prior's loss became {loss.item()}; lower --prior-lr (now {args.prior_lr})")
    return ema.module.eval()


def train(args):
    device = pick_device(args.device)
    checkpoint_path = os.path.join(args.results_dir, "checkpoint.pth")
    args, resumed = settings(args, device, checkpoint_path)
    os.makedirs(args.results_dir, exist_ok=True)
    torch.manual_seed(args.seed)

    images = load_images(args.data, args.image_size)
    train_images, val_images = split(images, args.val_fraction, args.seed)
    print(f"{len(train_images)} training and {len(val_images)} validation images from {args.data}")
    augment = make_augment(args.rotation)
    grid_images, val_images = val_images[:GRID_IMAGES].to(device), val_images.to(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves

    model = VAE(args.image_size, args.latent_channels, args.channels).to(device)
    # channels_last (NHWC) is the layout the oneDNN / cuDNN convolution kernels prefer.
    model = model.to(memory_format=torch.channels_last)
    noise = torch.randn(16, args.latent_channels, args.image_size // 8, args.image_size // 8,
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, pct_start=args.warmup,
        total_steps=args.epochs * math.ceil(len(train_images) / args.batch_size))
    shuffle = torch.Generator().manual_seed(args.seed)
    saved_epoch, metrics = 0, []
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        shuffle.set_state(resumed["shuffle_state"])
        torch.set_rng_state(resumed["rng_state"])
        saved_epoch, metrics = resumed["epoch"], resumed["metrics"]
        print(f"resuming after epoch {saved_epoch} of {args.epochs} from {checkpoint_path}")
    # Compiled or not, the weights are the same tensors: vae_checkpoint saves the plain model.
    step_model = torch.compile(model) if args.compile else model
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"latent {args.latent_channels} x {args.image_size // 8} x {args.image_size // 8}")

    started = time.perf_counter() - (metrics[-1]["elapsed_s"] if metrics else 0.0)
    # Ctrl-C raises KeyboardInterrupt wherever the code happens to be, and cleanup code
    # (a __del__ of a progress bar, say) prints and swallows it; so remember it, and stop
    # at the end of the epoch if it was swallowed.
    interrupted = []
    def on_ctrl_c(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_ctrl_c)
    vae_done = False
    try:
        for epoch in range(saved_epoch + 1, args.epochs + 1):
            tick = time.perf_counter()
            mse, kl, data_time = train_one_epoch(step_model, train_images, augment, optimizer,
                                                 scheduler, shuffle, args, device, epoch)
            seconds = time.perf_counter() - tick
            row = {"epoch": epoch, "train_mse": mse, "train_kl": kl,
                   **evaluate(model, val_images, device, args.kl_weight, EVAL_BATCH_SIZE),
                   "images_per_s": len(train_images) / seconds, "data_wait_fraction": data_time / seconds,
                   "elapsed_s": time.perf_counter() - started}
            metrics.append(row)
            print(f"epoch {epoch:3d}/{args.epochs}  train mse {mse:8.1f}  kl {kl:7.1f}  "
                  f"val loss {row['val_loss']:8.1f}  val psnr {row['val_psnr']:5.2f} dB  "
                  f"{row['images_per_s']:5.1f} img/s")
            write_metrics(metrics, args.results_dir)
            if epoch % args.save_every == 0 or epoch == args.epochs:
                save_pictures(model, grid_images, noise, epoch, args.results_dir)
            # Every epoch: everything needed to continue exactly here after a crash or Ctrl-C.
            save_atomic({**vae_checkpoint(model), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch, "metrics": metrics,
                         "shuffle_state": shuffle.get_state(), "rng_state": torch.get_rng_state(),
                         "args": vars(args)}, checkpoint_path)
            saved_epoch = epoch
            if interrupted:
                raise KeyboardInterrupt
        plot_loss_curve(metrics, args.results_dir)
        # The VAE is saved before stage two, so an interrupted prior never costs the VAE.
        save_atomic(vae_checkpoint(model), args.out)
        vae_done = True
        last = metrics[-1]
        print(f"VAE done in {last['elapsed_s'] / 60:.1f} min: val PSNR {last['val_psnr']:.2f} dB, "
              f"val KL {last['val_kl']:.0f} nats per image; saved to {args.out}")
        if args.prior_steps:
            tick = time.perf_counter()
            prior = train_prior(model, train_images, augment, args, device)
            checkpoint = vae_checkpoint(model, prior)
            checkpoint["prior"]["seconds"] = time.perf_counter() - tick  # for benchmarks/bench_samples.py
            save_atomic(checkpoint, args.out)
            with torch.no_grad():
                samples = model.decode(sample_prior(prior, noise))
            save_png(samples.float(), os.path.join(args.results_dir, "samples_learned_prior.png"),
                     nrow=8, normalize=True, value_range=(-1, 1), padding=2, pad_value=1)
            print(f"learned prior done in {(time.perf_counter() - tick) / 60:.1f} min; saved with the VAE "
                  f"to {args.out}")
    except KeyboardInterrupt:
        resume = "python train_vae.py --resume" + (
            f" --results-dir {args.results_dir}" if args.results_dir != RESULTS_DIR else "")
        if vae_done:
            message = (f"the trained VAE is saved in {args.out} and usable; to train its prior, "
                       f"run `{resume}`")
        elif saved_epoch:
            message = f"epochs 1-{saved_epoch} are saved in {checkpoint_path}: continue with `{resume}`"
        else:
            message = "no epoch had finished, so nothing was saved"
        print(f"\ninterrupted after epoch {saved_epoch}; {message}", file=sys.stderr)
        sys.exit(130)
    print(f"pictures and metrics in {args.results_dir}/")


# ---------------------------------------------------------------------------------------
# Command line: every setting above has a flag; the constant is its default
# ---------------------------------------------------------------------------------------

def checked(kind, ok, rule):
    """An argparse type: convert the text with `kind`, then insist on `ok(value)`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive whole number")
non_negative_int = checked(int, lambda v: v >= 0, "zero or a positive whole number")
channel_width = checked(int, lambda v: v >= 8 and v % 8 == 0, "a multiple of 8, like 64")
positive_float = checked(float, lambda v: v > 0, "a positive number")
image_size = checked(int, lambda v: v > 0 and v % 8 == 0,
                     "a positive multiple of 8 (the encoder halves the image three times)")
channel_list = checked(lambda text: [int(w) for w in text.split(",")],
                       lambda ws: len(ws) == 3 and all(w >= 4 and w % 4 == 0 for w in ws),
                       "three comma-separated multiples of 4, like 32,64,128")
fraction = checked(float, lambda v: 0 < v < 1, "a number between 0 and 1")
non_negative = checked(float, lambda v: v >= 0, "zero or positive")
degrees = checked(float, lambda v: 0 <= v <= 180, "an angle from 0 to 180 degrees")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a convolutional VAE on Pokémon images.")
    p.add_argument("--data", default=DATASET, help="Hub data set name or local image folder")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"default {EPOCHS} with a GPU, {CPU_EPOCHS} without")
    p.add_argument("--image-size", type=image_size, default=None,
                   help=f"px, multiple of 8; default {IMAGE_SIZE} with a GPU, {CPU_IMAGE_SIZE} without")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"default {BATCH_SIZE} with a GPU, {CPU_BATCH_SIZE} without")
    p.add_argument("--lr", type=positive_float, default=LEARNING_RATE)
    p.add_argument("--warmup", type=fraction, default=WARMUP,
                   help="share of the steps in which the learning rate climbs to its peak")
    p.add_argument("--kl-weight", type=non_negative, default=KL_WEIGHT)
    p.add_argument("--latent-channels", type=positive_int, default=LATENT_CHANNELS)
    p.add_argument("--channels", type=channel_list, default=CHANNELS, help="e.g. 32,64,128")
    p.add_argument("--val-fraction", type=fraction, default=VAL_FRACTION)
    p.add_argument("--rotation", type=degrees, default=ROTATION,
                   help="degrees, largest random rotation of a training image")
    p.add_argument("--save-every", type=positive_int, default=SAVE_EVERY,
                   help="epochs between reconstruction and sample grids")
    p.add_argument("--amp", choices=["auto", "on", "off"], default=AMP,
                   help="bfloat16 autocast; auto turns it on where bf16 is fast (bf16 GPUs, AMX CPUs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=COMPILE,
                   help="torch.compile the model")
    p.add_argument("--prior-steps", type=non_negative_int, default=PRIOR_STEPS,
                   help="optimizer steps of the learned prior trained after the VAE; 0 skips it")
    p.add_argument("--prior-batch-size", type=positive_int, default=PRIOR_BATCH_SIZE)
    p.add_argument("--prior-lr", type=positive_float, default=PRIOR_LR)
    p.add_argument("--prior-width", type=channel_width, default=PRIOR_WIDTH,
                   help="channels of the prior's U-Net, a multiple of 8")
    p.add_argument("--prior-copies", type=positive_int, default=PRIOR_COPIES,
                   help="augmented copies of each training image encoded for the prior")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", default=MODEL_PATH, help="where to save the final model")
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --results-dir")
    return p.parse_args(argv)


def main():
    try:
        train(parse_args())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
