"""
Time-to-quality benchmark: the original project's recipe (the baseline) against this project's, same budget.

    python benchmarks/bench_train.py --data ../shared/pokemon --image-size 128 --minutes 10

Each recipe trains for the same wall-clock budget in its own process (so peak memory is its
own), with its one-cycle schedule stretched over that budget, on the same train/validation
split. Both are evaluated on the same validation tensors, prepared the baseline's way (a plain,
aspect-distorting resize: less white border, the harder test). Prints a Markdown table.

A model trained by train_vae.py is scored on the same validation tensors with

    python benchmarks/bench_train.py --data ../shared/pokemon --evaluate vae_model.pth

Variants of the project's recipe (an ablation) run the same way, e.g.

    python benchmarks/bench_train.py --data ../shared/pokemon --minutes 3 \
        --recipes project project:norm=batch project:up=transpose project:res=off
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T  # the baseline's v1 transforms, as it used them
from torchvision.transforms.v2.functional import pil_to_tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import image_data  # noqa: E402
import train_vae  # noqa: E402
from vae_model import VAE, CheckpointError, ResBlock, load_vae, psnr, vae_loss  # noqa: E402

KL_WEIGHT = 0.1   # the baseline's objective: summed MSE + 0.1 x KL
WARMUP_STEPS = 5  # untimed steps before the clock starts
TICKS = 10_000    # the one-cycle schedule advances once per 1/TICKS of the time budget


# ---------------------------------------------------------------------------------------
# The baseline: the original project's recipe, rebuilt from its description
# ---------------------------------------------------------------------------------------

class BaselineVAE(nn.Module):
    def __init__(self, latent=4):
        super().__init__()
        def down(i, o):
            return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.LeakyReLU(0.2)]
        def up(i, o):
            return [nn.ConvTranspose2d(i, o, 3, stride=2, padding=1, output_padding=1),
                    nn.BatchNorm2d(o), nn.LeakyReLU(0.2)]
        self.encoder = nn.Sequential(*down(3, 64), *down(64, 128), *down(128, 256))
        self.mu, self.log_var = nn.Conv2d(256, latent, 1), nn.Conv2d(256, latent, 1)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(latent, 256, 1), *up(256, 128), *up(128, 64),
                                     *up(64, 3), nn.Tanh())

    def encode(self, x):
        h = self.encoder(x)
        return self.mu(h), self.log_var(h)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        mu, log_var = self.encode(x)
        return self.decode(VAE.reparameterize(mu, log_var)), mu, log_var


class BaselineFiles(torch.utils.data.Dataset):
    """Decodes every image from its file on every access, as the baseline does."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(image_data.open_rgb(self.paths[i]))


def baseline_transforms(size, augment):
    steps = [T.Resize((size, size))]
    if augment:
        steps += [T.RandomHorizontalFlip(), T.RandomRotation(10), T.ColorJitter(0.2, 0.2, 0.2, 0.1)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


# ---------------------------------------------------------------------------------------
# One recipe, in its own process
# ---------------------------------------------------------------------------------------

def file_split(folder, val_fraction=train_vae.VAL_FRACTION, seed=train_vae.SEED):
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(names) * val_fraction))
    paths = [os.path.join(folder, names[i]) for i in order]
    return paths[n_val:], paths[:n_val]


def batches_baseline(paths, size, batch_size, augment=None):
    loader = torch.utils.data.DataLoader(BaselineFiles(paths, baseline_transforms(size, True)),
                                         batch_size=batch_size, shuffle=True, num_workers=0)
    while True:
        yield from loader


def batches_project(paths, size, batch_size, augment):
    images = torch.stack([pil_to_tensor(image_data.to_square(image_data.open_rgb(p), size)) for p in paths])
    while True:
        order = torch.randperm(len(images))
        for start in range(0, len(images) - batch_size + 1, batch_size):
            x = image_data.to_model_range(augment(images[order[start:start + batch_size]]))
            yield x.contiguous(memory_format=torch.channels_last)


def ablate(model, options):
    """The project's model with one of its design choices undone, for the README's ablation:
    norm=batch (BatchNorm2d for every GroupNorm), up=transpose (a stride-2 ConvTranspose2d for
    every nearest-upsample + conv), res=off (every residual block removed)."""
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for i, layer in enumerate(module):
            if options.get("norm") == "batch" and isinstance(layer, nn.GroupNorm):
                module[i] = nn.BatchNorm2d(layer.num_channels)
            elif options.get("res") == "off" and isinstance(layer, ResBlock):
                module[i] = nn.Identity()
            elif options.get("up") == "transpose" and isinstance(layer, nn.Upsample):
                conv = module[i + 1]
                module[i] = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 3, stride=2,
                                               padding=1, output_padding=1)
                module[i + 1] = nn.Identity()
    return model


def recipe(spec, size):
    """Model, batch size, learning rate, warm-up share, batch source, loss and autocast flag of
    one recipe. `spec` is "baseline", "project", or "project:key=value,..." for an ablation of the
    project's recipe, with keys lr, batch, amp (on/off), rotation (degrees), channels (e.g.
    32/64/128), latent (latent channels), norm=batch, up=transpose, res=off (see ablate)."""
    name, _, options = spec.partition(":")
    if name == "baseline":
        model = BaselineVAE()
        def loss_fn(recon, x, mu, log_var):  # summed over the whole batch, as the baseline does
            mse = F.mse_loss(recon, x, reduction="sum")
            kl = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp())
            return mse + KL_WEIGHT * kl
        return model, 8, 1e-3, 0.3, batches_baseline, loss_fn, False, None  # 0.3: OneCycleLR's default
    o = dict(item.split("=") for item in options.split(",") if item)
    channels = [int(c) for c in o.get("channels", "/".join(map(str, train_vae.CHANNELS))).split("/")]
    latent = int(o.get("latent", train_vae.LATENT_CHANNELS))
    model = ablate(VAE(size, latent, channels), o).to(memory_format=torch.channels_last)
    amp = o.get("amp", "on" if cli.bf16_is_fast(torch.device("cpu")) else "off") == "on"
    augment = image_data.make_augment(float(o.get("rotation", train_vae.ROTATION)))
    def loss_fn(recon, x, mu, log_var):
        return vae_loss(recon.float(), x, mu.float(), log_var.float(), train_vae.KL_WEIGHT)[0]
    return (model, int(o.get("batch", train_vae.CPU_BATCH_SIZE)), float(o.get("lr", train_vae.LEARNING_RATE)),
            train_vae.WARMUP, batches_project, loss_fn, amp, augment)


@torch.no_grad()
def evaluate(model, val):
    model.eval()
    mu, log_var = model.encode(val)
    recon = model.decode(mu).float()
    n = len(val)
    mse = F.mse_loss(recon, val, reduction="sum").item() / n
    kl = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp()).item() / n
    return {"val_psnr": psnr(recon, val), "val_kl": kl, "val_objective": mse + KL_WEIGHT * kl}


def validation_tensors(data, size):
    """The held-out images of file_split, stretched to size x size the baseline's way, in [-1, 1]."""
    transform = baseline_transforms(size, False)
    return torch.stack([transform(image_data.open_rgb(p)) for p in file_split(data)[1]])


def one_cycle(optimizer, lr, warmup):
    """train_vae.py's OneCycleLR, stretched over the time budget instead of a step count: a count
    planned from the first seconds' step rate comes out wrong when the machine's speed drifts."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=TICKS + 1, pct_start=warmup)


def follow_clock(scheduler, fraction):
    """Advance the schedule to `fraction` of the time budget, however many steps that skips."""
    while scheduler.last_epoch < int(fraction * TICKS):
        scheduler.step()


def run_recipe(name, data, size, minutes, seed):
    torch.manual_seed(seed)
    train_paths, _ = file_split(data)
    val = validation_tensors(data, size)
    model, batch_size, lr, warmup, batches, loss_fn, amp, augment = recipe(name, size)
    source = batches(train_paths, size, batch_size, augment)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            recon, mu, log_var = model(x)
        loss = loss_fn(recon, x, mu, log_var)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Warm up: the FLOPs of one step, then a few steps that pay one-time costs (kernel
    # selection, first allocations) before the clock starts; they do not count.
    x = next(source)
    with FlopCounterMode(display=False) as counter:
        step(x)
    flops_per_step = counter.get_total_flops()
    for _ in range(WARMUP_STEPS):
        step(next(source))
    model.load_state_dict(recipe(name, size)[0].state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

    model.train()
    data_time, steps, started = 0.0, 0, time.perf_counter()
    budget = minutes * 60
    scheduler = one_cycle(optimizer, lr, warmup)
    while (fraction := (time.perf_counter() - started) / budget) < 1:
        follow_clock(scheduler, fraction)
        tick = time.perf_counter()
        x = next(source)
        data_time += time.perf_counter() - tick
        step(x)
        steps += 1
    seconds = time.perf_counter() - started
    return {"recipe": name, "amp": amp, "images_per_s": steps * batch_size / seconds,
            "epochs": steps * batch_size / len(train_paths), "steps": steps, "lr": lr, "seconds": seconds,
            "data_wait_fraction": data_time / seconds,
            "gflops": flops_per_step * steps / seconds / 1e9,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **evaluate(model, val)}


def matmul_gflops(n=2048, repeats=10, dtype=torch.float32):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    tick = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - tick) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of each recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", nargs="+", default=["baseline", "project"],
                   help='"baseline", "project", or an ablation such as "project:lr=2e-3,amp=off"')
    p.add_argument("--evaluate", metavar="MODEL",
                   help="instead of training, score a model saved by train_vae.py on the same validation images")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one recipe, print JSON
    args = p.parse_args()
    if args.evaluate:
        try:
            model = load_vae(args.evaluate)
        except (FileNotFoundError, CheckpointError) as error:
            print(f"error: cannot score {args.evaluate} ({error}); give a model saved by train_vae.py",
                  file=sys.stderr)
            sys.exit(2)
        r = evaluate(model, validation_tensors(args.data, model.image_size))
        print(f"{args.evaluate} ({model.image_size} px) on the benchmark's validation images: "
              f"val PSNR {r['val_psnr']:.2f} dB, val KL / image {r['val_kl']:.0f} nats, "
              f"val objective / image {r['val_objective']:.0f}")
        return
    if args.one:
        print(json.dumps(run_recipe(args.one, args.data, args.image_size, args.minutes, args.seed)))
        return
    # A bf16 matmul on a CPU without bf16 instructions is emulated and takes minutes: measure it only
    # where train_vae.py would turn bf16 autocast on.
    peak = matmul_gflops()
    peak_bf16 = matmul_gflops(dtype=torch.bfloat16) if cli.bf16_is_fast(torch.device("cpu")) else None
    rows = []
    for name in args.recipes:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--data", args.data,
                              "--image-size", str(args.image_size), "--minutes", str(args.minutes),
                              "--seed", str(args.seed)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done: {rows[-1]}", file=sys.stderr)
    print(f"\n{args.image_size} px, {args.minutes:g} min per recipe, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; a 2048 x 2048 matmul in this run: {peak:.0f} GFLOP/s "
          f"in fp32" + (f", {peak_bf16:.0f} GFLOP/s in bf16" if peak_bf16 else " (bf16 not measured: no "
                        "bf16 instructions)") + "\n")
    print("| recipe | precision | minutes trained | images/s | epochs | val PSNR (dB) | val KL / image (nats) "
          "| val objective / image | peak memory (MB) | training GFLOP/s | % of fp32 matmul "
          "| % of bf16 matmul | data wait |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        of_bf16 = f"{100 * r['gflops'] / peak_bf16:.0f}%" if peak_bf16 else "n/a"
        print(f"| {r['recipe']} | {'bf16 autocast' if r['amp'] else 'fp32'} | {r['seconds'] / 60:.1f} "
              f"| {r['images_per_s']:.1f} "
              f"| {r['epochs']:.1f} | {r['val_psnr']:.2f} | {r['val_kl']:.0f} | {r['val_objective']:.0f} "
              f"| {r['peak_mb']:.0f} | {r['gflops']:.0f} | {100 * r['gflops'] / peak:.0f}% "
              f"| {of_bf16} | {100 * r['data_wait_fraction']:.1f}% |")
    if len(rows) == 2:
        a, b = rows
        print(f"\nobjective ratio {b['recipe']}/{a['recipe']}: {b['val_objective'] / a['val_objective']:.2f}; "
              f"PSNR gain: {b['val_psnr'] - a['val_psnr']:+.2f} dB")


if __name__ == "__main__":
    main()
