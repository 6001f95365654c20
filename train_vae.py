"""
Train the VAE of vae_model.py on Pokémon images, then a learned prior over its latents.

    python train_vae.py                          # the Hugging Face Hub data set
    python train_vae.py --data path/to/folder    # any folder of images, offline
    torchrun --standalone --nproc_per_node 4 train_vae.py   # one model, 4 GPUs (DDP)

Read top to bottom: settings, data, an epoch, evaluation, stage two (the prior of
latent_prior.py), and train(), which runs them in that order (report.py writes what each
epoch shows); faults; the command line. What the processes under torchrun ask of each
other is in distributed.py: every process makes each call, each a statement of its own.
"""
import argparse
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import distributed
from cli import (HelpWithDefaults, Parser, UserError, angle, bf16_is_fast, channel_list,
                 check_batch, check_writable, counted, folder_lock, fraction, multiple_of_8,
                 out_of_memory, positive_float, positive_int, run_main, say_few_steps,
                 steps_or_0, stop_on_signals, typed_flags, unet_width, zero_or_positive)
from distributed import MASTER, RANK, WORLD_SIZE
from image_data import (DEFAULT_CACHE_DIR, cache_path, cached_images, fetch, image_files,
                        images_key, make_augment, place_images, save_png, split,
                        to_model_range)
from latent_prior import fit_prior, latent_means, sample_prior
from report import plot_loss_curve, report
from resume import (finished, restore, resume_command, resume_settings, say_interrupted,
                    training_checkpoint)
from vae_api import encode_means, latent_atlas
from vae_model import VAE, psnr, save_checkpoint, vae_checkpoint, vae_loss

# --------------------------------------------------------------------------------------
DATASET = "svjack/pokemon-blip-captions-en-zh"  # Hub data set, or a folder of images
IMAGE_SIZE = 512          # px, side of the square training image (with a CUDA GPU)
FIT = "pad"               # to square: "pad" with white (artwork), "crop" (photos)
EPOCHS = 200              # passes over the training images (with a CUDA GPU)
CPU_IMAGE_SIZE = 128      # px, instead of IMAGE_SIZE without a CUDA GPU (CPU, Apple GPU)
CPU_EPOCHS = 80           # instead of EPOCHS without a CUDA GPU
BATCH_SIZE = 8            # images per optimizer step (with a CUDA GPU)
CPU_BATCH_SIZE = 2        # instead of BATCH_SIZE without a CUDA GPU: more, smaller steps
LEARNING_RATE = 2e-3      # peak learning rate of the one-cycle schedule
WARMUP = 0.3              # share of the steps in which the learning rate climbs
KL_WEIGHT = 0.02          # weight of the KL term against the summed reconstruction error
LATENT_CHANNELS = 6       # at H/8 x W/8: more are sharper, fewer easier to model
CHANNELS = [32, 64, 128]  # widths at 1/2, 1/4, 1/8 of the image size (decoder: mirrored)
VAL_FRACTION = 0.05       # share of images held out, never augmented, for validation
SAVE_EVERY = 10           # epochs between reconstruction / sample grids
SEED = 0                  # seeds the split, the shuffling, the augmentation, the weights
ROTATION = 10.0           # degrees, largest random rotation of a training image
AMP = "auto"              # autocast: auto (where fast: bfloat16, float16), on, off
COMPILE = False           # torch.compile the model (faster steps, a minute to compile)
PRIOR_STEPS = 4000        # optimizer steps of the learned prior (stage two); 0 skips it
PRIOR_BATCH_SIZE = 32     # latents per step of the prior
PRIOR_LR = 1e-3           # learning rate of the prior, decayed to 0 along a cosine
PRIOR_WIDTH = 64          # channels of the prior's U-Net at the latent's resolution
PRIOR_GUIDE_STEPS = 1000  # steps of the prior's smaller guide (autoguidance); 0: none
PRIOR_GUIDE_WIDTH = 32    # channels of the guide's U-Net
MODEL_PATH = "vae_model.pth"   # where the final model (config + weights) is written
RESULTS_DIR = "vae_results"    # grids, metrics.jsonl, loss curve, resumable checkpoint
CACHE_DIR = DEFAULT_CACHE_DIR  # decoded images (~/.cache/vae_pokemon), to delete freely
# --------------------------------------------------------------------------------------
GRID_IMAGES = 8           # validation images shown in each reconstruction grid
STOP_CHECK = 20           # steps between the checks, under torchrun, that none stopped


def settings(args, device):
    """The settings this run uses, said in its first line: the flags, else this device's
    defaults (without a CUDA GPU the CPU's: 512 px is 16x the work an image of 128 px)."""
    cpu = device.type != "cuda"
    on_gpu = {"--image-size": f"{IMAGE_SIZE} px", "--epochs": f"{EPOCHS} epochs",
              "--batch-size": f"batch {BATCH_SIZE}"}  # the defaults with a CUDA GPU
    unset = [flag for flag in on_gpu if not getattr(args, flag[2:].replace("-", "_"))]
    args.image_size = args.image_size or (CPU_IMAGE_SIZE if cpu else IMAGE_SIZE)
    args.epochs = args.epochs or (CPU_EPOCHS if cpu else EPOCHS)
    args.batch_size = args.batch_size or (CPU_BATCH_SIZE if cpu else BATCH_SIZE)
    # A GPU before compute capability 8.0 (T4, V100) has float16 tensor cores, not
    # bfloat16 (8x float32's speed on a T4): the VAE autocasts to float16 there.
    old_gpu = device.type == "cuda" and not bf16_is_fast(device)
    fast = old_gpu or bf16_is_fast(device)
    args.use_amp = args.amp == "on" or (args.amp == "auto" and fast)
    args.amp_dtype = "float16" if old_gpu else "bfloat16"
    batch = f"batch {args.batch_size}"
    if WORLD_SIZE > 1:  # --batch-size is each process's, as in PyTorch's DDP and nanoGPT
        total = WORLD_SIZE * args.batch_size
        batch = f"{WORLD_SIZE} processes x batch {args.batch_size} = {total}"
    epochs = counted(args.epochs, "epoch")
    line = f"device {device}: {args.image_size} px, {epochs}, {batch}"
    line += f", {args.amp_dtype} autocast" if args.use_amp else ""
    line += " with loss scaling" if args.use_amp and old_gpu else ""
    line += ", torch.compile" if args.compile else ""
    if cpu and unset:  # the defaults in use, and what a CUDA GPU would use instead
        gpu = ", ".join(on_gpu[flag] for flag in unset)
        line += f" (CPU defaults for {', '.join(unset)}; with a CUDA GPU: {gpu})"
    print(line)
    return args


# --- The data: decoded once into the cache, split, placed -----------------------------
def load_data(args, device):
    """(training images and rows, on a GPU if they fit; validation images on the device)"""
    files = image_files(args.data)
    # A run knows its images by their names in the folder and their bytes, not by where
    # the folder lies: a copy on a cluster's scratch disk is the same run.
    key = images_key(files, args.data)
    if str(vars(args).get("images")).endswith(".npy"):  # a version that knew their place
        args.images = key
    if vars(args).setdefault("images", key) != key:
        raise UserError(f"the images in {args.data} are not those this run started "
                        "with; pass --data with the folder that holds them, or put them "
                        "back as they were, to resume it, or start a new run without --resume")
    path = cache_path(key, args.image_size, args.fit, args.data, args.cache_dir)
    size, fit = args.image_size, args.fit
    images = distributed.machine_first(
        lambda: cached_images(files, size, fit, args.data, args.cache_dir, path))
    torch.manual_seed(args.seed)
    train_rows, val_rows = split(len(images), args.val_fraction, args.seed)
    print(f"{len(train_rows)} training and {len(val_rows)} validation images from {args.data}")
    val_images = images[val_rows].to(device)
    images, train_rows = place_images(images, train_rows, device)
    if device.type == "cuda":  # TF32 for the float32 matmuls that autocast leaves
        torch.set_float32_matmul_precision("high")
    return images, train_rows, val_images


# --- One epoch of training ------------------------------------------------------------
def my_share(index, shuffle):
    """This process's share of the epoch's shuffled order of index: every WORLD_SIZE-th
    image from its RANK, the same count for all (DistributedSampler); or all of it."""
    order = torch.randperm(len(index), generator=shuffle)  # the same in every process
    mine = order[list(DistributedSampler(order, WORLD_SIZE, RANK, shuffle=False))]
    return index[mine.to(index.device)]


def train_one_epoch(model, images, index, epoch, *, optimizer, scheduler, scaler,
                    augment, shuffle, args, device, stop=()):
    """A shuffled pass over this process's share of images[index]: the mean MSE and KL
    per image, averaged over the processes; None when they agreed to stop within it."""
    model.train()
    batches = my_share(index, shuffle).split(args.batch_size)
    sums = torch.zeros(2, device=device)  # read once at the end: .item() waits for a GPU
    progress = tqdm(batches, f"epoch {epoch}/{args.epochs}", leave=False, disable=not MASTER)
    for step, pick in enumerate(progress):
        # torchrun kills its workers 30 s after Ctrl-C: no time to end the epoch. (One
        # process ends it: its check is at the epoch's end.)
        if WORLD_SIZE > 1 and step % STOP_CHECK == 0:
            verdict = distributed.agree(stopped=bool(stop))
            if verdict != distributed.GOING:
                return None
        x = to_model_range(augment(fetch(images, pick, device)))
        x = x.contiguous(memory_format=torch.channels_last)
        # bfloat16 keeps float32's range; float16's small one needs the loss scaled.
        dtype = getattr(torch, args.amp_dtype)
        with torch.autocast(device.type, dtype, enabled=args.use_amp):
            recon, mu, log_var = model(x)
        recon, mu, log_var = recon.float(), mu.float(), log_var.float()
        loss, mse, kl = vae_loss(recon, x, mu, log_var, args.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # under DDP, the gradients are averaged over processes
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        sums += torch.stack([mse.detach(), kl.detach()])
    means = distributed.mean_over_processes(sums.cpu() / len(batches))
    return means.tolist()


# --- Evaluation and pictures ----------------------------------------------------------
@torch.no_grad()
def evaluate(model, images, device, kl_weight, batch_size=32):
    """Validation loss, MSE, KL and PSNR per image, decoding mu (the deterministic one)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in images.split(batch_size):
        x = to_model_range(batch.to(device))
        x = x.contiguous(memory_format=torch.channels_last)
        mu, log_var = model.encode(x)
        recon = model.decode(mu)
        loss, mse, kl = vae_loss(recon, x, mu, log_var, kl_weight)
        values = [loss.item(), mse.item(), kl.item(), psnr(recon, x)]
        totals += torch.tensor(values, dtype=torch.float64) * len(x)
    model.train()
    means = (totals / len(images)).tolist()
    return dict(zip(("val_loss", "val_mse", "val_kl", "val_psnr"), means))


# --- Stage two: a learned prior over the trained VAE's latent space -------------------
def stage_two(model, images, index, args, device, stop, noise, atlas):
    """Fit the prior, then its guide, to the training images' latent means; False on Ctrl-C."""
    tick = time.perf_counter()
    batches = (to_model_range(images[pick].to(device)) for pick in index.split(32))
    mus = latent_means(model, batches)
    generator, fits = torch.Generator().manual_seed(args.seed), []
    use_amp = args.use_amp and args.amp_dtype == "bfloat16"
    fits_to_make = ((args.prior_width, args.prior_steps, "learned prior"),
                    (args.prior_guide_width, args.prior_guide_steps, "its guide"))
    for width, steps, what in fits_to_make:
        try:
            fit = fit_prior(mus, width, steps, args.prior_batch_size, args.prior_lr,
                            generator, use_amp, stop, f"stage two: {what}") if steps else None
        except FloatingPointError as error:
            raise UserError(f"{error}; lower --prior-lr (now {args.prior_lr})") from None
        if stop:
            again = resume_command(args, RESULTS_DIR)
            print(f"interrupted in stage two; the VAE is saved in {args.out}; to train "
                  f"its prior, run `{again}`", file=sys.stderr)
            return False
        fits.append(fit)
    checkpoint = vae_checkpoint(model, *fits, atlas=atlas)
    checkpoint["prior"]["seconds"] = time.perf_counter() - tick  # for bench_samples.py
    save_checkpoint(checkpoint, args.out)
    with torch.no_grad():
        samples = model.decode(sample_prior(fits[0], noise, guide=fits[1]))
    save_png(samples, f"{args.results_dir}/samples_learned_prior.png")
    print(f"learned prior done in {(time.perf_counter() - tick) / 60:.1f} min; "
          f"saved with the VAE to {args.out}")
    return True


# --- The run: the pieces above, in the order the data meets them ----------------------
def train(args):
    """Train the VAE, then its prior; returns the exit status (130 after Ctrl-C)."""
    typed = vars(args).pop("typed", set())
    device = distributed.join(args.device)
    checkpoint_path = os.path.join(args.results_dir, "checkpoint.pth")
    # Restarted by torchrun (--max-restarts) after a lost worker: on from the checkpoint. Each
    # machine's torchrun counts its own restarts: if any process was restarted, all were.
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    if distributed.any_process(restart):
        saved = distributed.from_rank0(os.path.isfile(checkpoint_path))
        args.resume = args.resume or saved
    resumed = None
    if args.resume:
        args, resumed = resume_settings(args, typed, checkpoint_path)
    args = settings(args, device)
    if resumed:
        if distributed.from_rank0(MASTER and finished(args, resumed)):
            print(f"the run in {args.results_dir} is finished, its model in {args.out}: "
                  "nothing left to do (new prior flags would train its prior again)")
            return 0
    check_writable(args.out, "--out")
    check_writable(checkpoint_path, "--results-dir")
    with folder_lock(args.results_dir, "--results-dir", hold=MASTER):  # one run a folder
        return train_and_save(args, device, resumed, checkpoint_path)


def train_and_save(args, device, resumed, checkpoint_path):
    images, train_rows, val_images = load_data(args, device)
    check_batch(args.batch_size, len(train_rows), WORLD_SIZE)
    model = VAE(args.image_size, args.latent_channels, args.channels, args.fit)
    model = model.to(device, memory_format=torch.channels_last)  # NHWC, cuDNN's choice
    if RANK:  # the same weights in every process, but each its own augmentation, noise
        torch.manual_seed(args.seed + RANK)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    share = math.ceil(len(train_rows) / WORLD_SIZE)  # each process's images an epoch
    steps = args.epochs * math.ceil(share / args.batch_size)
    say_few_steps(steps, args.epochs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, steps,
                                                    pct_start=args.warmup)
    # float16 overflows above 65504: the scaler multiplies the loss into its range, and
    # skips the steps whose gradients overflow while it finds its scale (a dozen at the
    # start here, where the loss is summed over every pixel).
    float16 = args.use_amp and args.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(device.type, enabled=float16)
    shuffle = torch.Generator().manual_seed(args.seed)
    saved_epoch, metrics = 0, []
    if resumed:  # everything that changes in training: the run goes on exactly
        state = (model, optimizer, scheduler, scaler, shuffle)
        saved_epoch, metrics = restore(resumed, *state, device)
        print(f"resuming after epoch {saved_epoch} of {args.epochs} from {checkpoint_path}")
    step_model = torch.compile(model) if args.compile else model  # same weights, compiled
    if WORLD_SIZE > 1:  # DDP averages the gradients over the processes during backward
        gpu = [device.index] if device.type == "cuda" else None
        step_model = DDP(step_model, device_ids=gpu)
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
        losses = train_one_epoch(step_model, images, train_rows, epoch, optimizer=optimizer,
                                 scheduler=scheduler, scaler=scaler, augment=augment,
                                 shuffle=shuffle, args=args, device=device, stop=stop)
        seconds = time.perf_counter() - tick
        rng_states = distributed.rng_states(device)
        failure = None
        if MASTER and losses is not None:  # one process evaluates, reports and saves
            try:
                # Evaluate: the validation images, not augmented, reconstructed from mu.
                row = {"epoch": epoch, "train_mse": losses[0], "train_kl": losses[1],
                       **evaluate(model, val_images, device, args.kl_weight),
                       "images_per_s": len(train_rows) / seconds,
                       "elapsed_s": time.perf_counter() - started}
                check_finite(row, model, args, epoch)
                metrics.append(row)
                report(row, metrics, model, val_images[:GRID_IMAGES], noise, args)
                # Save: everything needed to go on exactly here after a crash or Ctrl-C.
                checkpoint = training_checkpoint(model, optimizer, scheduler, scaler, shuffle,
                                                 rng_states, epoch, metrics, args)
                save_checkpoint(checkpoint, checkpoint_path)
            except Exception as error:  # the others learn of it just below, and end too
                failure = error
        verdict = distributed.agree(stopped=bool(stop), failure=failure)
        if failure is not None:
            raise failure
        if verdict == distributed.FAILED:
            raise distributed.FailedElsewhere()
        if losses is None or verdict == distributed.STOPPED:  # all stop at the same step
            say_interrupted(epoch if losses else epoch - 1, checkpoint_path, args, RESULTS_DIR)
            return 130

    status = 0
    if MASTER:  # rank 0 alone trains the prior (small: one GPU's work), saves the model
        status = finish(model, images, train_rows, metrics, args, device, stop, noise)
    status = distributed.wait_for_rank0(status)
    return status


def finish(model, images, train_rows, metrics, args, device, stop, noise):
    """Rank 0's work after the last epoch: the VAE saved, then stage two; exit status."""
    plot_loss_curve(metrics, args.results_dir)
    to_come = "to train" if args.prior_steps else "none asked"  # said by sample_vae.py
    atlas = latent_atlas(encode_means(model, images[train_rows]))  # for explore_vae.py
    save_checkpoint(vae_checkpoint(model, prior_status=to_come, atlas=atlas), args.out)
    last = metrics[-1]
    print(f"VAE done in {last['elapsed_s'] / 60:.1f} min: val PSNR {last['val_psnr']:.2f} "
          f"dB, val KL {last['val_kl']:.0f} nats per image; saved to {args.out}")
    if args.prior_steps:
        if not stage_two(model, images, train_rows, args, device, stop, noise, atlas):
            return 130
    print(f"pictures and metrics in {args.results_dir}/")
    return 0


# --- Faults: divergence (not needed to follow the VAE; resuming and Ctrl-C: resume.py) --
def check_finite(row, model, args, epoch):
    """A non-finite loss or weight is never saved: the last good checkpoint stays."""
    finite = all(w.isfinite().all() for w in model.parameters())
    if finite and all(map(math.isfinite, row.values())):
        return
    loss = row["train_mse"] + row["train_kl"]
    raise UserError(f"training diverged in epoch {epoch} (loss {loss:g}, val loss "
                    f"{row['val_loss']:g}); lower --lr (now {args.lr}) or --kl-weight "
                    f"(now {args.kl_weight}) and start again; the checkpoint of epoch "
                    f"{epoch - 1} is kept in {args.results_dir}")


# --- Command line: every setting above has a flag, and the constant is its default ----
def parse_args(argv=None):
    p = Parser(description="Train a convolutional VAE on Pokémon images, then a learned prior.",
               formatter_class=HelpWithDefaults)
    add = p.add_argument
    by_gpu = "{}; default {} with a CUDA GPU, {} without".format
    add("--data", default=DATASET, help="Hub data set name or local image folder")
    add("--epochs", type=positive_int, help=by_gpu("passes over the data", EPOCHS, CPU_EPOCHS))
    add("--image-size", type=multiple_of_8, help=by_gpu("px", IMAGE_SIZE, CPU_IMAGE_SIZE))
    add("--fit", choices=["pad", "crop"], default=FIT, help="pad (artwork) or crop (photos)")
    add("--batch-size", type=positive_int,
        help=by_gpu("images a step", BATCH_SIZE, CPU_BATCH_SIZE))
    add("--lr", type=positive_float, default=LEARNING_RATE, help="peak learning rate")
    add("--warmup", type=fraction, default=WARMUP, help="share of the steps spent warming up")
    add("--kl-weight", type=zero_or_positive, default=KL_WEIGHT, help="weight of the KL term")
    add("--latent-channels", type=positive_int, default=LATENT_CHANNELS, help="at H/8 x W/8")
    add("--channels", type=channel_list, default=CHANNELS, help="widths at 1/2, 1/4, 1/8 size")
    add("--val-fraction", type=fraction, default=VAL_FRACTION, help="share held out to validate")
    add("--rotation", type=angle, default=ROTATION, help="degrees, largest random rotation")
    add("--save-every", type=positive_int, default=SAVE_EVERY, help="epochs between grids")
    add("--amp", choices=["auto", "on", "off"], default=AMP, help="bfloat16 (float16) autocast")
    add("--compile", action=argparse.BooleanOptionalAction, default=COMPILE,
        help="torch.compile")
    add("--prior-steps", type=steps_or_0, default=PRIOR_STEPS, help="prior steps; 0: none")
    add("--prior-batch-size", type=positive_int, default=PRIOR_BATCH_SIZE,
        help="latents a step")
    add("--prior-lr", type=positive_float, default=PRIOR_LR, help="the prior's, decayed to 0")
    add("--prior-width", type=unet_width, default=PRIOR_WIDTH,
        help="channels of the prior's U-Net")
    add("--prior-guide-steps", type=steps_or_0, default=PRIOR_GUIDE_STEPS,
        help="0 trains none")
    add("--prior-guide-width", type=unet_width, default=PRIOR_GUIDE_WIDTH, help="the guide's")
    add("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    add("--seed", type=int, default=SEED, help="seeds the split, shuffling, augmentation, weights")
    add("--out", default=MODEL_PATH, help="where to save the final model")
    add("--results-dir", default=RESULTS_DIR, help="grids, metrics, loss curve, checkpoint.pth")
    add("--cache-dir", default=CACHE_DIR, help="where the decoded images are kept between runs")
    add("--resume", action="store_true", help="continue the run saved in --results-dir")
    args = p.parse_args(argv)
    args.typed = typed_flags(p, argv)  # --resume compares what was typed, not defaults
    return args


def main():
    args = parse_args()
    try:
        status = train(args)
    except Exception as error:
        error = out_of_memory(error, args) or error  # a sentence with what to try
        said_elsewhere = not distributed.speaks(error)
        distributed.leave(failed=True)
        if said_elsewhere:
            sys.exit(2)  # another process failed, and said why
        raise error
    distributed.leave()
    return status


if __name__ == "__main__":
    run_main(main)
