"""
Speed of one training step and of the augmentation, for the choices train_vae.py makes.

    python benchmarks/bench_step.py --image-size 128 --batch-size 2

Prints a Markdown table: images/s and achieved GFLOP/s (counted by FlopCounterMode) of a
full training step (forward, loss, backward, AdamW) for each model variant, and the cost of
each augmentation per image.
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from image_data import make_augment  # noqa: E402
from train_vae import CPU_BATCH_SIZE, LATENT_CHANNELS, ROTATION  # noqa: E402
from vae_model import VAE, vae_loss  # noqa: E402


def step_speed(size, batch, channels, channels_last, repeats, amp=False, compile_=False):
    torch.manual_seed(0)
    model = VAE(size, LATENT_CHANNELS, channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    forward = torch.compile(model) if compile_ else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            recon, mu, log_var = forward(x)
        loss = vae_loss(recon.float(), x, mu.float(), log_var.float())[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    tick = time.perf_counter()
    step()
    step()  # torch.compile compiles here, twice (the first call was under the FLOP counter)
    warm_up = time.perf_counter() - tick
    tick = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - tick) / repeats
    return batch / seconds, counter.get_total_flops() / seconds / 1e9, warm_up


def augment_cost(size, transform, repeats=20):
    images = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8)
    [transform(image) for image in images]
    tick = time.perf_counter()
    for _ in range(repeats):
        [transform(image) for image in images]
    return (time.perf_counter() - tick) / (repeats * 16) * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"{args.image_size} px, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | images/s | GFLOP/s | first two steps (s) |\n|---|---|---|---|")
    for channels, channels_last, amp, compile_ in [
        ((32, 64, 128), False, False, False), ((32, 64, 128), True, False, False),
        ((32, 64, 128), True, True, False), ((32, 64, 128), True, False, True),
        ((64, 128, 256), True, False, False),
    ]:
        speed, gflops, warm_up = step_speed(args.image_size, args.batch_size, channels, channels_last,
                                            args.repeats, amp, compile_)
        name = ", ".join(["widths " + "/".join(map(str, channels))]
                         + ["channels_last"] * channels_last + ["bf16 autocast"] * amp
                         + ["torch.compile"] * compile_)
        print(f"| {name} | {speed:.1f} | {gflops:.0f} | {warm_up:.1f} |")

    print("\n| augmentation (uint8 tensor, per image) | ms |\n|---|---|")
    for name, transform in [
        ("RandomHorizontalFlip", v2.RandomHorizontalFlip()),
        ("RandomRotation(10), bilinear, white fill",
         v2.RandomRotation(10, interpolation=v2.InterpolationMode.BILINEAR, fill=255)),
        ("ColorJitter(0.1, 0.1, 0.1)", v2.ColorJitter(0.1, 0.1, 0.1)),
        ("ColorJitter(0.1, 0.1, 0.1, hue=0.02)", v2.ColorJitter(0.1, 0.1, 0.1, 0.02)),
    ]:
        print(f"| {name} | {augment_cost(args.image_size, transform):.2f} |")
    print(f"| image_data.make_augment(), one call per image | "
          f"{augment_cost(args.image_size, make_augment(ROTATION)):.2f} |")
    batch = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
    augment = make_augment(ROTATION)
    augment(batch)
    tick = time.perf_counter()
    for _ in range(20):
        augment(batch)
    print(f"| image_data.make_augment(), one call per batch of {args.batch_size} (what training does) | "
          f"{(time.perf_counter() - tick) / (20 * args.batch_size) * 1000:.2f} |")


if __name__ == "__main__":
    main()
