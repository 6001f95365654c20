"""
Sample-quality benchmark: how close do generated Pokémon come to real ones the model never saw?

    python benchmarks/bench_samples.py --model vae_model.pth --data ../shared/pokemon

The model's own validation images (the same seeded split as train_vae.py) are the unseen
real images. Every row draws the same number of samples and is compared with them by two
Fréchet distances (the distance between two Gaussians fitted to two sets of features,
as in FID), in feature spaces that need no download:

- layout: images shrunk to 32 px, projected on the 16 principal components of the
  training images. It sees where colour is, not how clean it is.
- texture: per-channel mean and standard deviation of the activations of a fixed, seeded,
  untrained conv net at two depths. Outlines and flat colour regions give other statistics
  than a patchwork or a blur.

The floor row compares real training images with the unseen ones: what "as good as real"
reads as with this many images. "One piece" is the share of images that show one figure on
white: one connected figure, not fragments, that leaves the frame's edge mostly white; the
texture distance alone does not see that. The copy ratio is the mean distance from each
sample to its nearest training image (32 px pixels) over the same for the unseen images: well
below 1 means the prior copies.
"""
import argparse
import os
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import image_data  # noqa: E402
import sample_vae  # noqa: E402
import train_vae  # noqa: E402
import vae_api  # noqa: E402
from latent_prior import sample_prior  # noqa: E402

SAMPLES = 256          # samples per row (and real images in the floor row)
LAYOUT_SIZE = 32       # px, side of the images the layout distance compares
LAYOUT_COMPONENTS = 16  # principal components of the layout features
PCA_COMPONENTS = 32    # components of the full-covariance Gaussian prior (the alternative)
NON_WHITE = 0.8        # a pixel whose darkest channel is below this ([-1, 1]) belongs to a figure
ONE_PIECE = 0.9        # share of the figure's pixels its largest connected region must hold
SPECK = 16             # px, regions this small are noise and not counted
BORDER = 0.2           # largest share of the frame's 2-px border a figure on white may cover
LOW_TEMPERATURE = 0.85  # the learned prior's alternative row: flatter figures, by eye


# ---------------------------------------------------------------------------------------
# Features and the Fréchet distance
# ---------------------------------------------------------------------------------------

def frechet_distance(a, b):
    """|m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2) between Gaussians fitted to the rows
    of a and b. The trace of the matrix square root is the sum of the square roots of the
    eigenvalues of C_a^1/2 C_b C_a^1/2, which is symmetric, so eigh suffices."""
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def small(images):
    """(N, 3, H, W) in [-1, 1] -> (N, 3 * 32 * 32), shrunk with antialiasing."""
    return F.interpolate(images.float(), size=LAYOUT_SIZE, mode="area").flatten(1)


class LayoutFeatures:
    """Projection on the principal components of the training images at 32 px."""

    def __init__(self, train_images):
        flat = small(train_images)
        self.mean = flat.mean(0)
        torch.manual_seed(0)
        _, _, v = torch.pca_lowrank(flat, q=min(LAYOUT_COMPONENTS + 8, *flat.shape), center=True, niter=6)
        self.axes = v[:, :LAYOUT_COMPONENTS]

    def __call__(self, images):
        return (small(images) - self.mean) @ self.axes


class TextureFeatures(nn.Module):
    """Two random conv layers (seeded, never trained); per-channel mean and std of each
    layer's activations, scaled by their spread over the training images so that both
    depths count alike."""

    def __init__(self, train_images):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2, padding=1)
        for conv in (self.conv1, self.conv2):
            fan_in = conv.weight[0].numel()
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
            conv.bias.data.zero_()
        self.scale = 1.0
        self.scale = self(train_images).std(0).clamp_min(1e-6)

    @torch.no_grad()
    def forward(self, images):
        rows = []
        for start in range(0, len(images), 64):
            h1 = F.relu(self.conv1(images[start:start + 64].float()))
            h2 = F.relu(self.conv2(h1))
            rows.append(torch.cat([h.flatten(2).mean(2) for h in (h1, h2)]
                                  + [h.flatten(2).std(2) for h in (h1, h2)], dim=1))
        return torch.cat(rows) / self.scale


def one_piece(images):
    """Share of images that show one figure on white: the largest 8-connected region of
    non-white pixels holds at least ONE_PIECE of them, and they cover at most BORDER of the
    frame's edge (confetti that fills the frame is connected too; the 703 Pokémon of
    benchmarks/README.md cover at most 11% of it). Regions are labelled by letting every pixel
    take the largest label among its neighbours (a 3 x 3 max pool inside the mask) until
    nothing changes."""
    mask = images.float().amin(1) < NON_WHITE
    n, h, w = mask.shape
    edge = torch.ones(h, w, dtype=torch.bool)
    edge[2:-2, 2:-2] = False
    on_white = (mask & edge).flatten(1).sum(1) <= BORDER * edge.sum()
    labels = torch.arange(1, h * w + 1, dtype=torch.float).view(1, h, w) * mask
    while True:
        grown = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    whole = 0
    for image, white_edge in zip(labels, on_white.tolist()):
        sizes = image[image > 0].unique(return_counts=True)[1]
        sizes = sizes[sizes >= SPECK]
        whole += white_edge and len(sizes) > 0 and sizes.max().item() >= ONE_PIECE * sizes.sum().item()
    return whole / n


def copy_ratio(samples, unseen, train_images):
    """Mean distance to the nearest training image, samples over unseen real images."""
    train = small(train_images)
    nearest = lambda images: torch.cdist(small(images), train).min(1).values.mean()  # noqa: E731
    return (nearest(samples) / nearest(unseen)).item()


# ---------------------------------------------------------------------------------------
# The priors: each returns SAMPLES latents; fitting and drawing are timed apart
# ---------------------------------------------------------------------------------------

def pca_gaussian(model, train_pixels):
    """The alternative: a full-covariance Gaussian over the flattened latent means in their
    first principal components (ex-post density estimation, Ghosh et al. 2020)."""
    mus = vae_api.encode_means(model, train_pixels)
    flat = mus.flatten(1)
    mean = flat.mean(0)
    torch.manual_seed(0)
    _, _, v = torch.pca_lowrank(flat, q=min(PCA_COMPONENTS + 8, *flat.shape), center=True, niter=6)
    axes = v[:, :min(PCA_COMPONENTS, len(flat) - 1)]
    covariance = torch.cov(((flat - mean) @ axes).T).view(axes.shape[1], axes.shape[1])
    factor = torch.linalg.cholesky(covariance + 1e-6 * torch.eye(axes.shape[1]))

    def draw(n, generator):
        coords = torch.randn(n, axes.shape[1], generator=generator) @ factor.T
        return (mean + coords @ axes.T).view(n, *mus.shape[1:])
    return draw


def priors(model, prior, guide, train_pixels, args):
    """name -> (fit seconds or None, draw(n, generator) -> latents)."""
    shape = (model.config["latent_channels"], model.image_size // 8, model.image_size // 8)
    normal = lambda n, g: torch.randn((n,) + shape, generator=g)  # noqa: E731
    rows = {"N(0, I)": (0.0, normal)}
    tick = time.perf_counter()
    mean, std = sample_vae.fit_data_prior(model, train_pixels, "cpu")
    rows["diagonal data prior"] = (time.perf_counter() - tick,
                                   lambda n, g: mean + std * torch.randn((n,) + shape, generator=g))
    tick = time.perf_counter()
    draw = pca_gaussian(model, train_pixels)
    rows["PCA Gaussian"] = (time.perf_counter() - tick, draw)
    if prior is not None and guide is not None and args.guidance != 1:
        rows["learned prior without autoguidance"] = (
            None, lambda n, g: sample_prior(prior, normal(n, g), args.sample_steps, guidance=1))
    if prior is not None:  # fit s: the whole of stage two, prior and guide
        for name, temperature, fit_s in (("learned prior (chosen)", args.temperature, prior.seconds),
                                         (f"learned prior at temperature {args.low_temperature:g}",
                                          args.low_temperature, None))[:2 if args.low_temperature else 1]:
            rows[name] = (fit_s, lambda n, g, t=temperature: sample_prior(prior, t * normal(n, g), args.sample_steps,
                                                                          guide, args.guidance, args.guidance_interval))
    return rows


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description="Fréchet distances of samples from each prior.")
    p.add_argument("--model", default="vae_model.pth")
    p.add_argument("--data", default="../shared/pokemon", help="the folder the model was trained on")
    p.add_argument("--val-fraction", type=float, default=train_vae.VAL_FRACTION)
    p.add_argument("--seed", type=int, default=train_vae.SEED, help="the training run's --seed (its split)")
    p.add_argument("--draw-seed", type=int, default=0, help="seeds the samples every prior draws")
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--sample-steps", type=int, default=sample_vae.SAMPLE_STEPS)
    p.add_argument("--guidance", type=float, default=sample_vae.GUIDANCE, help="autoguidance; 1 turns it off")
    p.add_argument("--guidance-interval", nargs=2, type=float, default=sample_vae.GUIDANCE_INTERVAL)
    p.add_argument("--temperature", type=float, default=sample_vae.TEMPERATURE, help="of the chosen row")
    p.add_argument("--low-temperature", type=float, default=LOW_TEMPERATURE,
                   help="of the learned prior's alternative row; 0 leaves it out (it costs as much as the chosen)")
    p.add_argument("--grids", metavar="FOLDER", help="also save 16 samples of every row here")
    p.add_argument("--only", metavar="TEXT", default="",
                   help="draw only the priors whose row name holds TEXT, like '(chosen)' (the real rows always)")
    args = p.parse_args()
    try:
        trained = sample_vae.load_model(args.model, "cpu")
        model, prior, guide = trained.vae, trained.prior, trained.guide
        pixels = sample_vae.load_folder(args.data, model, "--data")
    except cli.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if prior is not None:
        prior.seconds = torch.load(args.model, weights_only=True)["prior"].get("seconds", float("nan"))
    train_rows, unseen_rows = image_data.split(len(pixels), args.val_fraction, args.seed)
    images = image_data.to_model_range(pixels)  # what the features compare
    train_images, unseen = images[train_rows], images[unseen_rows]
    print(f"{len(train_images)} training images, {len(unseen)} unseen; {args.samples} samples per row")
    layout, texture = LayoutFeatures(train_images), TextureFeatures(train_images)
    unseen_layout, unseen_texture = layout(unseen), texture(unseen)
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(1))[:args.samples]

    def row(name, samples, fit_s, draw_s):
        return (f"| {name} | {frechet_distance(layout(samples), unseen_layout):.1f} "
                f"| {frechet_distance(texture(samples), unseen_texture):.1f} "
                f"| {one_piece(samples):.2f} | {copy_ratio(samples, unseen, train_images):.2f} | {fit_s} | {draw_s} |")

    print("| samples | layout distance | texture distance | one piece | copy ratio | fit s | draw s |")
    print("|---|---|---|---|---|---|---|")
    print(row("real training images (floor)", train_images[pick], "", ""))
    tick = time.perf_counter()
    recon = torch.cat([model.decode(mu) for mu in vae_api.encode_means(model, pixels[train_rows][pick]).split(64)])
    print(row("real latents (reconstructions)", recon, "", f"{time.perf_counter() - tick:.1f}"))
    for name, (fit_s, draw) in priors(model, prior, guide, pixels[train_rows], args).items():
        if args.only not in name:
            continue
        tick = time.perf_counter()
        z = draw(args.samples, torch.Generator().manual_seed(args.draw_seed))
        samples = torch.cat([model.decode(part) for part in z.split(64)])
        print(row(name, samples, "" if fit_s is None else f"{fit_s:.1f}", f"{time.perf_counter() - tick:.1f}"))
        if args.grids:
            slug = re.sub(r"[^a-z0-9]+", "_", name.split(" (")[0].lower()).strip("_")
            image_data.save_png(samples[:16], os.path.join(args.grids, f"prior_{slug}.png"))


if __name__ == "__main__":
    main()
