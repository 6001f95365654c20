"""
A convolutional Variational Autoencoder, written out in plain PyTorch.

Read top to bottom: the building block, the Encoder (image -> mu, log_var), the
reparameterization trick, the Decoder (z -> image), the VAE, its loss, and the checkpoint
helpers. Torch only; the learned prior that draws new images lives in latent_prior.py.
"""
import math
import os
import socket

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- Building block ---------------------------------------------------------------------------
def norm(channels):
    # GroupNorm instead of BatchNorm: it does not depend on the batch, so a batch of 2 on a
    # laptop, a batch of 1 in sample_vae.py and train/eval mode all behave the same. Up to 32
    # groups of at least 4 channels; gcd makes the count divide the width (4 groups of 12 for 48).
    return nn.GroupNorm(math.gcd(channels // 4, 32), channels)


class ResBlock(nn.Module):
    """Two 3x3 convolutions and a skip, which lets gradients reach early layers directly."""

    def __init__(self, channels):
        super().__init__()
        self.block = nn.Sequential(
            norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x):
        return x + self.block(x)


# --- Encoder: image (B, 3, H, W) in [-1, 1]  ->  mu, log_var, each (B, latent, H/8, W/8) ------
class Encoder(nn.Module):
    def __init__(self, latent_channels=6, channels=(32, 64, 128)):
        super().__init__()
        c2, c4, c8 = channels  # the widths at H/2, H/4 and H/8
        self.body = nn.Sequential(
            # H/2. PixelUnshuffle folds every 2x2 patch into 12 channels: no conv runs at full
            # resolution, where few channels on a large map are the slowest work per FLOP.
            nn.PixelUnshuffle(2), nn.Conv2d(12, c2, 3, padding=1),
            # H/4 and H/8: a stride-2 conv halves the size, a residual block refines.
            nn.Conv2d(c2, c4, 3, stride=2, padding=1), ResBlock(c4),
            nn.Conv2d(c4, c8, 3, stride=2, padding=1), ResBlock(c8),
            norm(c8), nn.SiLU(),
        )
        # One head predicts both parameters of q(z|x) at every latent position.
        self.head = nn.Conv2d(c8, 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        mu, log_var = self.head(self.body(x)).chunk(2, dim=1)
        # A clamp keeps exp(log_var) finite in the first, wild steps of training.
        return mu, log_var.clamp(-30.0, 20.0)


# --- Decoder: latent z (B, latent, H/8, W/8)  ->  image (B, 3, H, W) in [-1, 1] ---------------
def upsample(in_channels, out_channels):
    # Nearest upsampling + conv rather than ConvTranspose2d: a stride-2 transposed conv
    # overlaps its kernels unevenly and paints a checkerboard on the image.
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    return [nn.Upsample(scale_factor=2, mode="nearest"), conv]


class Decoder(nn.Module):
    def __init__(self, latent_channels=6, channels=(32, 64, 128)):
        super().__init__()
        c2, c4, c8 = channels  # the encoder's widths, walked back up
        self.body = nn.Sequential(
            nn.Conv2d(latent_channels, c8, 3, padding=1), ResBlock(c8),  # H/8
            *upsample(c8, c4), ResBlock(c4),                              # H/4
            *upsample(c4, c2),                                            # H/2
            # The mirror of PixelUnshuffle: one conv predicts the 12 values of every 2x2
            # patch and PixelShuffle lays them out at full resolution ("sub-pixel
            # convolution", Shi et al. 2016). No normalization after it: the image's
            # colours are not zero-mean, and tanh puts them in [-1, 1] like the input.
            norm(c2), nn.SiLU(), nn.Conv2d(c2, 12, 3, padding=1), nn.PixelShuffle(2), nn.Tanh(),
        )

    def forward(self, z):
        return self.body(z)


# --- The VAE: encoder, reparameterization trick, decoder --------------------------------------
class VAE(nn.Module):
    def __init__(self, image_size=128, latent_channels=6, channels=(32, 64, 128), fit="pad"):
        super().__init__()
        if image_size % 8 != 0:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        # Kept so that a checkpoint can rebuild this exact model (see vae_checkpoint), and
        # prepare its images as training did: fit is how they were made square, "pad" or "crop".
        self.config = dict(image_size=image_size, latent_channels=latent_channels,
                           channels=list(channels), fit=fit)
        self.image_size, self.fit = image_size, fit
        self.encoder = Encoder(latent_channels, channels)
        self.decoder = Decoder(latent_channels, channels)

    def encode(self, x):
        return self.encoder(x)

    @staticmethod
    def reparameterize(mu, log_var):
        # Sampling z ~ N(mu, sigma^2) directly has no gradient. Writing it as
        # z = mu + sigma * eps with eps ~ N(0, I) moves the randomness into eps, so the
        # gradient flows to mu and log_var like through any other arithmetic.
        std = torch.exp(0.5 * log_var)
        eps = torch.randn_like(std)
        return mu + std * eps

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        mu, log_var = self.encode(x)
        z = self.reparameterize(mu, log_var)
        return self.decode(z), mu, log_var


# --- Loss: reconstruction + kl_weight * KL(q(z|x) || N(0, I)) ---------------------------------
def vae_loss(recon, x, mu, log_var, kl_weight=1.0):
    """Returns (total, reconstruction, kl), each a scalar per image (averaged over the batch).
    kl_weight=1 is the plain negative evidence lower bound; train_vae.py passes its KL_WEIGHT.

    Reduction: both terms are SUMMED over every pixel and every latent element of an image,
    then AVERAGED over the batch. Summing keeps the two terms on the scale of the evidence
    lower bound, where each pixel and each latent element counts once, so their balance does
    not change with the image size or the number of latent channels; averaging over the
    batch keeps the learning rate independent of the batch size. (A per-pixel mean for the
    MSE, as in many tutorials, shrinks the reconstruction term ~50,000-fold at 128 px and lets
    the KL term wipe out the latent.)

    KL term: for q = N(mu, sigma^2) and p = N(0, I) it has a closed form,
    Kingma and Welling (2014), "Auto-Encoding Variational Bayes", Appendix B:
        -KL = 1/2 * sum(1 + log(sigma^2) - mu^2 - sigma^2)
    """
    batch = x.shape[0]
    reconstruction = F.mse_loss(recon, x, reduction="sum") / batch
    kl = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp()) / batch
    return reconstruction + kl_weight * kl, reconstruction, kl


@torch.no_grad()
def psnr(recon, x):
    """Mean peak signal-to-noise ratio in dB over a batch, on [0, 1] pixels (inputs in [-1, 1])."""
    mse = ((recon.float() - x.float()) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()


# --- Checkpoints: the config travels with the weights -----------------------------------------
class CheckpointError(ValueError):
    """A checkpoint file that is missing, foreign or does not fit its own config."""


def vae_checkpoint(model, prior=None, guide=None, prior_status=None, atlas=None):
    """Config and weights of the model (and of the learned prior and its guide, if given);
    prior_status: why there is no prior yet ("to train", "none asked"); atlas: tensors that
    describe the training latents (vae_api.latent_atlas), for the explorer page."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model wraps the real one
    checkpoint = {"config": dict(model.config), "model": model.state_dict()}
    if prior_status is not None:
        checkpoint["prior_status"] = prior_status
    if atlas is not None:
        checkpoint["atlas"] = atlas
    for name, part in (("prior", prior), ("guide", guide)):
        if part is not None:
            checkpoint[name] = {"config": dict(part.config), "model": part.state_dict()}
    return checkpoint


def atomic_write(path, write):
    """write(tmp) beside `path`, then an atomic rename: a crash mid-write leaves the old file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Named by machine and process: several runs (on machines sharing a disk) may write at once.
    tmp = f"{path}.{socket.gethostname()}-{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True): a file carrying pickled code is refused, not executed."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # random bytes, empty or text file, pickled code, truncation
        why = ("the file is empty" if os.path.getsize(path) == 0 else
               "it holds pickled code or objects, which are never loaded" if "GLOBAL" in str(error)
               else "it is cut short or damaged" if isinstance(error, (RuntimeError, OSError))
               else "it is not a file that torch.save wrote")  # OSError: a zip cut short
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {why}") from error
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of this VAE "
                              "(it has no 'config' and 'model' entries)")
    return checkpoint


def rebuild(model_class, entry, mismatch, device="cpu"):
    """model_class(**config) with the entry's weights, on `device`; else `mismatch`, explained."""
    try:
        model = model_class(**entry["config"])
        model.load_state_dict(entry["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{mismatch} ({str(error).strip().splitlines()[0]})") from error
    return model.to(device).eval()


def load_vae(path, map_location="cpu", checkpoint=None):
    """Rebuild the trained VAE from `path` (or from its `checkpoint`, if already read), on the
    device `map_location`."""
    checkpoint = load_checkpoint(path, map_location) if checkpoint is None else checkpoint
    mismatch = f"{path} holds weights that do not fit its own config"
    return rebuild(VAE, checkpoint, mismatch, map_location)
