"""
Train the VAE of vae_model.py on Pokémon images, then a learned prior over its latent space.

    python train_vae.py                          # the Hugging Face Hub data set
    python train_vae.py --data path/to/folder    # any folder of images, offline
    torchrun --standalone --nproc_per_node 4 train_vae.py   # one model trained by 4 GPUs (DDP)

Read top to bottom: settings, processes, data, an epoch, evaluation and pictures, stage two (the
prior of latent_prior.py), and train(), which runs them in that order; faults; the command line.
"""
import argparse
import json
import math
import os
import shlex
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from cli import (HelpWithDefaults, UserError, angle, bf16_is_fast, channel_list, check_writable,
                 counted, fraction, multiple_of_8, pick_device, positive_float, positive_int,
                 run_main, steps_or_0, stop_on_signals, unet_width, zero_or_positive)
from image_data import (DEFAULT_CACHE_DIR, cache_path, cached_images, fetch, image_files,
                        make_augment, place_images, save_png, split, to_model_range)
from latent_prior import fit_prior, sample_prior
from vae_model import (VAE, CheckpointError, atomic_write, load_checkpoint, psnr, save_checkpoint,
                       vae_checkpoint, vae_loss)

# -----------------------------------------------------------------------------------------------
DATASET = "svjack/pokemon-blip-captions-en-zh"  # Hub data set name, or a local folder of images
IMAGE_SIZE = 512          # px, side of the square training image (with a CUDA GPU)
FIT = "pad"               # making images square: "pad" with white (artwork), "crop" (photos)
EPOCHS = 200              # passes over the training images (with a CUDA GPU)
CPU_IMAGE_SIZE = 128      # px, used instead of IMAGE_SIZE without a CUDA GPU (CPU, Apple GPU)
CPU_EPOCHS = 80           # used instead of EPOCHS without a CUDA GPU
BATCH_SIZE = 8            # images per optimizer step (with a CUDA GPU)
CPU_BATCH_SIZE = 2        # used instead of BATCH_SIZE without a CUDA GPU: more, smaller steps
LEARNING_RATE = 2e-3      # peak learning rate of the one-cycle schedule
WARMUP = 0.3              # share of the steps in which the learning rate climbs to its peak
KL_WEIGHT = 0.02          # weight of the KL term against the summed reconstruction error
LATENT_CHANNELS = 6       # latent channels, at H/8 x W/8: more are sharper, fewer easier to model
CHANNELS = [32, 64, 128]  # widths at 1/2, 1/4 and 1/8 of the image size (the decoder mirrors them)
VAL_FRACTION = 0.05       # share of images held out, never augmented, for validation
SAVE_EVERY = 10           # epochs between reconstruction / sample grids
SEED = 0                  # seeds the split, the shuffling, the augmentation and the weights
ROTATION = 10.0           # degrees, largest random rotation of a training image
AMP = "auto"              # autocast: "auto" (on where fast: bfloat16, float16 on old GPUs), on, off
COMPILE = False           # torch.compile the model (faster steps after a minute of compiling)
PRIOR_STEPS = 4000        # optimizer steps of the learned prior (stage two); 0 skips it
PRIOR_BATCH_SIZE = 32     # latents per step of the prior
PRIOR_LR = 1e-3           # learning rate of the prior, decayed to 0 along a cosine
PRIOR_WIDTH = 64          # channels of the prior's U-Net at the latent's resolution
PRIOR_GUIDE_STEPS = 1000  # optimizer steps of the prior's smaller guide (autoguidance); 0: none
PRIOR_GUIDE_WIDTH = 32    # channels of the guide's U-Net
MODEL_PATH = "vae_model.pth"   # where the final model (config + weights) is written
RESULTS_DIR = "vae_results"    # grids, metrics.jsonl, loss curve, resumable checkpoint
CACHE_DIR = DEFAULT_CACHE_DIR  # decoded images (~/.cache/vae_pokemon); delete it to free the room
# -----------------------------------------------------------------------------------------------
GRID_IMAGES = 8           # validation images shown in each reconstruction grid
STOP_CHECK = 20           # steps between the checks, under torchrun, that no process was stopped
# torchrun tells each process its place (a plain `python` run is 0 of 1); rank 0 alone speaks.
RANK, LOCAL_RANK = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
WORLD_SIZE, MASTER = int(os.environ.get("WORLD_SIZE", 1)), RANK == 0


def settings(args, device):
    """The settings this run uses, said in its first line: the flags, else this device's defaults
    (without a CUDA GPU the CPU's: 512 px costs 16x the work per image of 128 px)."""
    cpu = device.type != "cuda"
    unset = [f"--{key.replace('_', '-')}" for key in ("image_size", "epochs", "batch_size")
             if not getattr(args, key)]
    args.image_size = args.image_size or (CPU_IMAGE_SIZE if cpu else IMAGE_SIZE)
    args.epochs = args.epochs or (CPU_EPOCHS if cpu else EPOCHS)
    args.batch_size = args.batch_size or (CPU_BATCH_SIZE if cpu else BATCH_SIZE)
    # A GPU before compute capability 8.0 (T4, V100) has float16 tensor cores, no bfloat16 (8x
    # float32's speed on a T4): the VAE autocasts to float16 with a GradScaler, the prior not.
    old_gpu = device.type == "cuda" and not bf16_is_fast(device)
    args.use_amp = args.amp == "on" or (args.amp == "auto" and (old_gpu or bf16_is_fast(device)))
    args.amp_dtype = "float16" if old_gpu else "bfloat16"
    batch = f"batch {args.batch_size}"
    if WORLD_SIZE > 1:  # --batch-size is each process's, as in PyTorch's DDP and nanoGPT
        batch = f"{WORLD_SIZE} processes x batch {args.batch_size} = {WORLD_SIZE * args.batch_size}"
    line = f"device {device}: {args.image_size} px, {counted(args.epochs, 'epoch')}, {batch}"
    line += f", {args.amp_dtype} autocast" if args.use_amp else ""
    line += " with loss scaling" if args.use_amp and old_gpu else ""
    line += ", torch.compile" if args.compile else ""
    if cpu and unset:
        line += (f" (CPU defaults for {', '.join(unset)}; with a CUDA GPU: {IMAGE_SIZE} px, "
                 f"{EPOCHS} epochs, batch {BATCH_SIZE})")
    print(line)
    return args


# --- Several processes: one model trained by all, under torchrun (as in nanoGPT) -------------
def start_processes(name):
    """This process's device; under torchrun, joined to the others: NCCL for GPUs, else gloo."""
    if WORLD_SIZE == 1:
        return pick_device(name)
    if name not in ("auto", "cuda", "cpu"):
        raise UserError(f"under torchrun each process takes the GPU of its LOCAL_RANK, or the "
                        f"CPU; pass --device auto, cuda or cpu, not {name}")
    cuda = name != "cpu" and pick_device(name).type == "cuda"
    if cuda and LOCAL_RANK >= torch.cuda.device_count():
        raise UserError(f"torchrun started more processes on this machine than it has GPUs "
                        f"({torch.cuda.device_count()}); pass --nproc_per_node with at most that")
    device = torch.device(f"cuda:{LOCAL_RANK}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    # This attempt's keys only: those a lost attempt left in torchrun's store lead to dead peers.
    attempt = f"attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    store = dist.PrefixStore(attempt, next(dist.rendezvous("env://"))[0])
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=RANK,
                            world_size=WORLD_SIZE)
    if not MASTER:
        sys.stdout = open(os.devnull, "w")
    return device


def gathered(value):
    """Every process's `value`, in rank order (rank 0's machine alone has the run's files)."""
    values = [value] * WORLD_SIZE
    if WORLD_SIZE > 1:
        dist.all_gather_object(values, value)
    return values


# --- The data: decoded once into the cache, split, placed ---------------------------------
def load_data(args, device):
    """(training images and rows, on a GPU if they fit; validation images, on the device)"""
    files = image_files(args.data)
    path = cache_path(files, args.image_size, args.fit, args.data, args.cache_dir)
    # The cache's name keys the images: kept with the settings, a resumed run's must match.
    if MASTER and vars(args).setdefault("images", os.path.basename(path)) != os.path.basename(path):
        raise UserError(f"the images in {args.data} changed since this run started; put them back "
                        "as they were to resume it, or start a new run without --resume")
    # The first process of each machine decodes the images into its cache (a large folder takes
    # long: hours are allowed), while the others wait; then they all read that file.
    waiting = WORLD_SIZE > 1 and dist.new_group(backend="gloo", timeout=timedelta(hours=5))
    if waiting and LOCAL_RANK > 0:
        dist.barrier(waiting)
    images = cached_images(files, args.image_size, args.fit, args.data, args.cache_dir, path)
    if waiting and LOCAL_RANK == 0:
        dist.barrier(waiting)
    if MASTER:  # only now, so that a bad input changes no file
        os.makedirs(args.results_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    train_rows, val_rows = split(len(images), args.val_fraction, args.seed)
    print(f"{len(train_rows)} training and {len(val_rows)} validation images from {args.data}")
    val_images = images[val_rows].to(device)
    images, train_rows = place_images(images, train_rows, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls autocast leaves
    return images, train_rows, val_images


# --- One epoch of training --------------------------------------------------------------------
def train_one_epoch(model, images, index, augment, optimizer, scheduler, scaler, shuffle, args,
                    device, epoch, stop=()):
    """A shuffled pass over this process's share of images[index]: the mean MSE and KL per image."""
    order = torch.randperm(len(index), generator=shuffle)  # the same in every process
    # This process's share, equal for all: every WORLD_SIZE-th from its RANK (DistributedSampler).
    mine = order[list(DistributedSampler(order, WORLD_SIZE, RANK, shuffle=False))]
    batches = index[mine.to(index.device)].split(args.batch_size)
    sums = torch.zeros(2, device=device)  # read once at the end: an .item() a step waits for GPU
    for step, pick in enumerate(tqdm(batches, f"epoch {epoch}/{args.epochs}", leave=False,
                                     disable=not MASTER)):
        if WORLD_SIZE > 1 and step % STOP_CHECK == 0 and any(gathered(bool(stop))):
            return None  # torchrun kills its workers 30 s after Ctrl-C: no time to end the epoch
        x = to_model_range(augment(fetch(images, pick, device)))
        x = x.contiguous(memory_format=torch.channels_last)
        # bfloat16 keeps float32's range; float16's small one needs the loss scaled (scaler).
        with torch.autocast(device.type, getattr(torch, args.amp_dtype), enabled=args.use_amp):
            recon, mu, log_var = model(x)
        loss, mse, kl = vae_loss(recon.float(), x, mu.float(), log_var.float(), args.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # under DDP, the gradients are averaged over processes
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        sums += torch.stack([mse.detach(), kl.detach()])
    per_process = torch.stack(gathered(sums.cpu()))  # under torchrun: the mean of the processes'
    return (per_process.mean(0) / len(batches)).tolist()


# --- Evaluation and pictures ------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, images, device, kl_weight, batch_size=32):
    """Validation loss, MSE, KL and PSNR per image, decoding mu (the deterministic output)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in images.split(batch_size):
        x = to_model_range(batch.to(device)).contiguous(memory_format=torch.channels_last)
        mu, log_var = model.encode(x)
        recon = model.decode(mu)
        loss, mse, kl = vae_loss(recon, x, mu, log_var, kl_weight)
        values = [loss.item(), mse.item(), kl.item(), psnr(recon, x)]
        totals += torch.tensor(values, dtype=torch.float64) * len(x)
    model.train()
    return dict(zip(("val_loss", "val_mse", "val_kl", "val_psnr"), (totals / len(images)).tolist()))


@torch.no_grad()
def save_pictures(model, grid_images, noise, epoch, results_dir):
    # Originals on the top row, their reconstructions underneath; then samples of the same
    # fixed noise every time, so that successive grids show how the decoder develops.
    model.eval()
    x = to_model_range(grid_images).contiguous(memory_format=torch.channels_last)
    recon = model.decode(model.encode(x)[0])
    save_png(torch.cat([x, recon]), f"{results_dir}/recon_epoch_{epoch:03d}.png", len(x))
    save_png(model.decode(noise), f"{results_dir}/samples_epoch_{epoch:03d}.png")
    model.train()


def write_metrics(metrics, results_dir):
    lines = "".join(json.dumps(row) + "\n" for row in metrics)
    atomic_write(f"{results_dir}/metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))


def plot_loss_curve(metrics, results_dir):
    import matplotlib.pyplot as plt  # here, not at the top: --help answers without it
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in metrics]
    for key, label in (("train_mse", "train reconstruction (summed MSE)"), ("train_kl", "train "
                       "KL (nats)"), ("val_loss", "val loss (MSE + weight x KL)")):
        left.plot(epochs, [row[key] for row in metrics], label=label)
    left.set(xlabel="epoch", ylabel="per image", yscale="log", title="Loss")
    left.legend()
    right.plot(epochs, [row["val_psnr"] for row in metrics])
    right.set(xlabel="epoch", ylabel="dB", title="Validation PSNR (decoding mu)")
    fig.tight_layout()
    path = os.path.join(results_dir, "loss_curve.png")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# --- Stage two: a learned prior over the trained VAE's latent space ---------------------------
def stage_two(model, images, index, args, device, stop, noise):
    """Fit the prior, then its smaller guide, to the latent means (not samples: the decoder ignores
    the posterior's noise) of the training images and their mirrors, not of augmented ones (the
    prior would draw their tilted frames and grey backgrounds). False on Ctrl-C."""
    tick, mus = time.perf_counter(), []
    model.eval()
    with torch.no_grad():
        for pick in index.split(32):
            batch = images[pick].to(device)
            for x in (batch, batch.flip(-1)):
                x = to_model_range(x).contiguous(memory_format=torch.channels_last)
                mus.append(model.encode(x)[0])
    mus = torch.cat(mus).float()
    generator, fits = torch.Generator().manual_seed(args.seed), []
    for width, steps, what in ((args.prior_width, args.prior_steps, "learned prior"),
                               (args.prior_guide_width, args.prior_guide_steps, "its guide")):
        try:
            fit = fit_prior(mus, width, steps, args.prior_batch_size, args.prior_lr, generator,
                            args.use_amp and args.amp_dtype == "bfloat16", stop,
                            f"stage two: {what}") if steps else None
        except FloatingPointError as error:
            raise UserError(f"{error}; lower --prior-lr (now {args.prior_lr})") from None
        if stop:
            print(f"interrupted in stage two; the VAE is saved in {args.out}; to train its prior, "
                  f"run `{resume_command(args)}`", file=sys.stderr)
            return False
        fits.append(fit)
    checkpoint = vae_checkpoint(model, *fits)
    checkpoint["prior"]["seconds"] = time.perf_counter() - tick  # for benchmarks/bench_samples.py
    save_checkpoint(checkpoint, args.out)
    with torch.no_grad():
        samples = model.decode(sample_prior(fits[0], noise, guide=fits[1]))
    save_png(samples, f"{args.results_dir}/samples_learned_prior.png")
    print(f"learned prior done in {(time.perf_counter() - tick) / 60:.1f} min; "
          f"saved with the VAE to {args.out}")
    return True


# --- The run: the pieces above, in the order the data meets them ------------------------------
def train(args):
    """Train the VAE, then its prior; returns the exit status (130 after Ctrl-C)."""
    device = start_processes(args.device)
    checkpoint_path = os.path.join(args.results_dir, "checkpoint.pth")
    # Restarted by torchrun (--max-restarts) after a lost worker: on from the last checkpoint.
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        args.resume = args.resume or gathered(os.path.isfile(checkpoint_path))[0]
    args, resumed = resume_settings(args, checkpoint_path) if args.resume else (args, None)
    args = settings(args, device)
    if resumed and gathered(MASTER and finished(args, resumed))[0]:
        print(f"the run in {args.results_dir} is finished, its model in {args.out}: nothing left "
              "to do (new prior flags would train its prior again)")
        return 0
    check_writable(args.out, "--out")
    check_writable(checkpoint_path, "--results-dir")
    images, train_rows, val_images = load_data(args, device)
    model = VAE(args.image_size, args.latent_channels, args.channels, args.fit)
    model = model.to(device, memory_format=torch.channels_last)  # NHWC: cuDNN's, oneDNN's choice
    if RANK:  # the same weights in every process, but each its own augmentation and noise
        torch.manual_seed(args.seed + RANK)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * math.ceil(math.ceil(len(train_rows) / WORLD_SIZE) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, steps,
                                                    pct_start=args.warmup)
    # float16 overflows above 65504. The loss is summed over every pixel, so GradScaler's default
    # first scale, 2^16, overflows for a dozen steps; it settles at 2^17 / pixels (measured).
    scaler = torch.amp.GradScaler(device.type, 2.0 ** 17 / args.image_size ** 2,
                                  enabled=args.use_amp and args.amp_dtype == "float16")
    shuffle = torch.Generator().manual_seed(args.seed)
    saved_epoch, metrics = 0, []
    if resumed:  # everything that changes during training, so that the run goes on exactly
        for part, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler")):
            part.load_state_dict(resumed[key])
        scaler.load_state_dict(resumed.get("scaler") or scaler.state_dict())
        shuffle.set_state(resumed["shuffle_state"])
        torch.set_rng_state(resumed.get("rng_states", [resumed.get("rng_state")])[RANK])
        saved_epoch, metrics = resumed["epoch"], resumed["metrics"]
        print(f"resuming after epoch {saved_epoch} of {args.epochs} from {checkpoint_path}")
    step_model = torch.compile(model) if args.compile else model  # the same weights, compiled
    if WORLD_SIZE > 1:  # DDP averages the gradients over the processes as backward makes them
        step_model = DDP(step_model, device_ids=[device.index] if device.type == "cuda" else None)
    side = args.image_size // 8
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"latent {args.latent_channels} x {side} x {side}")
    augment = make_augment(args.rotation, args.fit, args.image_size)
    noise_seed = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(16, args.latent_channels, side, side, generator=noise_seed).to(device)
    stop = stop_on_signals()
    started = time.perf_counter() - (metrics[-1]["elapsed_s"] if metrics else 0.0)

    for epoch in range(saved_epoch + 1, args.epochs + 1):
        # Train: one shuffled pass over the training images, augmented, timed alone.
        tick = time.perf_counter()
        losses = train_one_epoch(step_model, images, train_rows, augment, optimizer, scheduler,
                                 scaler, shuffle, args, device, epoch, stop)
        seconds, states = time.perf_counter() - tick, gathered(torch.get_rng_state())
        if MASTER and losses:  # one process evaluates, reports and saves; the others go on
            # Evaluate: the validation images, never augmented, reconstructed from mu.
            row = {"epoch": epoch, "train_mse": losses[0], "train_kl": losses[1],
                   **evaluate(model, val_images, device, args.kl_weight),
                   "images_per_s": len(train_rows) / seconds,
                   "elapsed_s": time.perf_counter() - started}
            check_finite(row, model, args, epoch)
            # Report: a line here, a row in metrics.jsonl, the grids every --save-every epochs.
            metrics.append(row)
            print(f"epoch {epoch:3d}/{args.epochs}  train mse {row['train_mse']:8.1f}  kl "
                  f"{row['train_kl']:7.1f}  val loss {row['val_loss']:8.1f}  val psnr "
                  f"{row['val_psnr']:5.2f} dB  {row['images_per_s']:5.1f} img/s")
            write_metrics(metrics, args.results_dir)
            if epoch % args.save_every == 0 or epoch == args.epochs:
                save_pictures(model, val_images[:GRID_IMAGES], noise, epoch, args.results_dir)
            # Save: everything needed to continue exactly here after a crash or Ctrl-C.
            save_checkpoint({**vae_checkpoint(model), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                             "epoch": epoch, "metrics": metrics, "world_size": WORLD_SIZE,
                             "shuffle_state": shuffle.get_state(), "rng_states": states,
                             "args": vars(args)}, checkpoint_path)
        if losses is None or any(gathered(bool(stop))):  # all processes stop at the same step
            done = epoch if losses else epoch - 1  # None: stopped within the epoch (torchrun)
            saved = "epoch 1 is" if done == 1 else f"epochs 1-{done} are"
            go_on = f"{saved} saved in {checkpoint_path}: continue with `{resume_command(args)}`"
            if MASTER:
                print(f"interrupted after epoch {done}; " + (go_on if done else "start it again"),
                      file=sys.stderr)
            return 130

    if not MASTER:  # rank 0 alone trains the prior (small: one GPU's work) and saves the model
        return 0
    plot_loss_curve(metrics, args.results_dir)
    save_checkpoint(vae_checkpoint(model), args.out)  # first: Ctrl-C in stage two costs no VAE
    print(f"VAE done in {metrics[-1]['elapsed_s'] / 60:.1f} min: val PSNR "
          f"{metrics[-1]['val_psnr']:.2f} dB, val KL {metrics[-1]['val_kl']:.0f} nats per image; "
          f"saved to {args.out}")
    if args.prior_steps and not stage_two(model, images, train_rows, args, device, stop, noise):
        return 130
    print(f"pictures and metrics in {args.results_dir}/")
    return 0


# --- Faults: divergence, resuming, Ctrl-C (not needed to follow the VAE) ----------------------
def check_finite(row, model, args, epoch):
    """A non-finite loss or weight is never saved: the last good checkpoint stays as it is."""
    finite = all(w.isfinite().all() for w in model.parameters())
    if finite and all(map(math.isfinite, row.values())):
        return
    raise UserError(f"training diverged in epoch {epoch} (loss "
                    f"{row['train_mse'] + row['train_kl']:g}, val loss {row['val_loss']:g}); lower "
                    f"--lr (now {args.lr}) or --kl-weight (now {args.kl_weight}) and start again; "
                    f"the checkpoint of epoch {epoch - 1} is kept in {args.results_dir}")


def resume_settings(args, checkpoint_path):
    """(settings, checkpoint) to resume; only device, folders, --out, prior flags may change."""
    try:
        checkpoint = gathered(load_checkpoint(checkpoint_path) if MASTER else None)[0]
    except (FileNotFoundError, CheckpointError):
        raise UserError(f"there is no resumable checkpoint at {checkpoint_path}; "
                        "start a new run without --resume") from None
    if checkpoint.get("world_size", 1) != WORLD_SIZE:  # each process's share and random draws
        raise UserError(f"this run was trained by {checkpoint.get('world_size', 1)} process(es); "
                        f"resume it with as many, not {WORLD_SIZE}, or start a new run")
    defaults = vars(parse_args([]))
    given = {key: value for key, value in vars(args).items() if value != defaults[key]}
    fresh = {k: v for k, v in given.items() if k == "out" or k.startswith("prior_")}
    fresh.update(device=args.device, resume=True, results_dir=args.results_dir,
                 cache_dir=args.cache_dir)
    ignored = [f"--{key.replace('_', '-')}" for key in sorted(given.keys() - fresh.keys())
               if given[key] != checkpoint["args"].get(key, given[key])]
    if ignored:
        raise UserError(f"a resumed run keeps the settings it started with; drop "
                        f"{', '.join(ignored)}, or start a new run without --resume")
    args = argparse.Namespace(**{**vars(args), **checkpoint["args"], **fresh})
    args.new_prior = any(key.startswith("prior_") for key in fresh)
    return args, checkpoint


def finished(args, checkpoint):
    """Nothing left to resume: all epochs done, the model saved, its prior too unless none asked."""
    try:  # a model file that is gone or damaged is written again
        prior = load_checkpoint(args.out).get("prior")
    except (FileNotFoundError, CheckpointError):
        return False
    done = checkpoint["epoch"] == args.epochs
    return done and (args.prior_steps == 0 or prior is not None and not args.new_prior)


def resume_command(args):
    where = f" --results-dir {shlex.quote(args.results_dir)}"
    start = "python" if WORLD_SIZE == 1 else "torchrun [the same options]"
    return f"{start} train_vae.py --resume" + (where if args.results_dir != RESULTS_DIR else "")


# --- Command line: every setting above has a flag, and the constant is its default ------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a convolutional VAE on Pokémon images, then a "
                                "learned prior.", formatter_class=HelpWithDefaults)
    add = p.add_argument
    by_gpu = "{}; default {} with a CUDA GPU, {} without".format
    add("--data", default=DATASET, help="Hub data set name or local image folder")
    add("--epochs", type=positive_int, help=by_gpu("passes over the data", EPOCHS, CPU_EPOCHS))
    add("--image-size", type=multiple_of_8, help=by_gpu("px", IMAGE_SIZE, CPU_IMAGE_SIZE))
    add("--fit", choices=["pad", "crop"], default=FIT, help="pad (artwork) or crop (photos)")
    add("--batch-size", type=positive_int, help=by_gpu("images a step", BATCH_SIZE, CPU_BATCH_SIZE))
    add("--lr", type=positive_float, default=LEARNING_RATE, help="peak learning rate")
    add("--warmup", type=fraction, default=WARMUP, help="share of the steps spent warming up")
    add("--kl-weight", type=zero_or_positive, default=KL_WEIGHT, help="weight of the KL term")
    add("--latent-channels", type=positive_int, default=LATENT_CHANNELS, help="at H/8 x W/8")
    add("--channels", type=channel_list, default=CHANNELS, help="widths at 1/2, 1/4, 1/8 size")
    add("--val-fraction", type=fraction, default=VAL_FRACTION, help="share held out to validate")
    add("--rotation", type=angle, default=ROTATION, help="degrees, largest random rotation")
    add("--save-every", type=positive_int, default=SAVE_EVERY, help="epochs between picture grids")
    add("--amp", choices=["auto", "on", "off"], default=AMP, help="bfloat16 (float16) autocast")
    add("--compile", action=argparse.BooleanOptionalAction, default=COMPILE, help="torch.compile")
    add("--prior-steps", type=steps_or_0, default=PRIOR_STEPS, help="prior steps; 0: none")
    add("--prior-batch-size", type=positive_int, default=PRIOR_BATCH_SIZE, help="latents a step")
    add("--prior-lr", type=positive_float, default=PRIOR_LR, help="the prior's, decayed to 0")
    add("--prior-width", type=unet_width, default=PRIOR_WIDTH, help="channels of the prior's U-Net")
    add("--prior-guide-steps", type=steps_or_0, default=PRIOR_GUIDE_STEPS, help="0 trains none")
    add("--prior-guide-width", type=unet_width, default=PRIOR_GUIDE_WIDTH, help="the guide's")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    add("--seed", type=int, default=SEED, help="seeds the split, shuffling, augmentation, weights")
    add("--out", default=MODEL_PATH, help="where to save the final model")
    add("--results-dir", default=RESULTS_DIR, help="grids, metrics, loss curve, checkpoint.pth")
    add("--cache-dir", default=CACHE_DIR, help="where the decoded images are kept between runs")
    add("--resume", action="store_true", help="continue the run saved in --results-dir")
    return p.parse_args(argv)


def main():
    try:
        return train(parse_args())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
