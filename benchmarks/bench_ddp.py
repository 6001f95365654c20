"""
Training across processes (train_vae.py under torchrun, DDP): measured on this machine's CPUs
with gloo, projected for GPUs and machines from the gradient's size.

    python benchmarks/bench_ddp.py --data ../shared/pokemon --out /tmp/bench_ddp

Three parts, each a set of real runs of train_vae.py (none writes into the repository):
  speed    one process with 2 threads against 2 processes (torchrun) with 1 thread each, at the
           same global batch: images/s, and the time of one all-reduce of the gradient (timed
           alone under torchrun) as a share of a step. Then the projection: images/s and
           efficiency for 1-8 GPUs of one machine and for 2 and 4 machines, from the gradient's
           bytes, a ring all-reduce at named bandwidths, and an assumed GPU step time.
  quality  the same two, --epochs EPOCHS at 128 px: val PSNR and KL after the same epochs.
  lr       one process at 4x the global batch with the learning rate kept, x2 (square root of
           the batch ratio) and x4 (linear), against the default batch: val PSNR after EPOCHS.
Everything is printed as Markdown tables and written to OUT/results.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 20                # epochs of the quality and lr parts (one-cycle schedule over them)
SPEED_EPOCHS = 3           # epochs of the speed part; the first is not counted (warm-up)
ALLREDUCES = 50            # all-reduces timed in the speed part, after 5 of warm-up
# The projection's assumptions, named in its table (no GPU at hand when this was written).
GPU_STEP_FLOP = 399e9      # FLOP of a training step of batch 8 at 512 px (torch's FlopCounterMode)
GPU_FLOPS = 40e12          # assumed FLOP/s a GPU achieves on it (bfloat16, small convolutions)
BANDWIDTH = {"NVLink": 150e9, "PCIe 4.0": 12e9, "25 Gbit/s": 2.8e9, "100 Gbit/s": 11e9}  # B/s
LATENCY = {"NVLink": 10e-6, "PCIe 4.0": 20e-6, "25 Gbit/s": 50e-6, "100 Gbit/s": 30e-6}  # s/hop


def run(command, threads, log):
    """A command with OMP_NUM_THREADS=threads; its wall time. Output to the log file only."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    tick = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if status:
        sys.exit(f"error: {' '.join(command)} failed (exit {status}); see {log}")
    return time.perf_counter() - tick


def train(args, name, processes, batch, epochs, *flags):
    """train_vae.py at 128 px with `processes` processes of `batch` images each; its metrics."""
    folder = os.path.join(args.out, name)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    command = launcher + ["train_vae.py", "--data", args.data, "--device", "cpu", "--image-size", "128",
                          "--epochs", str(epochs), "--batch-size", str(batch), "--prior-steps", "0",
                          "--results-dir", folder, "--out", os.path.join(folder, "m.pth"),
                          "--cache-dir", os.path.join(args.out, "cache"), *flags]
    wall = run(command, 2 // processes, os.path.join(args.out, f"{name}.log"))
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    return {"wall_s": wall, "images_per_s": sum(r["images_per_s"] for r in rows[1:]) / max(1, len(rows) - 1),
            "val_psnr": rows[-1]["val_psnr"], "val_kl": rows[-1]["val_kl"]}


def allreduce_worker(out):
    """Under torchrun: the time of one all-reduce of a tensor the size of the VAE's gradient."""
    import torch
    import torch.distributed as dist
    sys.path.insert(0, ROOT)
    from vae_model import VAE
    dist.init_process_group("gloo")
    gradient = torch.ones(sum(p.numel() for p in VAE(128).parameters()))
    for _ in range(5):
        dist.all_reduce(gradient)
    dist.barrier()
    tick = time.perf_counter()
    for _ in range(ALLREDUCES):
        dist.all_reduce(gradient)
    seconds = (time.perf_counter() - tick) / ALLREDUCES
    if dist.get_rank() == 0:
        json.dump({"allreduce_s": seconds, "gradient_bytes": gradient.numel() * 4}, open(out, "w"))
    dist.destroy_process_group()


def ring_allreduce_s(nbytes, n, link):
    """A ring all-reduce: 2 (n - 1) steps, each sending nbytes / n over the slowest link."""
    return 2 * (n - 1) * (nbytes / n / BANDWIDTH[link] + LATENCY[link]) if n > 1 else 0.0


def projection(nbytes, log):
    step = GPU_STEP_FLOP / GPU_FLOPS
    log(f"\nProjected, batch 8 per GPU at 512 px: a step of {step * 1e3:.0f} ms (assumed: "
        f"{GPU_STEP_FLOP / 1e9:.0f} GFLOP at {GPU_FLOPS / 1e12:.0f} TFLOP/s), a gradient of "
        f"{nbytes / 1e6:.1f} MB, a ring all-reduce not overlapped with the backward pass (DDP overlaps it: "
        "a floor on efficiency)\n")
    log("| GPUs | link (bandwidth, latency a hop) | all-reduce ms | images/s | efficiency |")
    log("|---|---|---|---|---|")
    rows = [(1, "NVLink")] + [(n, link) for n in (2, 4, 8) for link in ("NVLink", "PCIe 4.0")]
    rows += [(n, link) for n in (2, 4) for link in ("25 Gbit/s", "100 Gbit/s")]
    table = []
    for n, link in rows:
        reduce_s = ring_allreduce_s(nbytes, n, link)
        where = ("one machine" if n == 1 else f"{n} machines, one GPU each, {link}" if "bit" in link
                 else f"one machine, {link}")
        images = 8 * n / (step + reduce_s)
        table.append({"gpus": n, "link": link, "allreduce_ms": reduce_s * 1e3, "images_per_s": images,
                      "efficiency": step / (step + reduce_s)})
        log(f"| {n} | {where}" + (f" ({BANDWIDTH[link] / 1e9:g} GB/s, {LATENCY[link] * 1e6:.0f} us)" if n > 1 else "")
            + f" | {reduce_s * 1e3:.2f} | {images:.0f} | {step / (step + reduce_s):.0%} |")
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "pokemon"), help="folder of images")
    p.add_argument("--out", default="bench_ddp", help="folder for the runs, logs and results.json")
    p.add_argument("--parts", nargs="+", default=["speed", "quality", "lr"], choices=["speed", "quality", "lr"])
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of the quality and lr parts")
    p.add_argument("--allreduce-worker", metavar="FILE", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.allreduce_worker:
        return allreduce_worker(args.allreduce_worker)
    args.out, args.data = os.path.abspath(args.out), os.path.abspath(args.data)
    os.makedirs(args.out, exist_ok=True)
    lines, results = [], {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}

    def log(text):
        print(text, flush=True)
        lines.append(text)
    if "speed" in args.parts:
        one = train(args, "speed_1x2", 1, 2, SPEED_EPOCHS)
        two = train(args, "speed_2x1", 2, 1, SPEED_EPOCHS)
        file = os.path.join(args.out, "allreduce.json")
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
             "--allreduce-worker", file], 1, os.path.join(args.out, "allreduce.log"))
        reduce = json.load(open(file))
        step_s = 2 / two["images_per_s"]
        log(f"\nSpeed at 128 px, global batch 2, epochs 2-{SPEED_EPOCHS} of {SPEED_EPOCHS}\n")
        log("| processes x threads | batch per process | images/s | all-reduce, share of a step |")
        log("|---|---|---|---|")
        log(f"| 1 x 2 | 2 | {one['images_per_s']:.1f} | - |")
        log(f"| 2 x 1 (gloo) | 1 | {two['images_per_s']:.1f} | {reduce['allreduce_s'] * 1e3:.1f} ms of "
            f"{step_s * 1e3:.0f} ms ({reduce['allreduce_s'] / step_s:.0%}) |")
        results["speed"] = {"one_process": one, "two_processes": two, **reduce, "step_s": step_s,
                            "projection": projection(reduce["gradient_bytes"], log)}
    if "quality" in args.parts:
        one = train(args, "quality_1x2", 1, 2, args.epochs)
        two = train(args, "quality_2x1", 2, 1, args.epochs)
        log(f"\nQuality at 128 px, global batch 2, {args.epochs} epochs\n")
        log("| processes x batch | val PSNR dB | val KL | wall min |")
        log("|---|---|---|---|")
        for name, row in (("1 x 2", one), ("2 x 1", two)):
            log(f"| {name} | {row['val_psnr']:.2f} | {row['val_kl']:.0f} | {row['wall_s'] / 60:.1f} |")
        results["quality"] = {"one_process": one, "two_processes": two}
    if "lr" in args.parts:
        base = results.get("quality", {}).get("one_process") or train(args, "quality_1x2", 1, 2, args.epochs)
        runs = {f"batch 8, lr {lr:g}": train(args, f"lr_{lr:g}", 1, 8, args.epochs, "--lr", str(lr))
                for lr in (2e-3, 4e-3, 8e-3)}
        log(f"\nLearning rate at 4x the global batch, 128 px, {args.epochs} epochs\n")
        log("| global batch, peak lr | val PSNR dB | val KL | wall min |")
        log("|---|---|---|---|")
        for name, row in {"batch 2, lr 0.002 (default)": base, **runs}.items():
            log(f"| {name} | {row['val_psnr']:.2f} | {row['val_kl']:.0f} | {row['wall_s'] / 60:.1f} |")
        results["lr"] = runs
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump({**results, "tables": lines}, file, indent=1)


if __name__ == "__main__":
    main()
