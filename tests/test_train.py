"""train_vae.py end to end, as a subprocess on generated images."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

import train_vae
from conftest import ROOT, HF_HOME, assert_user_error, blob_image, make_folder, run_script, train_in_process
from latent_prior import load_prior
from vae_model import VAE, atomic_write, load_vae


def read_metrics(results):
    with open(os.path.join(results, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def test_training_writes_model_grids_metrics_and_curve(trained):
    results = trained["results"]
    model = load_vae(trained["model"])
    assert model.image_size == 32 and model.config["latent_channels"] == train_vae.LATENT_CHANNELS
    rows = read_metrics(results)
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in ("train_mse", "train_kl", "val_loss", "val_psnr", "val_kl", "images_per_s", "elapsed_s"):
        assert all(isinstance(row[key], float) for row in rows), key
    for name in ("recon_epoch_001.png", "recon_epoch_002.png", "samples_epoch_002.png", "loss_curve.png"):
        with Image.open(results / name) as image:
            image.verify()
    with Image.open(results / "recon_epoch_002.png") as grid:  # originals above reconstructions
        assert grid.height == 2 * 32 + 3 * 2
    assert "CPU defaults" not in trained["stdout"]  # it passed --image-size, --epochs and --batch-size


@pytest.mark.parametrize("device", ["cpu", "mps"])  # an Apple GPU gets the laptop's defaults too
@pytest.mark.parametrize("flags, named", [([], "--image-size, --epochs, --batch-size"),
                                          (["--image-size", "32", "--epochs", "2"], "--batch-size")])
def test_the_first_line_names_the_cpu_defaults_it_used(device, flags, named, capsys, tmp_path):
    args, _ = train_vae.settings(train_vae.parse_args(flags), torch.device(device), tmp_path / "checkpoint.pth")
    assert args.batch_size == train_vae.CPU_BATCH_SIZE
    gpu = f"{train_vae.IMAGE_SIZE} px, {train_vae.EPOCHS} epochs, batch {train_vae.BATCH_SIZE}"
    assert f"(CPU defaults for {named}; with a CUDA GPU: {gpu})" in capsys.readouterr().out


def test_scripts_write_only_under_the_paths_their_flags_name(trained):
    assert sorted(os.listdir(trained["work"])) == ["out"]
    assert sorted(os.listdir(trained["work"] / "out")) == ["model.pth", "results"]
    assert not any(name.endswith(".tmp") or ".tmp" in name for name in os.listdir(trained["results"]))


def test_ctrl_c_saves_and_resume_finishes_the_same_epochs(tmp_path, image_folder):
    results = tmp_path / "results"
    args = [sys.executable, os.path.join(ROOT, "train_vae.py"), "--data", image_folder,
            "--epochs", "60", "--image-size", "32", "--batch-size", "4", "--save-every", "100", "--prior-steps", "0",
            "--out", str(tmp_path / "m.pth"), "--results-dir", str(results)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": HF_HOME, "MPLBACKEND": "Agg"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (results / "metrics.jsonl").exists() and len(read_metrics(results)) >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    stopped = torch.load(results / "checkpoint.pth", weights_only=True)["epoch"]
    assert 2 <= stopped < 60
    assert not (tmp_path / "m.pth").exists()

    # The command it prints continues the run as started, --prior-steps 0 included; flags that
    # would change the VAE are named and ignored.
    command = shlex.split(stderr.split("continue with `")[1].split("`")[0])
    assert command[:3] == ["python", "train_vae.py", "--resume"], stderr[-2000:]
    result = run_script("train_vae.py", *command[2:], "--epochs", 5, "--lr", 0.5)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ignoring --epochs, --lr" in result.stdout
    assert f"resuming after epoch {stopped} of 60" in result.stdout
    assert [row["epoch"] for row in read_metrics(results)] == list(range(1, 61))
    assert load_vae(tmp_path / "m.pth").image_size == 32 and load_prior(tmp_path / "m.pth") == (None, None)


def test_folder_with_odd_images_trains_on_the_rest_and_counts_the_skipped(tmp_path):
    folder = make_folder(tmp_path / "images", count=4)
    (tmp_path / "images" / "broken.png").write_bytes(os.urandom(500))
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    good = tmp_path / "images" / "blob_00.png"
    (tmp_path / "images" / "truncated.png").write_bytes(good.read_bytes()[:150])
    # Every mode a user's folder may hold must load.
    blob_image(1, (40, 30)).convert("RGBA").save(tmp_path / "images" / "rgba.png")
    blob_image(2, (30, 40)).convert("LA").save(tmp_path / "images" / "la.png")
    blob_image(3).convert("P").save(tmp_path / "images" / "palette.png", transparency=0)
    blob_image(4).convert("L").save(tmp_path / "images" / "grey.png")
    blob_image(5).convert("I;16").save(tmp_path / "images" / "grey16.png")
    blob_image(6).convert("CMYK").save(tmp_path / "images" / "cmyk.jpg")
    blob_image(7, (16, 16)).save(tmp_path / "images" / "tiny.png")
    blob_image(8, (4000, 3000)).save(tmp_path / "images" / "huge.jpg")
    result = run_script("train_vae.py", "--data", folder, "--epochs", 1, "--image-size", 32, "--prior-steps", 0,
                        "--out", tmp_path / "m.pth", "--results-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 3 file(s)" in result.stdout  # broken.png, truncated.png and notes.txt
    assert "11 training and 1 validation images" in result.stdout


def test_amp_code_path_runs_on_the_cpu(tmp_path, image_folder):
    result = run_script("train_vae.py", "--data", image_folder, "--epochs", 1, "--image-size", 32,
                        "--device", "cpu", "--amp", "on", "--prior-steps", 5, "--prior-width", 8,
                        "--prior-guide-steps", 2,
                        "--out", tmp_path / "m.pth", "--results-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bfloat16 autocast" in result.stdout
    assert load_vae(tmp_path / "m.pth").image_size == 32
    assert load_prior(tmp_path / "m.pth")[0].config["width"] == 8  # stage two ran under autocast too


def test_augmentation_flips_rotates_and_keeps_uint8():
    import train_vae
    torch.manual_seed(0)
    batch = torch.full((4, 3, 32, 32), 255, dtype=torch.uint8)
    batch[:, :, :, :8] = 0  # a black stripe on the left edge of every image
    left_dark, right_dark, rotated = 0, 0, 0
    for _ in range(40):
        out = train_vae.make_augment()(batch)
        assert out.dtype == torch.uint8 and out.shape == batch.shape
        left_dark += int(out[0, :, 12:20, :4].float().mean() < 128)
        right_dark += int(out[0, :, 12:20, -4:].float().mean() < 128)
        # A rotation tilts the stripe's edge: its top and bottom rows then differ.
        rotated += int((out[0, 0, 2] < 128).sum() != (out[0, 0, -3] < 128).sum())
    assert left_dark > 5 and right_dark > 5 and left_dark + right_dark == 40
    assert rotated > 20


# ------------------------------------------------------------------ exact resume, NaN, atomic saves

SMALL_RUN = ("--epochs", 5, "--image-size", 32, "--batch-size", 4, "--save-every", 100, "--prior-steps", 0,
             "--device", "cpu", "--amp", "off", "--seed", 3)
TIMING = ("images_per_s", "elapsed_s")


def without_timing(rows):
    return [{key: value for key, value in row.items() if key not in TIMING} for row in rows]


def interrupt_in_epoch(monkeypatch, epoch_to_stop):
    """Ctrl-C (a real SIGINT to this process) in the middle of one epoch, at a known epoch."""
    real = train_vae.train_one_epoch

    def epoch_with_ctrl_c(*args):
        if args[-1] == epoch_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)
    monkeypatch.setattr(train_vae, "train_one_epoch", epoch_with_ctrl_c)


class Recorder(torch.nn.Module):
    """A stand-in VAE that keeps the batches it is given."""

    def __init__(self):
        super().__init__()
        self.weight, self.batches = torch.nn.Parameter(torch.ones(())), []

    def forward(self, x):
        self.batches.append(x.clone())
        zeros = torch.zeros(len(x), 1, 1, 1)
        return x * self.weight, zeros, zeros


def test_an_epoch_indexes_every_training_image_once_in_the_seeded_order():
    """The images stay where place_images put them (on the CPU here; on a GPU the same
    indexing runs there) and every batch is an index into them, in the seeded order."""
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    index = torch.tensor([9, 2, 7, 0, 4, 5, 1])  # the training images among them
    placed, placed_index = train_vae.place_images(images, index, torch.device("cpu"))
    assert placed is images and placed_index is index
    model, args = Recorder(), train_vae.parse_args(["--batch-size", "3"])
    args.epochs, args.use_amp = 1, False
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_vae.train_one_epoch(model, images, index, lambda batch: batch, optimizer, scheduler,
                              torch.Generator().manual_seed(5), args, torch.device("cpu"), 1)
    seen = [batch[:, 0, 0, 0].add(1).mul(127.5).round().long().tolist() for batch in model.batches]
    order = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    assert seen == [index[pick].tolist() for pick in order.split(3)]


class FakeImages:
    """Just enough of 100 uint8 images of 1 MB each for place_images, without a GPU."""

    def __getitem__(self, rows):
        return self if isinstance(rows, torch.Tensor) else torch.zeros(1_000_000, dtype=torch.uint8)

    def to(self, device):
        return f"a chunk on {device}"


@pytest.mark.parametrize("free_gb, moved", [(0.4, True), (0.39, False)])
def test_the_training_images_go_to_the_gpu_where_they_fit_in_its_share_of_free_memory(monkeypatch, free_gb, moved):
    images, rows = FakeImages(), torch.arange(1000)[:100]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gb * 1e9, 80e9))
    monkeypatch.setattr(torch, "cat", lambda chunks: chunks)
    monkeypatch.setattr(torch, "arange", lambda n, device: (n, str(device)))
    placed = train_vae.place_images(images, rows, torch.device("cuda"))
    assert train_vae.GPU_DATA_SHARE == 0.25
    if moved:  # copied there, and renumbered
        assert placed == (["a chunk on cuda"], (100, "cuda"))
    else:
        assert placed[0] is images and placed[1] is rows
    assert train_vae.place_images(images, rows, torch.device("cpu"))[0] is images


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, image_folder, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_in_process("--data", image_folder, *SMALL_RUN, "--results-dir", whole, "--out", whole / "m.pth") == 0
    interrupt_in_epoch(monkeypatch, 3)
    assert train_in_process("--data", image_folder, *SMALL_RUN, "--results-dir", parts, "--out", parts / "m.pth") == 130
    assert torch.load(parts / "checkpoint.pth", weights_only=True)["epoch"] == 3  # the epoch under way ended
    assert len(read_metrics(parts)) == 3 and not (parts / "m.pth").exists()
    monkeypatch.undo()
    # The device is the resuming command line's; the prior's flags are the run's own (--prior-steps 0).
    assert train_in_process("--resume", "--results-dir", parts, "--device", "cpu") == 0
    assert load_prior(parts / "m.pth") == (None, None)
    assert without_timing(read_metrics(parts)) == without_timing(read_metrics(whole))
    a, b = load_vae(whole / "m.pth").state_dict(), load_vae(parts / "m.pth").state_dict()
    assert all(torch.allclose(a[key], b[key], rtol=0, atol=1e-6) for key in a)


@pytest.mark.parametrize("what", ["train loss", "val loss", "weights"])
def test_a_non_finite_loss_or_weight_in_epoch_3_keeps_the_checkpoint_of_epoch_2(tmp_path, image_folder,
                                                                              monkeypatch, what):
    """Each check on its own: the other numbers of epoch 3 are made to look fine."""
    real_epoch, real_evaluate, epochs, last_good = train_vae.train_one_epoch, train_vae.evaluate, [], {}

    def epoch_that_diverges(model, *args):
        mse, kl = real_epoch(model, *args)
        epochs.append(args[-1])
        if args[-1] == 3 and what == "weights":
            next(model.parameters()).data[0] = float("nan")
        return (float("nan") if args[-1] == 3 and what == "train loss" else mse), kl

    def evaluation_that_looks_fine(*args):
        if epochs[-1] != 3:
            last_good.update(real_evaluate(*args))
            return dict(last_good)
        return {**last_good, "val_loss": float("nan")} if what == "val loss" else dict(last_good)
    monkeypatch.setattr(train_vae, "train_one_epoch", epoch_that_diverges)
    monkeypatch.setattr(train_vae, "evaluate", evaluation_that_looks_fine)
    with pytest.raises(train_vae.UserError, match="lower --lr .* --kl-weight .*epoch 2 is kept"):
        train_in_process("--data", image_folder, *SMALL_RUN, "--results-dir", tmp_path, "--out", tmp_path / "m.pth")
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
    assert [row["epoch"] for row in read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "m.pth").exists()


def test_a_diverging_run_says_what_to_do(tmp_path, image_folder):
    result = run_script("train_vae.py", "--data", image_folder, "--epochs", 3, "--image-size", 32, "--prior-steps", 0,
                        "--device", "cpu", "--lr", "1e30", "--out", tmp_path / "m.pth", "--results-dir", tmp_path / "r")
    assert_user_error(result, "lower --lr", "--kl-weight")
    assert not (tmp_path / "m.pth").exists()


def half_written(path, *args, **kwargs):
    """A save that dies halfway: some bytes reach the file it was given, then it fails."""
    with open(path, "wb") as file:
        file.write(b"\x89PNG half a file")
    raise OSError("disk full")


def only_these_files(folder, *names):
    return sorted(os.listdir(folder)) == sorted(names)


def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"the good version")
    with pytest.raises(OSError):
        atomic_write(str(path), half_written)
    assert path.read_bytes() == b"the good version" and only_these_files(tmp_path, "file.bin")


def test_pictures_metrics_and_curve_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    rows = [{"epoch": 1, "train_mse": 9.0, "train_kl": 1.0, "val_loss": 9.5, "val_psnr": 20.0}]
    train_vae.save_png(torch.zeros(2, 3, 8, 8), str(tmp_path / "grid.png"))
    train_vae.write_metrics(rows, str(tmp_path))
    train_vae.plot_loss_curve(rows, str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert sorted(before) == ["grid.png", "loss_curve.png", "metrics.jsonl"]

    monkeypatch.setattr(train_vae, "save_image", lambda images, path, **options: half_written(path))
    with pytest.raises(OSError):
        train_vae.save_png(torch.ones(2, 3, 8, 8), str(tmp_path / "grid.png"))
    monkeypatch.setattr(train_vae.plt.Figure, "savefig", lambda self, path, **options: half_written(path))
    with pytest.raises(OSError):
        train_vae.plot_loss_curve(rows * 2, str(tmp_path))
    dumps = json.dumps

    def dumps_until_row_2(row):  # the first row is already in the file when the second fails
        if row["epoch"] == 2:
            raise OSError("disk full")
        return dumps(row)
    monkeypatch.setattr(train_vae.json, "dumps", dumps_until_row_2)
    with pytest.raises(OSError):
        train_vae.write_metrics(rows + [{"epoch": 2}], str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before  # no .tmp either


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "m.pth"
    script = (f"import os, signal, torch, sys; sys.path.insert(0, {ROOT!r})\n"
              "from vae_model import VAE, atomic_write, save_checkpoint, vae_checkpoint\n"
              f"save_checkpoint(vae_checkpoint(VAE(32, 4, (8, 8, 8))), {str(path)!r})\n"
              "def dies(tmp):\n"
              "    open(tmp, 'wb').write(b'half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"atomic_write({str(path)!r}, dies)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert load_vae(path).config["latent_channels"] == 4


# ------------------------------------------------------------------ what is loaded

def test_a_folder_loads_every_image_whatever_the_names(tmp_path):
    """datasets' imagefolder would infer splits from these names and keep only "train"."""
    names = ["test_1.png", "train_2.jpg", "my-validation.png", "eval_4.jpg", "valid.png", "dev_6.png",
             "train/a.png", "train/b.jpg", "test/c.png", "validation/d.png", "deep/er/e.bmp", "x.gif"]
    for i, name in enumerate(names):
        os.makedirs(os.path.dirname(tmp_path / "data" / name), exist_ok=True)
        blob_image(i).save(tmp_path / "data" / name)
    (tmp_path / "data" / ".DS_Store").write_bytes(b"\0\1")  # a hidden file is not an image to count
    folder = str(tmp_path / "data")
    images = train_vae.cached_images(train_vae.image_files(folder), 32, "pad", folder, str(tmp_path / "cache"))
    assert images.shape == (len(names), 3, 32, 32) and images.dtype == torch.uint8
    result = run_script("train_vae.py", "--data", folder, "--epochs", 1, "--image-size", 32, "--prior-steps", 0,
                        "--out", tmp_path / "m.pth", "--results-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "11 training and 1 validation images" in result.stdout and "skipped" not in result.stdout


def test_a_table_with_the_hub_data_sets_schema_loads_through_the_hub_path(tmp_path, monkeypatch, capsys):
    """svjack/pokemon-blip-captions-en-zh is a table of encoded image bytes next to text columns.
    A copy of that schema, saved locally, goes through the very code that reads the Hub's."""
    import datasets
    import io as bytes_io
    pictures = [blob_image(i, (40 + i, 30)) for i in range(5)]
    encoded = []
    for picture in pictures:
        buffer = bytes_io.BytesIO()
        picture.save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    encoded.append({"bytes": b"not an image at all", "path": None})  # one corrupt row: skipped
    table = datasets.Dataset.from_dict(
        {"image": encoded, "text": ["a pokemon"] * 6, "zh_text": ["宝可梦"] * 6},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "zh_text": datasets.Value("string")}))
    os.makedirs(tmp_path / "hub" / "data")
    table.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    load_dataset = datasets.load_dataset
    asked = []

    def from_the_local_copy(name, split):
        asked.append((name, split))
        return load_dataset(str(tmp_path / "hub"), split=split)
    monkeypatch.setattr(train_vae, "hub_reachable", lambda: True)
    monkeypatch.setattr(train_vae.datasets, "load_dataset", from_the_local_copy)
    files = train_vae.image_files(train_vae.DATASET)
    assert asked == [(train_vae.DATASET, "train")]
    images = train_vae.cached_images(files, 32, "pad", train_vae.DATASET, str(tmp_path / "cache"))
    assert "skipped 1 file(s)" in capsys.readouterr().out  # the Hub's images go through the same cache
    expected = torch.stack([pil_to_tensor(train_vae.to_square(picture, 32)) for picture in pictures])
    assert torch.equal(images, expected)


def test_bad_input_creates_no_file(tmp_path):
    (tmp_path / "empty").mkdir()
    for data in (tmp_path / "nope", tmp_path / "empty"):
        result = run_script("train_vae.py", "--data", data, "--results-dir", tmp_path / "r",
                            "--out", tmp_path / "m.pth", cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
    assert only_these_files(tmp_path, "empty")


# ------------------------------------------------------------------ mixed precision, for what it does

@pytest.mark.parametrize("amp", ["on", "off", "auto"])
def test_amp_runs_the_model_in_bfloat16_exactly_when_it_says_so(tmp_path, image_folder, monkeypatch, capsys, amp):
    dtypes = []

    class Recording(VAE):
        def forward(self, x):
            recon, mu, log_var = super().forward(x)
            dtypes.append(recon.dtype)
            return recon, mu, log_var
    monkeypatch.setattr(train_vae, "VAE", Recording)
    assert train_in_process("--data", image_folder, "--epochs", 1, "--image-size", 32, "--batch-size", 6,
                            "--device", "cpu", "--amp", amp, "--prior-steps", 0,
                            "--results-dir", tmp_path, "--out", tmp_path / "m.pth") == 0
    said_bf16 = "bfloat16 autocast" in capsys.readouterr().out.splitlines()[0]
    assert set(dtypes) == {torch.bfloat16 if said_bf16 else torch.float32}
    if amp != "auto":
        assert said_bf16 == (amp == "on")


@pytest.mark.parametrize("amx, avx512_bf16, fast", [(True, False, True), (False, True, True), (False, False, False)])
def test_auto_amp_turns_bf16_on_for_a_cpu_with_bf16_instructions(monkeypatch, amx, avx512_bf16, fast):
    """AMX (Intel Xeon) or AVX-512 BF16 (AMD Zen 4) run bf16 natively; other CPUs would emulate it."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert train_vae.bf16_is_fast(torch.device("cpu")) == fast
    assert not train_vae.bf16_is_fast(torch.device("meta"))  # neither a CPU nor a CUDA GPU
