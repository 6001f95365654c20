"""
Use a trained VAE: reconstruct an image, generate new ones, walk and map the latent space.

    python sample_vae.py                                  # reconstruct pokemon_sample_test.png
    python sample_vae.py --generate 16                    # 16 new images from the learned prior
    python sample_vae.py --interpolate a.png b.png        # a walk from a to b (PNG strip + GIF)
    python sample_vae.py --latent-map path/to/images      # every image placed by its latent (PCA)

The model is rebuilt from its checkpoint's config. Every figure is saved, and shown if it can be.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from cli import (HelpWithDefaults, UserError, check_writable, checked, pick_device, positive_float,
                 positive_int, run_main)
from image_data import (DEFAULT_CACHE_DIR, PICTURE_FORMATS, UNREADABLE, TooLarge,
                        cached_images, image_files, open_rgb, picture_format, save_png)
import latent_prior
import vae_api
from vae_api import SHIPPED_MODEL, encode_means, principal_axes
from vae_model import CheckpointError, atomic_write, load_checkpoint, psnr, vae_loss

# -----------------------------------------------------------------------------------------------
MODEL_PATH = "vae_model.pth"                 # checkpoint written by train_vae.py
IMAGE_PATH = "pokemon_sample_test.png"       # image to reconstruct, found beside this script
OUTPUT_PATH = "vae_results/sample_reconstruction.png"  # figure of the default mode
GENERATED_PATH = "vae_results/generated.png"           # grid of --generate
INTERPOLATION_PATH = "vae_results/interpolation.png"   # strip of --interpolate (GIF beside it)
LATENT_MAP_PATH = "vae_results/latent_map.png"         # figure of --latent-map
STEPS = 10                      # points on the line of --interpolate
SAMPLE_STEPS = latent_prior.SAMPLE_STEPS  # denoising steps of the learned prior (200)
GUIDANCE = latent_prior.GUIDANCE          # autoguidance by the prior's guide (1.5); 1: off
GUIDANCE_INTERVAL = latent_prior.GUIDANCE_INTERVAL  # noise levels t where it acts (0.2-0.7)
TEMPERATURE = 1.0               # spread of the prior's noise: below 1, flatter, paler samples
SEED = 0                        # seeds the latents drawn by --generate
CACHE_DIR = DEFAULT_CACHE_DIR   # decoded images of --latent-map, --data: train_vae.py's cache
MAP_THUMBNAIL = 24              # side of each image on --latent-map, px (larger when few)
# -----------------------------------------------------------------------------------------------


def model_path(given):
    """--model if given; else vae_model.pth where there is one; else the shipped model, said."""
    if given or os.path.exists(MODEL_PATH):
        return given or MODEL_PATH
    shipped = os.path.relpath(SHIPPED_MODEL)  # pretrained/pokemon_vae.pth in the project
    if shipped.startswith(".."):  # run from another folder: the whole path
        shipped = SHIPPED_MODEL
    print(f"using the shipped model {shipped} (Pokémon at 128 px), as there is no {MODEL_PATH} "
          "here; train your own with `python train_vae.py`")
    return shipped


def load_model(path, device):
    """The model, its learned prior and its guide (vae_api.Trained), or one sentence why not."""
    try:
        return vae_api.load(path, device)
    except FileNotFoundError:
        raise UserError(f"there is no trained model at {path}; run `python train_vae.py` first "
                        "or pass --model with the path of one") from None
    except CheckpointError as error:
        raise UserError(f"{error}; pass --model with a checkpoint of train_vae.py") from error


def open_picture(path, flag="--image"):
    """An image file as an RGB PIL image, or one sentence on what is wrong with it."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not an image; pass {flag} with the path of an "
                        "image file")
    if not os.path.isfile(path):
        raise UserError(f"the image {path} does not exist; pass {flag} with the path of an image")
    try:
        return open_rgb(path)
    except TooLarge as error:
        raise UserError(f"{path} is too large: {error}; pass a smaller image") from None
    except UNREADABLE as error:  # the same files the cache skips
        raise UserError(f"{path} is not a readable image ({type(error).__name__}); "
                        "pass a PNG or JPEG file") from error


def load_folder(folder, vae, flag, cache_dir=CACHE_DIR):
    """A folder's images as uint8 (N, 3, size, size), memory-mapped from training's cache: read
    from disk a batch at a time, so memory stays flat in the number of images."""
    if os.path.isfile(folder):
        raise UserError(f"{folder} is a file, not a folder; pass {flag} with a folder of images")
    if not os.path.isdir(folder):
        raise UserError(f"the folder {folder} does not exist; pass {flag} with an existing "
                        "folder of images")
    files = image_files(folder, flag)
    return cached_images(files, vae.image_size, vae.fit, folder, cache_dir)


def to_picture(tensor):
    """(3, H, W) in [-1, 1] -> (H, W, 3) in [0, 1] for matplotlib."""
    return tensor.float().add(1).div(2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def show_or_save(fig, path, show):
    import matplotlib.pyplot as plt  # matplotlib and torchvision where used: --help needs neither
    kind = picture_format(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=kind, dpi=100, bbox_inches="tight"))
    print(f"saved {path}")
    if show:
        plt.show()
    plt.close(fig)


def as_tensor(pictures):
    """PIL images -> uint8 (N, 3, H, W), as grids take them."""
    from torchvision.transforms.v2.functional import pil_to_tensor
    return torch.stack([pil_to_tensor(picture) for picture in pictures])


def save_grid(images, path, nrow, show):
    save_png(images, path, nrow)
    print(f"saved {path}")
    if show:
        import matplotlib.pyplot as plt
        plt.imshow(plt.imread(path))  # the grid just saved, as it is on disk
        plt.axis("off")
        plt.show()


# --- Default mode: reconstruct one image and show its latent ----------------------------------
@torch.no_grad()
def reconstruct(model, args, device, show):
    x = vae_api.to_input(model, open_picture(args.image))  # as training saw it, in [-1, 1]
    mu, log_var = model.vae.encode(x)
    recon = model.vae.decode(mu)  # decoding the mean, not a sample: the model's best guess
    kl = vae_loss(recon, x, mu, log_var)[2]  # the same closed form as in training
    print(f"reconstruction PSNR {psnr(recon, x):.2f} dB (KL {kl.item():.0f} nats)")
    channels = mu.shape[1]
    rows = 1 if channels <= 4 else 2  # the latent channels in one row, or two when there are many
    cols = math.ceil(channels / rows)
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(1.8 * (2 * rows + cols), 1.8 * rows + 0.6))
    grid = fig.add_gridspec(rows, 2 * rows + cols)
    panels = [(grid[:, :rows], to_picture(x[0]), "original", None),
              (grid[:, rows:2 * rows], to_picture(recon[0]), "reconstruction", None)]
    panels += [(grid[c // cols, 2 * rows + c % cols], mu[0, c].cpu().numpy(), f"latent {c}",
                "viridis") for c in range(channels)]
    for cell, picture, title, cmap in panels:
        axis = fig.add_subplot(cell)
        axis.imshow(picture, cmap=cmap)
        axis.set_title(title, fontsize=9 if cmap else None)
        axis.axis("off")
    show_or_save(fig, args.out, show)


# --- --generate: decode latents drawn from a prior --------------------------------------------
def fit_data_prior(vae, pixels, device):
    """A diagonal Gaussian fitted to real images' latent means (ex-post density estimation, Ghosh
    et al. 2020): samples where the encoder puts images, which N(0, I) only approximates."""
    mus = encode_means(vae, pixels)
    return mus.mean(0).to(device), mus.std(0).to(device)


def pick_prior(model, args):
    """The prior --generate draws from: "learned", "normal" or "data"; a note where the model
    has no learned prior."""
    if args.prior not in (None, "learned") or model.prior is not None:
        return args.prior or "learned"  # without a guide (--prior-guide-steps 0): unguided
    why = why_no_prior(model.path)
    if args.prior == "learned":
        raise UserError(f"{model.path} holds no learned prior: {why}; or pass --prior normal "
                        "or --prior data")
    print(f"note: {model.path} holds no learned prior: {why}; sampling from N(0, I) instead")
    return "normal"


def why_no_prior(path):
    """Why a model holds no prior, and the next step, from what train_vae.py wrote in it."""
    checkpoint = load_checkpoint(path)
    if "epoch" in checkpoint:
        return (f"it is a training checkpoint (after epoch {checkpoint['epoch']}); pass --model "
                "with the model its run saved (--out, vae_model.pth)")
    status = checkpoint.get("prior_status")
    if status == "to train":
        return ("its stage two did not finish; train the prior with `python train_vae.py "
                "--resume` (and the run's --results-dir)")
    if status == "none asked":
        return ("it was trained with --prior-steps 0; add one with `python train_vae.py "
                "--resume --prior-steps 4000` in its run")
    return "train one with `python train_vae.py` (its stage two)"


@torch.no_grad()
def generate(model, args, device, show):
    name = pick_prior(model, args)
    gaussian = None  # the learned prior
    if name == "data":
        pixels = load_folder(args.data, model.vae, "--data", args.cache_dir)
        gaussian = fit_data_prior(model.vae, pixels, device)
    elif name == "normal":
        gaussian = (0.0, 1.0)
    # Below 1, the noise is drawn nearer its centre (reduced-temperature sampling, as in Glow,
    # Kingma and Dhariwal 2018): flatter, paler samples, at the cost of the texture distance.
    pictures = vae_api.generate(model, args.generate, args.seed, args.temperature, gaussian,
                                args.sample_steps, args.guidance, args.guidance_interval)
    guided = name == "learned" and model.guide is not None and args.guidance != 1
    line = f"{args.generate} samples from the {name} prior"
    line += f", autoguidance {args.guidance:g}" if guided else ""
    print(line + (f", temperature {args.temperature:g}" if args.temperature != 1 else ""))
    save_grid(as_tensor(pictures), args.out, min(8, args.generate), show)


# --- --interpolate: walk the straight line between two images' latent means -------------------
def interpolate(model, args, device, show):
    a, b = (open_picture(path, "--interpolate") for path in args.interpolate)
    frames = vae_api.interpolate(model, a, b, args.steps)
    pictures = frames + frames[-2:0:-1]  # there and back, so that the GIF loops without a jump
    # Two files, two names: --out names one (the GIF if it ends in .gif), the other lies beside.
    stem, animated = os.path.splitext(args.out)[0], args.out.lower().endswith(".gif")
    gif, strip = (args.out, stem + ".png") if animated else (stem + ".gif", args.out)
    atomic_write(gif, lambda tmp: pictures[0].save(tmp, format="GIF", save_all=True, loop=0,
                                                   append_images=pictures[1:], duration=120))
    print(f"saved {gif}")
    save_grid(as_tensor(frames), strip, args.steps, show)


# --- --latent-map: every image of a folder at its place in the latent space (PCA to 2-D) ------
def latent_positions(mus):
    """Each latent mean's coordinates on the first two principal directions of all of them."""
    flat = mus.flatten(1).cpu().double()
    axes, _ = principal_axes(mus.cpu(), 2)
    return ((flat - flat.mean(0)) @ axes.T).float()


def thumbnails(pixels, side, batch_size=64):
    """Every image at side x side px, uint8 (N, side, side, 3): what a map can show of each."""
    small = [F.interpolate(batch.float(), size=side, mode="area").round().byte()
             for batch in pixels.split(batch_size)]  # area: each pixel the mean of its block
    return torch.cat(small).permute(0, 2, 3, 1).numpy()


def latent_map(model, args, device, show):
    pixels = load_folder(args.latent_map, model.vae, "--latent-map", args.cache_dir)
    xy = latent_positions(encode_means(model.vae, pixels)).numpy()
    # Many images at MAP_THUMBNAIL px, so memory stays small in their number; a few drawn larger.
    shown = MAP_THUMBNAIL * max(1.0, 20 / len(pixels) ** 0.5)
    side = min(model.vae.image_size, round(shown))
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    fig, axis = plt.subplots(figsize=(12, 12))
    axis.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0)  # sets the axis limits
    for (x, y), thumbnail in zip(xy, thumbnails(pixels, side)):
        axis.add_artist(AnnotationBbox(OffsetImage(thumbnail, zoom=shown / side), (x, y),
                                       frameon=False))
    axis.set(title=f"{len(pixels)} images placed by the first two principal components of their "
             "latent means", xlabel="PC 1", ylabel="PC 2")
    show_or_save(fig, args.out, show)


# --- Command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Reconstruct, generate and explore with a trained VAE.",
                                formatter_class=HelpWithDefaults)
    add = p.add_argument
    add("--model", help=f"checkpoint written by train_vae.py (default: {MODEL_PATH} if there is "
        "one, else the shipped model in pretrained/)")
    add("--image", default=os.path.join(os.path.dirname(__file__), IMAGE_PATH),
        help="image to reconstruct (default mode)")
    add("--out", help="where to save the figure (default: per mode, in vae_results/)")
    add("--no-show", action="store_true", help="only save, never open a window")
    add("--device", default="auto", help="auto, cuda, mps or cpu")
    add_mode = p.add_mutually_exclusive_group().add_argument
    add_mode("--generate", type=positive_int, metavar="N", help="decode N latents from a prior")
    add_mode("--interpolate", nargs=2, metavar=("A", "B"), help="walk from image A to image B")
    add_mode("--latent-map", metavar="FOLDER", help="map a folder's images in latent space")
    add("--prior", choices=["learned", "normal", "data"],
        help="--generate from the model's learned prior (default), N(0, I), or fitted to --data")
    add("--sample-steps", type=positive_int, default=SAMPLE_STEPS, help="the learned prior's")
    add("--guidance", default=GUIDANCE,
        type=checked(float, lambda v: v >= 1, "a number of at least 1 (1 turns it off)"),
        help="autoguidance of the learned prior by its smaller guide")
    add("--guidance-interval", nargs=2, metavar=("LO", "HI"), default=GUIDANCE_INTERVAL,
        type=checked(float, lambda v: 0 <= v <= 1, "a noise level from 0 to 1"),
        help="noise levels (1: pure noise) between which autoguidance acts")
    add("--temperature", type=positive_float, default=TEMPERATURE, help="below 1: paler samples")
    add("--data", metavar="FOLDER", help="images to fit --prior data to")
    add("--steps", type=checked(int, lambda v: v >= 2, "at least 2 (the two ends)"), default=STEPS,
        help="points on the --interpolate line")
    add("--seed", type=int, default=SEED, help="seeds the latents drawn by --generate")
    add("--cache-dir", default=CACHE_DIR, help="decoded images of a folder, as train_vae.py's")
    args = p.parse_args(argv)
    args.guidance_interval = tuple(args.guidance_interval)
    check_mode_flags(p, args)
    return args


def check_mode_flags(p, args):
    """p.error (exit status 2) for a flag the chosen mode or prior would ignore, or bad values."""
    learned_only = ("sample_steps", "guidance", "guidance_interval")
    if args.guidance_interval[0] > args.guidance_interval[1]:
        p.error(f"argument --guidance-interval: LO must not exceed HI, got "
                f"{args.guidance_interval}")
    changed = [key for key in ("prior", "temperature", "steps") + learned_only
               if getattr(args, key) != p.get_default(key)]
    uses = {"--generate N": args.generate, "--interpolate A B": args.interpolate}
    for key in changed:
        flag = "--" + key.replace("_", "-")
        mode = "--interpolate A B" if key == "steps" else "--generate N"
        if not uses[mode]:
            p.error(f"argument {flag}: only {mode.split()[0]} uses it; add {mode}")
        if key in learned_only and args.prior in ("normal", "data"):
            p.error(f"argument {flag}: only the learned prior uses it, not --prior {args.prior}")
    if args.prior == "data" and not args.data:
        p.error("argument --prior: data needs --data FOLDER, the images to fit it to")
    if args.data and args.prior != "data":
        p.error("argument --data: only --prior data uses it; add --prior data or drop --data")


def check_suffix(path, gif=False):
    """--out names a picture this script can write: PNG or JPEG (--interpolate: GIF too)."""
    suffixes = list(PICTURE_FORMATS) + ([".gif"] if gif else [])
    if os.path.splitext(path)[1].lower() not in suffixes:
        raise UserError(f"--out {path}: this mode writes {', '.join(suffixes)} files; pass --out "
                        "with a name that ends in one of those")


def main():
    args = parse_args()
    # A window only where one can open; headless runs (servers, CI) just save the figure.
    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    show = not args.no_show and (sys.platform in ("darwin", "win32") or bool(display))
    modes = [(args.generate, generate, GENERATED_PATH), (args.interpolate, interpolate,
              INTERPOLATION_PATH), (args.latent_map, latent_map, LATENT_MAP_PATH),
             (True, reconstruct, OUTPUT_PATH)]
    mode, out = next((run, out) for chosen, run, out in modes if chosen)  # the first one asked for
    args.out = args.out or out

    def run():
        check_suffix(args.out, gif=mode is interpolate)  # before any work
        device = pick_device(args.device)
        model = load_model(model_path(args.model), device)
        check_writable(args.out, "--out")  # before the work, which may take a minute
        mode(model, args, device, show)
    run_main(run)


if __name__ == "__main__":
    main()
