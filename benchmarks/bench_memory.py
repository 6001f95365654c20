"""
Memory and start-up time of train_vae.py on folders of your own size: K x 703 Pokémon.

    python benchmarks/bench_memory.py --data ../shared/pokemon --copies 1 4 12 --sizes 256 128

For each K it builds a folder of K hard links to every image of --data under distinct names
(no copies: the disk holds the images once), then runs `train_vae.py --epochs 1 --prior-steps 0
--device cpu` on it twice with an empty image cache: the first run decodes every image into the
cache and is stopped when its epoch starts; the second finds the cache and trains its epoch (or
the first --epoch-seconds of it). It samples RssAnon in /proc/PID/status every 20 ms, the
resident memory that is the process's own: it leaves out the page cache that the memory-mapped
image cache occupies, which the kernel can drop at any time. Prints one Markdown table. Linux only.
--repo runs the train_vae.py of another checkout (one without the cache decodes on both runs).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = re.compile(r"epoch 1/1:.*?\|\s*(\d+)/\d+ \[")


def folder_of_copies(data, copies, root, copy):
    """root/{copies}x: `copies` of every image of `data`, made by copy(source, target, k) under
    distinct names, built once (a folder cut short by a stop is built again)."""
    folder = os.path.join(root, f"{copies}x")
    if not os.path.isdir(folder):
        names = sorted(name for name in os.listdir(data) if not name.startswith("."))
        os.makedirs(folder + ".part", exist_ok=True)
        for k in range(copies):
            for name in names:
                target = os.path.join(folder + ".part", f"{k:02d}_{name}")
                if not os.path.exists(target):
                    copy(os.path.join(data, name), target, k)
        os.rename(folder + ".part", folder)
    return folder


def linked_folder(data, copies, root):
    """A folder of `copies` hard links to every image of `data`: the disk holds them once."""
    return folder_of_copies(data, copies, root, lambda source, target, k: os.link(source, target))


def rss_anon(pid):
    """RssAnon of a process in bytes, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def run(repo, folder, size, cache, work, epoch_seconds):
    """One train_vae.py run; stopped at its first epoch's start if epoch_seconds is 0. Returns
    (s until the epoch started, peak RssAnon before it, peak over the epoch, epoch images/s)."""
    command = [sys.executable, os.path.join(repo, "train_vae.py"), "--data", folder, "--image-size", str(size),
               "--epochs", "1", "--prior-steps", "0", "--device", "cpu", "--batch-size", "2",
               "--results-dir", os.path.join(work, "results"), "--out", os.path.join(work, "model.pth")]
    with open(command[1]) as script:
        if "--cache-dir" in script.read():  # a checkout with the image cache
            command += ["--cache-dir", cache]
    tick = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work)
    peaks, started, batches, rate = [0, 0], [], [], []

    def sample():
        while proc.poll() is None:
            phase = 1 if started else 0
            peaks[phase] = max(peaks[phase], rss_anon(proc.pid))
            if started and epoch_seconds is not None and time.perf_counter() - started[0] > epoch_seconds:
                proc.kill()
            time.sleep(0.02)

    def read_progress():  # tqdm's bar on stderr: (time, batches done) of the epoch under way
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            for part in re.split(rb"[\r\n]", chunk):
                if match := BATCH.search(part.decode(errors="replace")):
                    batches.append((time.perf_counter(), int(match.group(1))))

    threads = [threading.Thread(target=target, daemon=True) for target in (sample, read_progress)]
    for thread in threads:
        thread.start()
    for line in proc.stdout:
        line = line.decode()
        if line.startswith("model:"):  # printed just before the first epoch
            started.append(time.perf_counter())
        if match := re.search(r"epoch\s+1/1 .* ([\d.]+) img/s", line):
            rate.append(float(match.group(1)))
    proc.wait()
    for thread in threads:
        thread.join(timeout=5)
    if not started:
        raise SystemExit(f"train_vae.py stopped before its epoch: {proc.returncode}")
    if not rate and len(batches) > 1:  # stopped within the epoch: the rate of the batches it did
        (t0, n0), (t1, n1) = batches[0], batches[-1]
        rate.append(2 * (n1 - n0) / (t1 - t0))
    return started[0] - tick, peaks[0], peaks[1], rate[0] if rate else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data", default="../shared/pokemon")
    p.add_argument("--copies", type=int, nargs="+", default=[1, 4, 12])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    p.add_argument("--epoch-seconds", type=float, help="time only the first seconds of the epoch (default: all)")
    p.add_argument("--repo", default=ROOT, help="the checkout whose train_vae.py runs")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "vae_bench_memory"),
                   help="where the folders of links and the caches go")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    print("| images | px | first run: s to epoch | peak anon | second run: s to epoch | peak anon | "
          "over the epoch | epoch images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for copies in args.copies:
        folder = linked_folder(args.data, copies, args.work)
        count = len(os.listdir(folder))
        for size in args.sizes:
            cache = os.path.join(args.work, "cache")
            shutil.rmtree(cache, ignore_errors=True)
            first = run(args.repo, folder, size, cache, args.work, 0)
            second = run(args.repo, folder, size, cache, args.work, args.epoch_seconds)
            print(f"| {count:,} | {size} | {first[0]:.1f} | {first[1] / 1e9:.2f} GB | {second[0]:.1f} | "
                  f"{second[1] / 1e9:.2f} GB | {second[2] / 1e9:.2f} GB | {second[3]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
