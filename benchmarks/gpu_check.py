"""
The GPU check: one short, prepared run that says what the default GPU setting (512 px, 200
epochs, batch 8, then the learned prior over the 64 x 64 latent) costs on a machine with one
CUDA GPU, in under 8 minutes from a fresh clone:

    python3 -m venv .venv && . .venv/bin/activate
    python benchmarks/gpu_check.py --data path/to/images    # or no --data: the Hub data set

In order: installs requirements.txt (and pytest), runs the test suite, decodes the images,
trains the VAE for a fixed budget at 512 px and at 128 px, times the learned prior and its
guide over the 512-px latent, draws 16 samples at 512 px, and trains 2 epochs at 128 px under
torchrun with one process, then with every GPU where there are several (NCCL proven). It prints images/s at both
sizes, peak GPU memory, the prior's steps/s and the projected wall time of the full default
run; everything goes to --out: log.txt, results.json, samples_512.png.

    python benchmarks/gpu_check.py --cpu --data FOLDER --out DIR   # a small CPU mode, which the tests run

The CPU mode skips the install and the tests, and measures 32 and 16 px for a second or two.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = 60          # s, training budget at each image size (the first epoch is a warm-up, not counted)
PRIOR_STEPS = 100     # prior (and guide) steps timed over the 512-px latent, after 5 of warm-up
CPU_SIZES = (32, 16)  # px, the CPU mode's stand-ins for 512 and 128
CPU_SECONDS = 1       # s, the CPU mode's budget at each size
CPU_PRIOR_STEPS = 3   # the CPU mode's timed prior steps


class Log:
    """print() to the screen and to log.txt, as it happens (a killed run keeps what it said)."""

    def __init__(self, path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, *parts):
        text = " ".join(map(str, parts))
        print(text, flush=True)
        self.file.write(text + "\n")

    def run(self, *command):
        """A subprocess whose output goes to the screen and log.txt; returns its exit status."""
        self(f"$ {' '.join(command)}")
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            print(line, end="", flush=True)
            self.file.write(line)
        return process.wait()


def train_for(seconds, images, size, batch_size, device, log):
    """Whole epochs of the default recipe (its learning-rate schedule planned for 200 epochs)
    until `seconds` have passed, at least two; images/s of all epochs but the first, which
    pays for cuDNN's and the allocator's warm-up. Returns (model, its training images, images/s,
    seconds of one evaluation)."""
    import torch
    import image_data
    import train_vae
    from vae_model import VAE
    args = train_vae.parse_args(["--image-size", str(size), "--batch-size", str(batch_size),
                                 "--epochs", str(train_vae.EPOCHS)])
    args = train_vae.settings(args, device)  # its precision: bfloat16, float16 (old GPUs) or none
    train_rows, val_rows = image_data.split(len(images), args.val_fraction, args.seed)
    val_images = images[val_rows].to(device)
    images, train_rows = image_data.place_images(images, train_rows, device)
    log(f"{size} px: {len(train_rows)} training images "
        f"{'on the GPU' if images.device.type == 'cuda' else 'in host memory'}, batch {batch_size}, "
        f"{args.amp_dtype if args.use_amp else 'no'} autocast")
    model = VAE(size, args.latent_channels, args.channels).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(train_rows) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, steps, pct_start=args.warmup)
    augment, shuffle = image_data.make_augment(args.rotation), torch.Generator().manual_seed(args.seed)
    scaler = torch.amp.GradScaler(device.type, enabled=args.use_amp and args.amp_dtype == "float16")
    started, timed, counted, epoch = time.perf_counter(), 0.0, 0, 0
    while epoch < 2 or time.perf_counter() - started < seconds:
        epoch += 1
        tick = time.perf_counter()
        mse, kl = train_vae.train_one_epoch(model, images, train_rows, epoch, optimizer=optimizer,
                                            scheduler=scheduler, scaler=scaler, augment=augment,
                                            shuffle=shuffle, args=args, device=device)  # .tolist() at its end waits for the GPU
        if epoch > 1:
            timed, counted = timed + time.perf_counter() - tick, counted + len(train_rows)
    tick = time.perf_counter()
    val = train_vae.evaluate(model, val_images, device, args.kl_weight)
    evaluate_s = time.perf_counter() - tick
    log(f"{size} px: {epoch} epochs in {time.perf_counter() - started:.0f} s, {counted / timed:.1f} images/s "
        f"after the first; train mse {mse:.0f}, val PSNR {val['val_psnr']:.2f} dB")
    return model, images[train_rows], counted / timed, evaluate_s


def time_prior(codes, width, steps, use_amp):
    """(steps/s, the fitted prior) of fit_prior over `codes`, after a few steps of warm-up."""
    import torch
    from latent_prior import fit_prior
    generator = torch.Generator().manual_seed(0)
    fit_prior(codes, width, 5, 32, 1e-3, generator, use_amp, desc="warm-up")
    if codes.is_cuda:
        torch.cuda.synchronize()
    tick = time.perf_counter()
    prior = fit_prior(codes, width, steps, 32, 1e-3, generator, use_amp, desc=f"prior of width {width}")
    return steps / (time.perf_counter() - tick), prior  # fit_prior reads its last loss: the GPU is done


def measure(args, log):
    import torch
    import cli
    import image_data
    import train_vae
    from latent_prior import sample_prior
    device = torch.device("cpu" if args.cpu else "cuda")
    big, small = CPU_SIZES if args.cpu else (train_vae.IMAGE_SIZE, 128)
    seconds = CPU_SECONDS if args.cpu else args.seconds
    prior_steps = CPU_PRIOR_STEPS if args.cpu else args.prior_steps
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as train_vae.py does
        log(f"GPU: {torch.cuda.get_device_name(device)}, {torch.cuda.mem_get_info(device)[1] / 2**30:.0f} GiB; "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    files = image_data.image_files(args.data)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "data": args.data}
    tick = time.perf_counter()
    images = {size: image_data.cached_images(files, size, "pad", args.data, image_data.DEFAULT_CACHE_DIR)
              for size in (big, small)}
    results["decode_s"] = time.perf_counter() - tick
    log(f"{len(images[big])} images decoded at {big} and {small} px in {results['decode_s']:.0f} s")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, train_images, results["images_per_s_big"], evaluate_s = train_for(
        seconds, images[big], big, train_vae.BATCH_SIZE, device, log)
    results["peak_gpu_memory_gb"] = (torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda"
                                     else None)
    results["images_per_s_small"] = train_for(seconds, images[small], small, train_vae.BATCH_SIZE, device, log)[2]

    # Stage two over the big latent: the latent means of the training images and their mirrors.
    with torch.no_grad():
        model.eval()
        codes = torch.cat([model.encode(image_data.to_model_range(x).contiguous(memory_format=torch.channels_last))[0]
                           for batch in train_images.split(32) for x in (batch, batch.flip(-1))]).float()
    use_amp = cli.bf16_is_fast(device)  # the prior's autocast is bfloat16's, as in train_vae.py
    results["prior_steps_per_s"], prior = time_prior(codes, train_vae.PRIOR_WIDTH, prior_steps, use_amp)
    results["guide_steps_per_s"], guide = time_prior(codes, train_vae.PRIOR_GUIDE_WIDTH, prior_steps, use_amp)
    log(f"learned prior over the {tuple(codes.shape[1:])} latent: {prior.config['levels']} levels, "
        f"{results['prior_steps_per_s']:.2f} steps/s; its guide {results['guide_steps_per_s']:.2f} steps/s")
    tick = time.perf_counter()
    noise = torch.randn((16,) + tuple(codes.shape[1:]), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        samples = model.decode(sample_prior(prior, noise, 4 if args.cpu else 200, guide))
    image_data.save_png(samples, os.path.join(args.out, f"samples_{big}.png"))
    results["sample_16_s"] = time.perf_counter() - tick
    log(f"16 samples at {big} px in {results['sample_16_s']:.1f} s (a VAE and prior trained for seconds: "
        f"the path, not the quality): {args.out}/samples_{big}.png")

    # The full default run: 200 epochs with an evaluation each, then the prior and its guide.
    n_train = len(train_images)
    vae_s = train_vae.EPOCHS * (n_train / results["images_per_s_big"] + evaluate_s)
    prior_s = (train_vae.PRIOR_STEPS / results["prior_steps_per_s"]
               + train_vae.PRIOR_GUIDE_STEPS / results["guide_steps_per_s"])
    results.update(evaluate_s=evaluate_s, projected_vae_min=vae_s / 60, projected_prior_min=prior_s / 60,
                   projected_total_min=(vae_s + prior_s + results["decode_s"]) / 60, train_images=n_train)
    memory = (f"{results['peak_gpu_memory_gb']:.2f} GB" if results["peak_gpu_memory_gb"] is not None
              else f"n/a on the CPU (peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB)")
    log("")
    log("| measure | value |")
    log("|---|---|")
    log(f"| images/s at {big} px, batch {train_vae.BATCH_SIZE} | {results['images_per_s_big']:.1f} |")
    log(f"| images/s at {small} px, batch {train_vae.BATCH_SIZE} | {results['images_per_s_small']:.1f} |")
    log(f"| peak GPU memory at {big} px | {memory} |")
    log(f"| learned prior steps/s (its guide), batch 32 | {results['prior_steps_per_s']:.2f} "
        f"({results['guide_steps_per_s']:.2f}) |")
    log(f"| projected full default run ({train_vae.EPOCHS} epochs of {n_train} images, then "
        f"{train_vae.PRIOR_STEPS} + {train_vae.PRIOR_GUIDE_STEPS} prior steps) | "
        f"{results['projected_total_min']:.0f} min "
        f"(VAE {results['projected_vae_min']:.0f}, prior {results['projected_prior_min']:.0f}) |")
    return results


def check_torchrun(args, log):
    """A few seconds of train_vae.py under torchrun: one process, then every GPU where there are
    several, so that NCCL (gloo in the CPU mode) is proven here. {processes: images/s or None}."""
    import torch
    counts = [1] if args.cpu or torch.cuda.device_count() < 2 else [1, torch.cuda.device_count()]
    size = CPU_SIZES[1] if args.cpu else 128
    speeds, data = {}, os.path.abspath(args.data) if os.path.isdir(args.data) else args.data
    for n in counts:
        out = os.path.abspath(os.path.join(args.out, f"torchrun_{n}"))  # torchrun runs in ROOT
        status = log.run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                         "train_vae.py", "--data", data, "--epochs", "2", "--image-size", str(size),
                         "--prior-steps", "0", "--results-dir", out, "--out", os.path.join(out, "m.pth"),
                         *(["--device", "cpu"] if args.cpu else []))
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))] if status == 0 else []
        speeds[n] = rows[-1]["images_per_s"] if rows else None
        log(f"torchrun, {n} process(es): {'exit status %d' % status if status else 'trained'}"
            + (f", {speeds[n]:.1f} images/s at {size} px in its second epoch" if rows else ""))
    return speeds


def main():
    p = argparse.ArgumentParser(description="The prepared GPU check: tests, speed, memory, a projected run.")
    p.add_argument("--data", default=None, help="a folder of images (default: train_vae.py's Hub data set)")
    p.add_argument("--out", default="gpu_check", help="folder for log.txt, results.json and the sample grid")
    p.add_argument("--seconds", type=float, default=SECONDS, help="training budget at each image size")
    p.add_argument("--prior-steps", type=int, default=PRIOR_STEPS, help="timed steps of the prior and its guide")
    p.add_argument("--cpu", action="store_true", help="the small CPU mode: no install, no tests, tiny sizes")
    p.add_argument("--no-setup", action="store_true", help="skip the install and the test suite")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "log.txt"))
    log(f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv[1:])}")
    started, tests = time.perf_counter(), None
    if not (args.cpu or args.no_setup):
        if log.run(sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt", "pytest"):
            log("error: pip could not install requirements.txt; see above")
            sys.exit(2)
        tests = log.run(sys.executable, "-m", "pytest", "-q")
    sys.path.insert(0, ROOT)
    import torch  # only now: the install above may have brought it
    import cli
    import train_vae
    if not args.cpu and not torch.cuda.is_available():
        log("error: no CUDA GPU is visible to torch here; run on a machine with one, or pass --cpu")
        sys.exit(2)
    args.data = args.data or train_vae.DATASET
    try:
        results = measure(args, log)
        results["torchrun_images_per_s"] = check_torchrun(args, log)
    except cli.UserError as error:
        log(f"error: {error}")
        sys.exit(2)
    results.update(tests_exit_status=tests, wall_min=(time.perf_counter() - started) / 60)
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump(results, file, indent=1)
    log(f"test suite: {'skipped' if tests is None else 'passed' if tests == 0 else f'FAILED (exit {tests})'}; "
        f"wall time {results['wall_min']:.1f} min; all in {args.out}/")
    sys.exit(1 if tests or None in results["torchrun_images_per_s"].values() else 0)


if __name__ == "__main__":
    main()
