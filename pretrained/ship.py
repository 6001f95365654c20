"""
Make the shipped model from a model train_vae.py saved: the same checkpoint format, its weights
stored in half precision (half the file), and the cost of that measured on the validation images.

    python pretrained/ship.py vae_model.pth --data ../shared/pokemon

A model saved before training stored its atlas (vae_api.latent_atlas) gets it here, made from
the same training images as training makes it. Prints the validation PSNR with the float32
weights and with the stored ones (sample_vae.py loads them back into float32), the
reconstruction PSNR of pokemon_sample_test.png, and the size.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_data  # noqa: E402
import train_vae  # noqa: E402
import vae_api  # noqa: E402
from vae_model import load_checkpoint, psnr, save_checkpoint  # noqa: E402


def halved(checkpoint):
    """The checkpoint with every floating-point weight of the VAE, prior and guide in float16."""
    half = lambda state: {k: v.half() if v.is_floating_point() else v  # noqa: E731
                          for k, v in state.items()}
    shipped = dict(checkpoint, model=half(checkpoint["model"]))
    for name in ("prior", "guide"):
        if checkpoint.get(name) is not None:
            shipped[name] = dict(checkpoint[name], model=half(checkpoint[name]["model"]))
    return shipped


def split_images(vae, data):
    """(training, validation) images of `data` as uint8, split as train_vae.py's defaults do."""
    images = image_data.cached_images(image_data.image_files(data), vae.image_size, vae.fit, data,
                                      image_data.DEFAULT_CACHE_DIR)
    rows = image_data.split(len(images), train_vae.VAL_FRACTION, train_vae.SEED)
    return [images[part] for part in rows]


def val_psnr(model, val_images):
    """The validation PSNR, as training reports it."""
    return train_vae.evaluate(model.vae, val_images, "cpu", train_vae.KL_WEIGHT)["val_psnr"]


@torch.no_grad()
def sample_test_psnr(model):
    x = vae_api.to_input(model, os.path.join(ROOT, "pokemon_sample_test.png"))
    return psnr(model.vae.decode(model.vae.encode(x)[0]), x)


def main():
    p = argparse.ArgumentParser(description="Store a trained model as the shipped one.")
    p.add_argument("model", help="the model train_vae.py saved (vae_model.pth)")
    p.add_argument("--data", required=True, help="the images it was trained on")
    p.add_argument("--out", default=vae_api.SHIPPED_MODEL)
    args = p.parse_args()
    checkpoint, full = load_checkpoint(args.model), vae_api.load(args.model)
    train_images, val_images = split_images(full.vae, args.data)
    if "atlas" not in checkpoint:
        mus = vae_api.encode_means(full.vae, train_images)
        checkpoint["atlas"] = vae_api.latent_atlas(mus)
        print(f"atlas of the training latents added, from {len(mus)} images")
    save_checkpoint(halved(checkpoint), args.out)
    stored = vae_api.load(args.out)
    before, after = val_psnr(full, val_images), val_psnr(stored, val_images)
    print(f"val PSNR {before:.3f} dB with float32 weights, {after:.3f} dB as stored "
          f"({after - before:+.3f} dB)")
    print(f"pokemon_sample_test.png: reconstruction PSNR {sample_test_psnr(stored):.2f} dB")
    print(f"{args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB "
          f"(from {os.path.getsize(args.model) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
