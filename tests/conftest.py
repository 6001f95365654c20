"""Shared fixtures: small generated images in a temporary folder, and one model trained on
them by the real script. Nothing here touches the network or ../shared."""
import os
import random
import subprocess
import sys
import tempfile

import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_HOME = tempfile.mkdtemp(prefix="vae_tests_hf_")  # keeps datasets' cache out of ~ and the repo
# Set before any test module imports datasets (through train_vae), so in-process tests are offline too.
CACHE_HOME = tempfile.mkdtemp(prefix="vae_tests_cache_")  # and train_vae.py's image cache out of ~/.cache
os.environ.update(HF_HOME=HF_HOME, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", XDG_CACHE_HOME=CACHE_HOME)
# pytest-xdist's workers share the cores: a thread or more each, for this worker and for the
# scripts it starts, or torch's threads in the workers spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def blob_image(seed, size=(48, 40), mode="RGB"):
    """A coloured ellipse and rectangle on white: a stand-in for a Pokémon on white."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    colour = tuple(rng.randrange(256) for _ in range(3))
    draw.ellipse([rng.randrange(w // 3), rng.randrange(h // 3), w - rng.randrange(1, w // 3),
                  h - rng.randrange(1, h // 3)], fill=colour)
    draw.rectangle([w // 3, h // 2, w // 2, h - 2], fill=tuple(255 - c for c in colour))
    return image.convert(mode)


def make_folder(folder, count=12, size=(48, 40)):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        blob_image(i, size).save(os.path.join(folder, f"blob_{i:02d}.png"))
    return str(folder)


def run_script(script, *args, cwd=None, env=None, timeout=300, root=ROOT):
    """Run one of the project's scripts (in `root`) as a user would, headless and offline."""
    full_env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "HF_HOME": HF_HOME,
                "XDG_CACHE_HOME": CACHE_HOME}
    for name in ("DISPLAY", "WAYLAND_DISPLAY") + PROXIES:  # no window; and no test goes out to the network
        full_env.pop(name, None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(root, script), *map(str, args)],
                          cwd=cwd or ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def grid_pixels(images, nrow):
    """What save_png writes for these images, as uint8 pixels."""
    grid = make_grid(images.add(1).div(2).clamp(0, 1), nrow=nrow, padding=2, pad_value=1)
    return grid.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()


def assert_user_error(result, *phrases):
    """Exit status 2, one clear message on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "error:" in message, result.stderr[-2000:]
    for phrase in phrases:
        assert phrase.lower() in message.lower(), message
    return message


@pytest.fixture(scope="package")
def image_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="package")
def trained(tmp_path_factory, image_folder):
    """train_vae.py at 32 px for 2 epochs and a small learned prior with its guide, run from an
    empty working folder."""
    work = tmp_path_factory.mktemp("work")
    result = run_script("train_vae.py", "--data", image_folder, "--epochs", 2, "--image-size", 32,
                        "--batch-size", 4, "--save-every", 1, "--prior-steps", 60, "--prior-width", 16,
                        "--prior-batch-size", 16, "--prior-guide-steps", 20, "--prior-guide-width", 8,
                        "--device", "cpu", "--out", "out/model.pth",
                        "--results-dir", "out/results", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"work": work, "model": work / "out" / "model.pth", "results": work / "out" / "results",
            "stdout": result.stdout}


def train_in_process(*argv):
    """train_vae.train() in this process, so that a test can patch its pieces; returns the exit
    status and leaves Ctrl-C as it found it."""
    import signal
    import train_vae
    previous = signal.getsignal(signal.SIGINT)
    try:
        return train_vae.train(train_vae.parse_args([str(arg) for arg in argv]))
    finally:
        signal.signal(signal.SIGINT, previous)
