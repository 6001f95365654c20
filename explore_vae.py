"""
Explore a trained VAE by hand, in the browser: reconstruct a Pokémon, walk its latent along the
principal directions of the training latents, draw new ones, slide from one to another.

    python explore_vae.py                              # the shipped model, on 127.0.0.1:7860
    python explore_vae.py --model vae_model.pth --port 8000

A local Gradio page. It makes no network call beyond this machine: Gradio's analytics are off
and its fonts are the system's. The page starts from the atlas training stores in the model
(vae_api.latent_atlas); for a model without one, from --data, or from samples of its prior.
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image

from cli import HelpWithDefaults, UserError, checked, pick_device, run_main
from image_data import DEFAULT_CACHE_DIR, UNREADABLE, TooLarge, cached_images, image_files
from latent_prior import sample_prior
import vae_api
from vae_model import CheckpointError, psnr

# -----------------------------------------------------------------------------------------------
MODEL_PATH = None           # checkpoint to explore; None: the shipped model in pretrained/
HOST = "127.0.0.1"          # address the page serves on: this machine only
PORT = None                 # port; None: Gradio's (7860, or the next free one)
DIRECTIONS = 4              # sliders of "Walk the latent": the first principal directions
SPAN = 3.0                  # each slider's reach, in standard deviations along its direction
GALLERY = 8                 # new Pokémon drawn at a time by "Generate"
SHOWN = 256                 # px, side at which the page shows a picture
ATLAS_SAMPLES = 64          # prior samples that stand in for the training latents, if need be
CACHE_DIR = DEFAULT_CACHE_DIR  # decoded images of --data, as train_vae.py's cache
# -----------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.abspath(__file__))


# --- What the page starts from: the model and its atlas ----------------------------------------
def load_explorer(path, data, device, cache_dir=CACHE_DIR):
    """(vae_api.Trained, atlas): the atlas stored by training, else made from --data's images,
    else from samples of the model's prior; one sentence where none of these is at hand."""
    try:
        model = vae_api.load(path, device)
    except FileNotFoundError:
        raise UserError(f"there is no trained model at {path}; run `python train_vae.py` first "
                        "or pass --model with the path of one") from None
    except CheckpointError as error:
        raise UserError(f"{error}; pass --model with a checkpoint of train_vae.py") from error
    atlas = model.atlas
    if data:
        pixels = cached_images(image_files(data), model.vae.image_size, model.vae.fit, data,
                               cache_dir)
        atlas = vae_api.latent_atlas(vae_api.encode_means(model.vae, pixels))
    elif atlas is None and model.prior is not None:
        print(f"{path} holds no atlas of its training latents: drawing {ATLAS_SAMPLES} from "
              "its prior instead (or pass --data with its images)")
        atlas = vae_api.latent_atlas(prior_latents(model, ATLAS_SAMPLES).cpu())
    elif atlas is None:
        raise UserError(f"{path} holds neither an atlas of its training latents nor a prior; "
                        "pass --data with the images it was trained on")
    return model, {name: value.to(device) for name, value in atlas.items()}


@torch.no_grad()
def prior_latents(model, count):
    """Latents drawn by the model's learned prior: what its training latents looked like."""
    return sample_prior(model.prior, vae_api.noise(model, count), guide=model.guide)


def shown(picture):
    """A picture at the page's size, its pixels kept square and sharp."""
    return picture.resize((SHOWN, SHOWN), Image.Resampling.NEAREST)


# --- Reconstruct: a picture beside its reconstruction and its latent channels -------------------
@torch.no_grad()
def reconstruct(model, picture):
    """(original, reconstruction, latent channels, PSNR line, latent) of an uploaded picture."""
    if picture is None:
        raise UserError("upload an image first (PNG or JPEG)")
    try:
        x = vae_api.to_input(model, picture)  # a path: its size is checked before decoding
    except TooLarge as error:
        raise UserError(f"that image is too large: {error}; upload a smaller one") from None
    except UNREADABLE as error:
        raise UserError(f"that file is not a readable image ({type(error).__name__}); upload "
                        "a PNG or JPEG") from None
    mu = model.vae.encode(x)[0]
    recon = model.vae.decode(mu)  # decoding the mean: the model's best guess
    line = f"reconstruction PSNR {psnr(recon, x):.2f} dB"
    original, again = vae_api.pictures(torch.cat([x, recon]))
    return shown(original), shown(again), channels_picture(mu[0]), line, mu


def channels_picture(mu):
    """The latent channels side by side in viridis, each normalised on its own: (C, h, w)."""
    import matplotlib
    tiles = []
    for channel in mu.float().cpu():
        low, high = channel.min(), channel.max()
        level = ((channel - low) / (high - low + 1e-8)).numpy()
        tiles.append((matplotlib.colormaps["viridis"](level)[..., :3] * 255).astype(np.uint8))
    gap = np.full((tiles[0].shape[0], 1, 3), 255, np.uint8)
    strip = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
    scale = max(1, SHOWN // (2 * strip.shape[0]))
    return Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale),
                                         Image.Resampling.NEAREST)


# --- Walk the latent, Interpolate: latents moved by hand, decoded at each move -----------------
def start_latent(atlas, start, uploaded):
    """A walk's start: the atlas's latent number `start`, or the uploaded picture's (-1)."""
    if start is None or int(start) < 0:
        if uploaded is None:
            raise UserError("reconstruct an image first (Reconstruct), or choose one of the "
                            "model's Pokémon")
        return uploaded
    return atlas["starts"][int(start)].unsqueeze(0)


@torch.no_grad()
def walk(model, atlas, start, offsets, uploaded=None):
    """The start moved offsets[k] standard deviations along principal direction k: the axes of
    `sample_vae.py --latent-map`, so that a slider moves across the map."""
    z = start_latent(atlas, start, uploaded)
    for k, offset in enumerate(offsets):
        z = z + offset * atlas["spread"][k] * atlas["directions"][k]
    return shown(vae_api.decode(model, z)[0])


@torch.no_grad()
def interpolate(model, atlas, a, b, t, uploaded=None):
    """The point t (0: a, 1: b) of the straight line between two starts' latents."""
    z_a, z_b = start_latent(atlas, a, uploaded), start_latent(atlas, b, uploaded)
    return shown(vae_api.decode(model, (1 - t) * z_a + t * z_b)[0])


def generate(model, seed, guidance):
    """GALLERY new Pokémon from the learned prior (N(0, I) without one)."""
    return [shown(p) for p in vae_api.generate(model, GALLERY, int(seed), guidance=guidance)]


# --- The page: four tabs, each a function above; an error is one sentence on the page ---------
def import_gradio():
    """Gradio, imported where the page is built (--help needs none of it), its analytics off."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio
    return gradio


def build_page(model, atlas, name):
    gr = import_gradio()
    choices = [("your image (from Reconstruct)", -1)]
    choices += [(f"training Pokémon {i + 1}", i) for i in range(len(atlas["starts"]))]

    def said(function):  # a user's mistake: one sentence on the page, not a traceback
        def run(*args):
            try:
                return function(*args)
            except UserError as error:
                raise gr.Error(str(error)) from None
        return run

    with gr.Blocks(title="VAE explorer", analytics_enabled=False) as page:
        gr.Markdown(f"## Exploring {name}\n\nEvery picture is decoded from a latent as you move.")
        mine = gr.State(None)  # the latent of the uploaded picture
        with gr.Tab("Reconstruct"):
            with gr.Row():
                upload = gr.File(label="a Pokémon (PNG or JPEG)", file_types=["image"],
                                 value=os.path.join(ROOT, "pokemon_sample_test.png"))
                original = gr.Image(label="as the model sees it", format="png")
                again = gr.Image(label="its reconstruction", format="png")
            channels = gr.Image(label="its latent channels (each scaled on its own)", format="png")
            quality = gr.Markdown()
        with gr.Tab("Walk the latent"):
            with gr.Row():
                with gr.Column():
                    start = gr.Dropdown(choices, value=0, label="start from")
                    sliders = [gr.Slider(-SPAN, SPAN, 0.0, step=0.1, label=f"direction {k + 1} "
                                         "(standard deviations)") for k in range(DIRECTIONS)]
                walked = gr.Image(label="decoded", format="png")
        with gr.Tab("Generate"):
            with gr.Row():
                seed = gr.Number(0, precision=0, label="seed")
                guidance = gr.Slider(1.0, 3.0, vae_api.GUIDANCE, step=0.1,
                                     label="autoguidance (1: off)")
                draw = gr.Button("Draw new Pokémon")
            drawn = gr.Gallery(label="new Pokémon", columns=4, format="png")
        with gr.Tab("Interpolate"):
            with gr.Row():
                with gr.Column():
                    a = gr.Dropdown(choices, value=0, label="from")
                    b = gr.Dropdown(choices, value=1, label="to")
                    t = gr.Slider(0.0, 1.0, 0.5, step=0.05, label="from (0) to (1)")
                between = gr.Image(label="decoded", format="png")

        show = dict(show_progress="hidden", trigger_mode="always_last")
        gr.on([page.load, upload.change], said(lambda file: reconstruct(model, file)),
              [upload], [original, again, channels, quality, mine], api_name="reconstruct")
        gr.on([start.change, page.load] + [s.change for s in sliders],
              said(lambda i, *rest: walk(model, atlas, i, rest[:-1], rest[-1])),
              [start, *sliders, mine], walked, api_name="walk", **show)
        draw.click(said(lambda s, g: generate(model, s, g)), [seed, guidance], drawn,
                   api_name="generate")
        gr.on([a.change, b.change, t.change, page.load],
              said(lambda i, j, x, z: interpolate(model, atlas, i, j, x, z)),
              [a, b, t, mine], between, api_name="interpolate", **show)
    return page


# --- Command line -------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="A page to explore a trained VAE by hand.",
                                formatter_class=HelpWithDefaults)
    add = p.add_argument
    add("--model", default=MODEL_PATH,
        help="checkpoint written by train_vae.py (default: the shipped model in pretrained/)")
    add("--data", metavar="FOLDER", help="its training images, for a model without an atlas")
    add("--host", default=HOST, help="address to serve on; 0.0.0.0 opens it to the network")
    add("--port", type=checked(int, lambda v: 0 < v < 65536, "a port from 1 to 65535"),
        default=PORT, help="port to serve on (default: Gradio's, 7860 or the next free one)")
    add("--device", default="auto", help="auto, cuda, mps or cpu")
    add("--cache-dir", default=CACHE_DIR, help="decoded images of --data, as train_vae.py's")
    return p.parse_args(argv)


def main():
    args = parse_args()

    def run():
        device = pick_device(args.device)
        path = args.model or vae_api.SHIPPED_MODEL
        model, atlas = load_explorer(path, args.data, device, args.cache_dir)
        gr = import_gradio()
        fonts = dict(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
        page = build_page(model, atlas, os.path.relpath(path))
        page.launch(server_name=args.host, server_port=args.port, show_error=True, ssr_mode=False,
                    theme=gr.themes.Default(**fonts))  # system fonts: none fetched from the web
    run_main(run)


if __name__ == "__main__":
    main()
