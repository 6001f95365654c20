"""
Speed of one training step and of the augmentation, for the choices train_vae.py makes.

    python benchmarks/bench_step.py --image-size 128 --batch-size 16

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vae_model import VAE, vae_loss  # noqa: E402


def step_speed(size, batch, channels, channels_last, repeats):
    torch.manual_seed(0)
    model = VAE(size, 4, channels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step():
        recon, mu, log_var = model(x)
        loss = vae_loss(recon, x, mu, log_var)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    step()
    tick = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - tick) / repeats
    return batch / seconds, counter.get_total_flops() / seconds / 1e9


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
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"{args.image_size} px, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | images/s | GFLOP/s |\n|---|---|---|")
    for channels, channels_last in [((32, 64, 128), False), ((32, 64, 128), True), ((64, 128, 256), True)]:
        speed, gflops = step_speed(args.image_size, args.batch_size, channels, channels_last, args.repeats)
        print(f"| widths {'/'.join(map(str, channels))}{', channels_last' if channels_last else ''} "
              f"| {speed:.1f} | {gflops:.0f} |")

    from torchvision.transforms import v2
    print("\n| augmentation (uint8 tensor, per image) | ms |\n|---|---|")
    for name, transform in [
        ("RandomHorizontalFlip", v2.RandomHorizontalFlip()),
        ("RandomRotation(10), bilinear, white fill",
         v2.RandomRotation(10, interpolation=v2.InterpolationMode.BILINEAR, fill=255)),
        ("ColorJitter(0.1, 0.1, 0.1)", v2.ColorJitter(0.1, 0.1, 0.1)),
        ("ColorJitter(0.1, 0.1, 0.1, hue=0.02)", v2.ColorJitter(0.1, 0.1, 0.1, 0.02)),
    ]:
        print(f"| {name} | {augment_cost(args.image_size, transform):.2f} |")


if __name__ == "__main__":
    main()
