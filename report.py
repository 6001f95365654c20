"""What a training run shows as it goes: a line an epoch, and in its results folder
metrics.jsonl, a grid of reconstructions and one of samples every few epochs, and the loss
curve at the end."""
import json
import os
from pathlib import Path

import torch

from image_data import save_png, to_model_range
from vae_model import atomic_write


def write_metrics(metrics, results_dir):
    """One JSON line an epoch, the whole file written again (atomically) each time."""
    lines = "".join(json.dumps(row) + "\n" for row in metrics)
    atomic_write(f"{results_dir}/metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))


def report(row, metrics, model, grid_images, noise, args):
    """A line here, a row in metrics.jsonl, the grids every --save-every epochs."""
    print(f"epoch {row['epoch']:3d}/{args.epochs}  train mse {row['train_mse']:8.1f}  kl "
          f"{row['train_kl']:7.1f}  val loss {row['val_loss']:8.1f}  val psnr "
          f"{row['val_psnr']:5.2f} dB  {row['images_per_s']:5.1f} img/s")
    write_metrics(metrics, args.results_dir)
    if row["epoch"] % args.save_every == 0 or row["epoch"] == args.epochs:
        save_pictures(model, grid_images, noise, row["epoch"], args.results_dir)


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


def plot_loss_curve(metrics, results_dir):
    import matplotlib.pyplot as plt  # here, not at the top: --help answers without it
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in metrics]
    curves = (("train_mse", "train reconstruction (summed MSE)"),
              ("train_kl", "train KL (nats)"), ("val_loss", "val loss (MSE + weight x KL)"))
    for key, label in curves:
        left.plot(epochs, [row[key] for row in metrics], label=label)
    left.set(xlabel="epoch", ylabel="per image", yscale="log", title="Loss")
    left.legend()
    right.plot(epochs, [row["val_psnr"] for row in metrics])
    right.set(xlabel="epoch", ylabel="dB", title="Validation PSNR (decoding mu)")
    fig.tight_layout()
    path = os.path.join(results_dir, "loss_curve.png")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
