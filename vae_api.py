"""
A trained VAE from your own code or a notebook: load one (the shipped model by default), turn a
picture into its latent and a latent back into a picture, draw new images, walk between two.

    from vae_api import load, encode, decode, generate, interpolate
    model = load()                                 # the shipped model; load("vae_model.pth")
    z = encode(model, "pokemon_sample_test.png")   # a path or a PIL image -> a latent tensor
    decode(model, z)[0].save("again.png")          # latents -> PIL images

Every function runs under torch.no_grad(), inside one or not, and gives tensors (latents) or
PIL images (pictures). sample_vae.py's command line and the explorer page are built on these.
"""
import math
import os
from typing import NamedTuple, Optional

import torch
from PIL import Image

from image_data import square_pixels, to_model_range, to_uint8
from latent_prior import GUIDANCE, GUIDANCE_INTERVAL, SAMPLE_STEPS, LatentPrior, load_prior, \
    sample_prior
from vae_model import VAE, load_checkpoint, load_vae

# The model that ships with the project: the CPU default recipe on 703 Pokémon (its README).
SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained",
                             "pokemon_vae.pth")
BATCH = 64  # latents decoded at once: memory stays flat in the number asked for
ATLAS_DIRECTIONS = 8  # principal directions of the training latents that training stores
ATLAS_STARTS = 32     # training latents it stores, for the explorer page to start from


class Trained(NamedTuple):
    """A trained VAE with its learned prior and the prior's guide (None where it has none), and
    the atlas of its training latents that the explorer page starts from (latent_atlas)."""
    vae: VAE
    prior: Optional[LatentPrior]
    guide: Optional[LatentPrior]
    path: str
    atlas: Optional[dict] = None


def load(path=None, device="cpu"):
    """The model train_vae.py saved at `path` (the shipped one if None), ready on `device`.
    Raises FileNotFoundError, or vae_model.CheckpointError for a file that is not one."""
    path = path or SHIPPED_MODEL
    checkpoint = load_checkpoint(path, map_location=device)  # read once, for every part
    vae = load_vae(path, device, checkpoint)
    prior, guide = load_prior(path, device, checkpoint)
    return Trained(vae, prior, guide, path, checkpoint.get("atlas"))


def device_of(model):
    return next(model.vae.parameters()).device


@torch.no_grad()
def to_input(model, image):
    """A path, file object or PIL image -> (1, 3, size, size) in [-1, 1], as training saw it."""
    pixels = square_pixels(image, model.vae.image_size, model.vae.fit)
    return to_model_range(pixels.unsqueeze(0).to(device_of(model)))


@torch.no_grad()
def encode(model, image):
    """An image's latent mean (1, channels, size / 8, size / 8): the encoder's best guess."""
    return model.vae.encode(to_input(model, image))[0]


def pictures(images):
    """Images (N, 3, H, W) in [-1, 1] -> N PIL images."""
    return [Image.fromarray(to_uint8(x).permute(1, 2, 0).cpu().numpy()) for x in images]


@torch.no_grad()
def decode(model, z):
    """Latents (N, channels, h, w) -> N PIL images."""
    return [picture for part in z.split(BATCH) for picture in pictures(model.vae.decode(part))]


def noise(model, count, seed=0):
    """`count` seeded draws of N(0, I) in the latent's shape, on the model's device."""
    vae = model.vae
    shape = (count, vae.config["latent_channels"], vae.image_size // 8, vae.image_size // 8)
    draws = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return draws.to(device_of(model))


@torch.no_grad()
def generate(model, count=16, seed=0, temperature=1.0, gaussian=None, steps=SAMPLE_STEPS,
             guidance=GUIDANCE, interval=GUIDANCE_INTERVAL):
    """`count` new images as PIL images, the same for the same seed: noise turned into latents by
    the learned prior (guided by its guide, `guidance` 1: unguided), or drawn from N(0, I) where
    the model has no prior, or from `gaussian` = (mean, std) of a latent's shape if given.
    Below 1, `temperature` draws the noise nearer its centre: flatter, paler images."""
    drawn = []
    for part in (temperature * noise(model, count, seed)).split(BATCH):
        if gaussian is not None:
            z = gaussian[0] + gaussian[1] * part
        elif model.prior is not None:  # the prior turns the noise into a latent, step by step
            z = sample_prior(model.prior, part, steps, model.guide, guidance, interval)
        else:
            z = part
        drawn += decode(model, z)
    return drawn


@torch.no_grad()
def interpolate(model, a, b, steps=10):
    """`steps` PIL images on the straight line between images a's and b's latent means."""
    mu_a, mu_b = encode(model, a), encode(model, b)
    t = torch.linspace(0, 1, steps, device=mu_a.device).view(-1, 1, 1, 1)
    return decode(model, (1 - t) * mu_a + t * mu_b)


# --- Many images: their latents, and the map of the latent space that training stores ---------
@torch.no_grad()
def encode_means(vae, pixels, batch_size=32):
    """The latent means of many uint8 images (N, 3, size, size), a batch at a time on the
    model's device, so that memory stays flat in their number; on the CPU."""
    device = next(vae.parameters()).device
    batches = (to_model_range(batch.to(device)) for batch in pixels.split(batch_size))
    return torch.cat([vae.encode(x)[0].float().cpu() for x in batches])


def principal_axes(mus, count):
    """The first `count` principal directions of latents (N, ...) as rows, and the spread (the
    standard deviation) along each. An axis has no sign of its own: each is turned so that its
    largest loading is positive, so that the same latents give the same map."""
    flat = mus.flatten(1).double()
    _, singular, vh = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)
    axes = vh[:count]
    largest = axes[torch.arange(len(axes)), axes.abs().argmax(1)]
    return axes * torch.sign(largest)[:, None], singular[:count] / math.sqrt(max(1, len(flat) - 1))


def latent_atlas(mus):
    """What the explorer page needs of the training latents (N, C, h, w), a few hundred KB: their
    mean, first principal directions with the spread along each, and a few dozen to start from."""
    axes, spread = principal_axes(mus, ATLAS_DIRECTIONS)
    picks = torch.linspace(0, len(mus) - 1, min(ATLAS_STARTS, len(mus))).round().long()
    return {"mean": mus.float().mean(0), "directions": axes.float().view(-1, *mus.shape[1:]),
            "spread": spread.float(), "starts": mus[picks].float()}
