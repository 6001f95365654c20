"""vae_api.py and the shipped model: a model in a few lines of Python, inside torch.no_grad() or
not; the shipped file loads safely and still does what its README records; sample_vae.py falls
back to it."""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vae_api
from conftest import ROOT, run_script
from vae_model import psnr

SHIPPED_README = os.path.join(ROOT, "pretrained", "README.md")


def recorded(pattern):
    with open(SHIPPED_README, encoding="utf-8") as file:
        return float(re.search(pattern, file.read()).group(1))


def test_the_shipped_model_loads_safely_and_meets_its_recorded_figures():
    """Made again by pretrained/ship.py whenever the checkpoint format changes: this fails first."""
    assert os.path.getsize(vae_api.SHIPPED_MODEL) <= 12e6
    checkpoint = torch.load(vae_api.SHIPPED_MODEL, weights_only=True)
    weights = [checkpoint["model"]] + [checkpoint[part]["model"] for part in ("prior", "guide")]
    assert {w.dtype for state in weights for w in state.values() if w.is_floating_point()} == {torch.float16}
    model = vae_api.load()
    assert model.path == vae_api.SHIPPED_MODEL and model.prior is not None and model.guide is not None
    assert model.vae.image_size == 128 and next(model.vae.parameters()).dtype == torch.float32
    x = vae_api.to_input(model, os.path.join(ROOT, "pokemon_sample_test.png"))
    with torch.no_grad():
        measured = psnr(model.vae.decode(model.vae.encode(x)[0]), x)
    assert abs(measured - recorded(r"reconstruction PSNR (\d+\.\d+) dB")) < 0.01


@pytest.mark.parametrize("inside_no_grad", [False, True])
def test_the_functions_give_latents_and_pil_images_with_or_without_no_grad(trained, image_folder, inside_no_grad):
    model = vae_api.load(trained["model"])
    path = os.path.join(image_folder, "blob_02.png")
    with torch.no_grad() if inside_no_grad else torch.enable_grad():
        z = vae_api.encode(model, path)
        same = vae_api.encode(model, Image.open(path))  # a PIL image is prepared as the file is
        pictures = vae_api.decode(model, torch.cat([z, same]))
        new = vae_api.generate(model, 3, seed=1, steps=2)
        walk = vae_api.interpolate(model, path, Image.open(os.path.join(image_folder, "blob_04.png")), steps=4)
    assert z.shape == (1, model.vae.config["latent_channels"], 4, 4) and not z.requires_grad
    assert torch.equal(z, same)
    for picture in pictures + new + walk:
        assert isinstance(picture, Image.Image) and picture.size == (32, 32) and picture.mode == "RGB"
    assert len(new) == 3 and len(walk) == 4
    assert np.asarray(pictures[0]).dtype == np.uint8  # the failure that no_grad used to hide
    assert np.array_equal(np.asarray(pictures[0]), np.asarray(walk[0]))  # the walk starts at its image


def test_load_reads_the_file_once_for_the_model_its_prior_and_its_atlas(trained, monkeypatch):
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: reads.append(args) or real_load(*args, **kwargs))
    model = vae_api.load(trained["model"])
    assert len(reads) == 1 and model.prior is not None and model.guide is not None
    stored = real_load(trained["model"], weights_only=True)["atlas"]
    assert stored.keys() == model.atlas.keys()
    assert all(torch.equal(stored[name], model.atlas[name]) for name in stored)


def test_generate_is_repeatable_by_seed_and_decodes_the_priors_latents(trained):
    model = vae_api.load(trained["model"])
    first, again, other = (vae_api.generate(model, 2, seed=seed, steps=3) for seed in (5, 5, 6))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    noise = torch.randn(2, model.vae.config["latent_channels"], 4, 4, generator=torch.Generator().manual_seed(5))
    from latent_prior import sample_prior
    with torch.no_grad():
        expected = model.vae.decode(sample_prior(model.prior, noise, 3, model.guide))
    drawn = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in first]).float()
    assert (drawn - expected.add(1).mul(127.5)).abs().max() <= 1


def test_sample_vae_uses_the_shipped_model_where_no_model_is_at_hand(trained, tmp_path):
    """No --model and no vae_model.pth: the shipped model, said in one line; a vae_model.pth here
    is used before it; a --model that is missing stays an error."""
    out = tmp_path / "new.png"
    result = run_script("sample_vae.py", "--generate", 2, "--sample-steps", 2, "--no-show", "--out", out,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "using the shipped model" in result.stdout and "python train_vae.py" in result.stdout
    with Image.open(out) as grid:
        assert grid.size == (2 * 130 + 2, 132)  # two 128-px images, padded by 2
    shutil.copy(trained["model"], tmp_path / "vae_model.pth")
    result = run_script("sample_vae.py", "--generate", 2, "--sample-steps", 2, "--no-show", "--out", out,
                        cwd=tmp_path)
    assert result.returncode == 0 and "shipped" not in result.stdout, result.stderr[-2000:]
    with Image.open(out) as grid:
        assert grid.size == (2 * 34 + 2, 36)  # the 32-px model found here
