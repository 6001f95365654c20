"""train_vae.py: the run end to end as a subprocess on generated images, and its pieces in
process: settings, one epoch, exact resume, Ctrl-C, divergence, whole-or-nothing saves, mixed
precision, and stage two (the learned prior)."""
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import matplotlib.figure
import numpy as np
import pytest
import torch
from PIL import Image

import cli
import distributed
import image_data
import latent_prior
import report
import train_vae
from conftest import HF_HOME, ROOT, assert_user_error, blob_image, make_folder, run_script, train_in_process
from latent_prior import LatentPrior, load_prior
from vae_model import VAE, load_vae


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


def test_training_saves_the_prior_and_its_guide_with_the_model(trained):
    prior, guide = load_prior(trained["model"])
    channels = train_vae.LATENT_CHANNELS
    assert isinstance(prior, LatentPrior) and prior.config == {"latent_channels": channels, "width": 16, "levels": 2}
    assert isinstance(guide, LatentPrior) and guide.config == {"latent_channels": channels, "width": 8, "levels": 2}
    # Both standardise the same codes the same way, so their predictions can be mixed.
    assert torch.equal(guide.latent_mean, prior.latent_mean) and torch.equal(guide.latent_std, prior.latent_std)
    checkpoint = torch.load(trained["model"], weights_only=True)
    assert checkpoint["prior"]["seconds"] > 0
    # The prior's standardisation comes from the encoder's codes, not the zeros it starts with.
    assert torch.isfinite(prior.latent_std).all() and (prior.latent_std > 0).all()
    assert not torch.equal(prior.latent_mean, torch.zeros_like(prior.latent_mean))
    assert "learned prior done" in trained["stdout"]
    with Image.open(trained["results"] / "samples_learned_prior.png") as grid:
        assert grid.size == (8 * 34 + 2, 2 * 34 + 2)


@pytest.mark.parametrize("device", ["cpu", "mps"])  # an Apple GPU gets the laptop's defaults too
@pytest.mark.parametrize("flags, named, gpu", [
    ([], "--image-size, --epochs, --batch-size", "512 px, 200 epochs, batch 8"),
    (["--image-size", "32", "--epochs", "2"], "--batch-size", "batch 8"),
    (["--batch-size", "4"], "--image-size, --epochs", "512 px, 200 epochs")])
def test_the_first_line_names_only_the_cpu_defaults_it_used(device, flags, named, gpu, capsys, tmp_path):
    args = train_vae.settings(train_vae.parse_args(flags), torch.device(device))
    assert args.image_size and args.epochs and args.batch_size
    line = capsys.readouterr().out
    assert line.endswith(f" (CPU defaults for {named}; with a CUDA GPU: {gpu})\n"), line


def test_scripts_write_only_under_the_paths_their_flags_name(trained):
    assert sorted(os.listdir(trained["work"])) == ["out"]
    assert sorted(os.listdir(trained["work"] / "out")) == ["model.pth", "results"]
    assert not any(name.endswith(".tmp") or ".tmp" in name for name in os.listdir(trained["results"]))


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
    grey = np.asarray(blob_image(5).convert("L")).astype(np.uint16) * 257  # 0..65535
    Image.fromarray(grey).save(tmp_path / "images" / "grey16.png")  # mode I;16 (Pillow 10.0 too)
    blob_image(6).convert("CMYK").save(tmp_path / "images" / "cmyk.jpg")
    blob_image(7, (16, 16)).save(tmp_path / "images" / "tiny.png")
    blob_image(8, (4000, 3000)).save(tmp_path / "images" / "huge.jpg")
    result = run_script("train_vae.py", "--data", folder, "--epochs", 1, "--image-size", 32, "--prior-steps", 0,
                        "--out", tmp_path / "m.pth", "--results-dir", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 3 file(s): 3 files not readable as an image" in result.stdout  # broken, truncated, notes.txt
    assert "32 px, 1 epoch, batch" in result.stdout and "decoding 15 files once" in result.stdout
    assert "11 training and 1 validation images" in result.stdout


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
    args.epochs, args.use_amp, args.amp_dtype = 1, False, "bfloat16"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_vae.train_one_epoch(model, images, index, 1, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                              augment=lambda batch: batch, shuffle=torch.Generator().manual_seed(5), args=args,
                              device=torch.device("cpu"))
    seen = [batch[:, 0, 0, 0].add(1).mul(127.5).round().long().tolist() for batch in model.batches]
    order = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    assert seen == [index[pick].tolist() for pick in order.split(3)]


# ------------------------------------------------------------------ Ctrl-C, exact resume, NaN, whole saves


def stop_after(rows, signum, tmp_path, image_folder):
    """train_vae.py for 60 epochs, sent `signum` once `rows` epochs are in metrics.jsonl; its exit
    status, stderr and results folder."""
    results = tmp_path / "results"
    args = [sys.executable, os.path.join(ROOT, "train_vae.py"), "--data", image_folder, "--epochs", "60",
            "--image-size", "32", "--batch-size", "4", "--save-every", "100", "--prior-steps", "0", "--device", "cpu",
            "--out", str(tmp_path / "m.pth"), "--results-dir", str(results)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": HF_HOME, "MPLBACKEND": "Agg"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (results / "metrics.jsonl").exists() and len(read_metrics(results)) >= rows):
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr, results


def test_ctrl_c_saves_and_resume_finishes_the_same_epochs(tmp_path, image_folder):
    status, stderr, results = stop_after(3, signal.SIGINT, tmp_path, image_folder)
    assert status == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    stopped = torch.load(results / "checkpoint.pth", weights_only=True)["epoch"]
    assert 2 <= stopped < 60
    assert not (tmp_path / "m.pth").exists()

    # The command it prints continues the run as started, --prior-steps 0 included; flags that
    # would change the VAE are refused by name, and nothing is written.
    command = shlex.split(stderr.split("continue with `")[1].split("`")[0])
    assert command[:3] == ["python", "train_vae.py", "--resume"], stderr[-2000:]
    before = (results / "checkpoint.pth").read_bytes()
    refused = run_script("train_vae.py", *command[2:], "--epochs", 5, "--lr", 0.5)
    assert_user_error(refused, "keeps the settings it started with; drop --epochs 5, --lr 0.5", "new run")
    assert (results / "checkpoint.pth").read_bytes() == before
    result = run_script("train_vae.py", *command[2:])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming after epoch {stopped} of 60" in result.stdout
    assert [row["epoch"] for row in read_metrics(results)] == list(range(1, 61))
    assert load_vae(tmp_path / "m.pth").image_size == 32 and load_prior(tmp_path / "m.pth") == (None, None)


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, image_folder):
    """What Slurm, Kubernetes and `kill` send: the epoch under way ends and is saved."""
    status, stderr, results = stop_after(2, signal.SIGTERM, tmp_path, image_folder)
    assert status == 130, stderr[-2000:]
    assert "SIGTERM: saving the work under way" in stderr and "Traceback" not in stderr
    stopped = torch.load(results / "checkpoint.pth", weights_only=True)["epoch"]
    assert 2 <= stopped < 60 and len(read_metrics(results)) == stopped
    assert f"interrupted after epoch {stopped}; epochs 1-{stopped} are saved" in stderr


SMALL_RUN = ("--epochs", 5, "--image-size", 32, "--batch-size", 4, "--save-every", 100, "--prior-steps", 0,
             "--device", "cpu", "--amp", "off", "--seed", 3)


TIMING = ("images_per_s", "elapsed_s")


def without_timing(rows):
    return [{key: value for key, value in row.items() if key not in TIMING} for row in rows]


def interrupt_in_epoch(monkeypatch, epoch_to_stop):
    """Ctrl-C (a real SIGINT to this process) in the middle of one epoch, at a known epoch."""
    real = train_vae.train_one_epoch

    def epoch_with_ctrl_c(model, images, index, epoch, **state):
        if epoch == epoch_to_stop:
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, images, index, epoch, **state)
    monkeypatch.setattr(train_vae, "train_one_epoch", epoch_with_ctrl_c)


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


def test_a_resumed_run_keeps_its_fit(tmp_path, image_folder, monkeypatch, capsys):
    run = ("--data", image_folder, "--epochs", 3, "--image-size", 32, "--batch-size", 4, "--prior-steps", 0,
           "--device", "cpu", "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth")
    real = train_vae.train_one_epoch
    interrupt_in_epoch(monkeypatch, 1)
    assert train_in_process(*run, "--fit", "crop") == 130
    said = capsys.readouterr().err
    assert "Ctrl-C: saving the work under way, then stopping" in said
    assert "interrupted after epoch 1; epoch 1 is saved in" in said  # one epoch, in words
    monkeypatch.setattr(train_vae, "train_one_epoch", real)
    assert train_in_process(*run, "--resume") == 0
    assert load_vae(tmp_path / "m.pth").fit == "crop"


@pytest.mark.parametrize("change", ["added", "removed"])
def test_a_resume_on_a_changed_folder_is_refused_and_changes_nothing(tmp_path, monkeypatch, change):
    """A run remembers its images: on others its schedule and its split would not be its own."""
    folder = make_folder(tmp_path / "images", count=6)
    run = ("--data", folder, "--epochs", 3, "--image-size", 32, "--batch-size", 4, "--prior-steps", 0,
           "--device", "cpu", "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth")
    interrupt_in_epoch(monkeypatch, 1)
    assert train_in_process(*run) == 130
    if change == "added":
        make_folder(folder, count=7)
    else:
        os.remove(os.path.join(folder, "blob_00.png"))
    before = (tmp_path / "r" / "checkpoint.pth").read_bytes()
    result = run_script("train_vae.py", "--resume", "--results-dir", tmp_path / "r")
    assert_user_error(result, f"the images in {folder} are not those this run started with",
                      "put them back", "without --resume")
    assert (tmp_path / "r" / "checkpoint.pth").read_bytes() == before


def test_a_resume_on_a_finished_run_has_nothing_to_do_unless_new_prior_flags_ask(tmp_path, trained):
    """Nothing is written, --prior-steps 0 keeps the prior there is, new prior flags train it again."""
    work = tmp_path / "work"
    shutil.copytree(trained["work"], work)

    def files():
        return {path: path.read_bytes() for path in sorted((work / "out").rglob("*")) if path.is_file()}
    before = files()
    for flags in ([], ["--prior-steps", 0]):
        result = run_script("train_vae.py", "--resume", "--results-dir", "out/results", "--device", "cpu",
                            *flags, cwd=work)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "is finished, its model in out/model.pth: nothing left to do" in result.stdout
        assert files() == before
    assert load_prior(work / "out" / "model.pth")[0] is not None
    result = run_script("train_vae.py", "--resume", "--results-dir", "out/results", "--device", "cpu",
                        "--prior-steps", 5, "--prior-width", 8, "--prior-guide-steps", 0, cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    prior, guide = load_prior(work / "out" / "model.pth")
    assert prior.config["width"] == 8 and guide is None


@pytest.mark.parametrize("what", ["train loss", "val loss", "weights"])
def test_a_non_finite_loss_or_weight_in_epoch_3_keeps_the_checkpoint_of_epoch_2(tmp_path, image_folder,
                                                                              monkeypatch, what):
    """Each check on its own: the other numbers of epoch 3 are made to look fine."""
    real_epoch, real_evaluate, epochs, last_good = train_vae.train_one_epoch, train_vae.evaluate, [], {}

    def epoch_that_diverges(model, images, index, epoch, **state):
        mse, kl = real_epoch(model, images, index, epoch, **state)
        epochs.append(epoch)
        if epoch == 3 and what == "weights":
            next(model.parameters()).data[0] = float("nan")
        return (float("nan") if epoch == 3 and what == "train loss" else mse), kl

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


def half_written(path, *args, **kwargs):
    """A save that dies halfway: some bytes reach the file it was given, then it fails."""
    with open(path, "wb") as file:
        file.write(b"\x89PNG half a file")
    raise OSError("disk full")


def test_pictures_metrics_and_curve_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    rows = [{"epoch": 1, "train_mse": 9.0, "train_kl": 1.0, "val_loss": 9.5, "val_psnr": 20.0}]
    image_data.save_png(torch.zeros(2, 3, 8, 8), str(tmp_path / "grid.png"))
    report.write_metrics(rows, str(tmp_path))
    report.plot_loss_curve(rows, str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert sorted(before) == ["grid.png", "loss_curve.png", "metrics.jsonl"]

    monkeypatch.setattr(Image.Image, "save", lambda self, path, **options: half_written(path))
    with pytest.raises(OSError):
        image_data.save_png(torch.ones(2, 3, 8, 8), str(tmp_path / "grid.png"))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, **options: half_written(path))
    with pytest.raises(OSError):
        report.plot_loss_curve(rows * 2, str(tmp_path))
    dumps = json.dumps

    def dumps_until_row_2(row):  # the first row is already in the file when the second fails
        if row["epoch"] == 2:
            raise OSError("disk full")
        return dumps(row)
    monkeypatch.setattr(report.json, "dumps", dumps_until_row_2)
    with pytest.raises(OSError):
        report.write_metrics(rows + [{"epoch": 2}], str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before  # no .tmp either


# ------------------------------------------------------------------ mixed precision, for what it does

@pytest.mark.parametrize("amp", ["on", "off", "auto"])
def test_amp_runs_the_vae_and_its_prior_in_bfloat16_exactly_when_it_says_so(tmp_path, image_folder, monkeypatch,
                                                                            capsys, amp):
    """The first line says whether bfloat16 autocast is on; the VAE's steps and stage two's
    (the prior and its guide) then run in it, or all in float32."""
    dtypes = {"vae": set(), "prior": set()}

    class RecordingVAE(VAE):
        def forward(self, x):
            recon, mu, log_var = super().forward(x)
            dtypes["vae"].add(recon.dtype)
            return recon, mu, log_var

    class RecordingPrior(LatentPrior):
        def forward(self, z_t, t):
            v = super().forward(z_t, t)
            if self.training:  # its training steps, not the samples drawn at the end
                dtypes["prior"].add(v.dtype)
            return v
    monkeypatch.setattr(train_vae, "VAE", RecordingVAE)
    monkeypatch.setattr(latent_prior, "LatentPrior", RecordingPrior)
    assert train_in_process("--data", image_folder, "--epochs", 1, "--image-size", 32, "--batch-size", 6,
                            "--device", "cpu", "--amp", amp, "--prior-steps", 3, "--prior-width", 8,
                            "--prior-guide-steps", 2, "--prior-guide-width", 8,
                            "--results-dir", tmp_path, "--out", tmp_path / "m.pth") == 0
    said_bf16 = "bfloat16 autocast" in capsys.readouterr().out.splitlines()[0]
    expected = {torch.bfloat16 if said_bf16 else torch.float32}
    assert dtypes == {"vae": expected, "prior": expected}
    if amp != "auto":
        assert said_bf16 == (amp == "on")


@pytest.mark.parametrize("capability, dtype, said", [((7, 5), "float16", "float16 autocast with loss scaling"),
                                                    ((8, 0), "bfloat16", "bfloat16 autocast")])
def test_a_cuda_gpu_autocasts_in_the_precision_its_tensor_cores_have(monkeypatch, capsys, capability, dtype,
                                                                     said):
    """A T4 (7.5) emulates bfloat16 but runs float16 natively; from 8.0 (A100, L4) bfloat16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    args = train_vae.settings(train_vae.parse_args([]), torch.device("cuda"))
    assert (args.use_amp, args.amp_dtype) == (True, dtype)
    assert capsys.readouterr().out == f"device cuda: 512 px, 200 epochs, batch 8, {said}\n"
    args = train_vae.settings(train_vae.parse_args(["--amp", "off"]), torch.device("cuda"))
    assert not args.use_amp and "autocast" not in capsys.readouterr().out


def test_float16_finds_its_loss_scale_and_its_scaler_resumes_exactly(tmp_path, image_folder, monkeypatch):
    """The float16 path of an older GPU, run on the CPU (its autocast and GradScaler work there):
    from torch's default scale, the first steps overflow and are skipped while the scale comes
    down, then steps are taken; the scaler is saved with each epoch, so that a resumed run
    equals one never stopped."""
    real_settings = train_vae.settings

    def float16_settings(args, device):
        args = real_settings(args, device)
        args.use_amp, args.amp_dtype = True, "float16"
        return args
    monkeypatch.setattr(train_vae, "settings", float16_settings)
    run = ("--data", image_folder, "--epochs", 4, "--image-size", 32, "--batch-size", 2, "--prior-steps", 0,
           "--device", "cpu")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_in_process(*run, "--results-dir", whole, "--out", whole / "m.pth") == 0
    scaler = torch.load(whole / "checkpoint.pth", weights_only=True)["scaler"]
    skipped = 16 - math.log2(scaler["scale"])  # each overflow halves the scale, from 2^16
    assert skipped >= 1 and scaler["_growth_tracker"] == 4 * 6 - skipped  # every step since counted
    real_epoch = train_vae.train_one_epoch
    interrupt_in_epoch(monkeypatch, 2)
    assert train_in_process(*run, "--results-dir", parts, "--out", parts / "m.pth") == 130
    monkeypatch.setattr(train_vae, "train_one_epoch", real_epoch)
    assert train_in_process("--resume", "--results-dir", parts) == 0
    assert torch.load(parts / "checkpoint.pth", weights_only=True)["scaler"] == scaler
    a, b = load_vae(whole / "m.pth").state_dict(), load_vae(parts / "m.pth").state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)


# ------------------------------------------------------------------ stage two: the learned prior


def test_the_prior_learns_the_codes_of_the_training_images_and_their_mirrors(monkeypatch, tmp_path):
    """Not of the training augmentation: its rotations and colour jitter would teach the prior
    tilted frames and grey backgrounds. Every image and its mirror, each exactly once."""
    torch.manual_seed(0)
    model = VAE(16, 4, (8, 8, 8)).eval()
    cache = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    rows = torch.tensor([6, 0, 3, 2, 5])  # the training images among them
    images = cache[rows]
    seen = []
    monkeypatch.setattr(train_vae, "fit_prior", lambda mus, *rest: seen.append(mus) or LatentPrior(4, 8))
    args = train_vae.parse_args(["--prior-guide-steps", "0", "--out", str(tmp_path / "m.pth"),
                                 "--results-dir", str(tmp_path)])
    args.use_amp = False  # set by settings(), which train() calls first
    noise = torch.randn(2, 4, 2, 2)
    assert train_vae.stage_two(model, cache, rows, args, torch.device("cpu"), [], noise, atlas=None)
    assert load_prior(tmp_path / "m.pth")[1] is None  # --prior-guide-steps 0: no guide
    with torch.no_grad():
        expected = [model.encode(image_data.to_model_range(x))[0] for x in (images, images.flip(-1))]
    codes = seen[0].flatten(1)
    assert len(codes) == 10
    for code in torch.cat(expected).flatten(1):  # each expected code once, in any order
        assert ((codes - code).abs().amax(1) < 1e-5).sum() == 1


def test_a_prior_whose_loss_is_not_finite_ends_in_a_clear_message(monkeypatch, tmp_path):
    """fit_prior raises FloatingPointError (test_latent_prior.py); stage two turns it into the
    sentence a user reads, and saves nothing."""
    def diverge(*args, **kwargs):
        raise FloatingPointError("the prior's loss became nan")
    monkeypatch.setattr(train_vae, "fit_prior", diverge)
    args = train_vae.parse_args(["--prior-lr", "0.5", "--out", str(tmp_path / "m.pth")])
    args.use_amp = False
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(train_vae.UserError, match=r"loss became nan; lower --prior-lr \(now 0.5\)"):
        train_vae.stage_two(VAE(16, 2, (8, 8, 8)).eval(), images, torch.arange(3), args, torch.device("cpu"), [],
                            torch.randn(1, 2, 2, 2), atlas=None)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_in_stage_two_keeps_the_vae_and_resume_trains_the_prior(tmp_path, image_folder):
    out, results = tmp_path / "m.pth", tmp_path / "r"
    args = [sys.executable, os.path.join(ROOT, "train_vae.py"), "--data", image_folder, "--epochs", "1",
            "--image-size", "32", "--device", "cpu", "--prior-steps", "1000000", "--prior-width", "16",
            "--prior-guide-steps", "7", "--out", str(out), "--results-dir", str(results)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": HF_HOME, "MPLBACKEND": "Agg"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not out.exists() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # inside stage two: the VAE is saved before it starts
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "saved in" in stderr
    assert "Ctrl-C: saving the work under way" in stderr and "epoch" not in stderr.split("Ctrl-C")[1]
    # The command it prints continues the run as it started, its prior flags included.
    assert f"`python train_vae.py --resume --results-dir {results}`" in stderr
    assert load_vae(out).image_size == 32 and load_prior(out) == (None, None)  # usable, without a prior
    result = run_script("sample_vae.py", "--model", out, "--prior", "learned", "--generate", 2, "--out", tmp_path / "g.png")
    assert_user_error(result, "holds no learned prior: its stage two did not finish",
                      "python train_vae.py --resume` (and the run's --results-dir)")

    # --resume after a finished VAE trains only the prior, with the prior flags given now where
    # there are (the guide's steps, given as 0 here, would otherwise be the run's 7).
    result = run_script("train_vae.py", "--resume", "--results-dir", results, "--prior-steps", 20,
                        "--prior-width", 8, "--prior-guide-steps", 0, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming after epoch 1 of 1" in result.stdout
    assert load_prior(out)[0].config["width"] == 8 and load_prior(out)[1] is None  # into the run's --out
    assert sorted(os.listdir(tmp_path)) == ["m.pth", "r"]


# ------------------------------------------------------------------ the same images elsewhere, typed flags on resume
def test_a_run_resumed_on_a_copy_of_its_images_elsewhere_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """As a cluster job that copies its data to a scratch disk (cp -r: new times) before it resumes."""
    folder = make_folder(tmp_path / "images", count=9)
    run = ("--epochs", 3, "--image-size", 32, "--batch-size", 4, "--prior-steps", 0, "--device", "cpu", "--seed", 3)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_in_process("--data", folder, *run, "--results-dir", whole, "--out", whole / "m.pth") == 0
    interrupt_in_epoch(monkeypatch, 2)
    assert train_in_process("--data", folder, *run, "--results-dir", parts, "--out", parts / "m.pth") == 130
    monkeypatch.undo()
    copy = shutil.copytree(folder, tmp_path / "scratch" / "images", copy_function=shutil.copyfile)
    shutil.rmtree(folder)
    assert train_in_process("--resume", "--results-dir", parts, "--data", copy) == 0
    assert without_timing(read_metrics(parts)) == without_timing(read_metrics(whole))
    a, b = load_vae(whole / "m.pth").state_dict(), load_vae(parts / "m.pth").state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    blob_image(99).save(os.path.join(copy, "blob_03.png"))  # now other images: refused
    result = run_script("train_vae.py", "--resume", "--results-dir", parts, "--data", copy, "--epochs", 4)
    assert_user_error(result, "drop --epochs 4")
    checkpoint = torch.load(parts / "checkpoint.pth", weights_only=True)
    checkpoint["epoch"] = 2  # as if stopped after epoch 2: the images are checked before training
    torch.save(checkpoint, parts / "checkpoint.pth")
    result = run_script("train_vae.py", "--resume", "--results-dir", parts, "--data", copy)
    assert_user_error(result, f"the images in {copy} are not those this run started with",
                      "pass --data with the folder that holds them", "without --resume")


def test_a_typed_flag_that_differs_from_the_runs_is_refused_on_resume_even_at_its_default(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "images", count=6)
    run = ("--data", folder, "--epochs", 3, "--image-size", 32, "--batch-size", 4, "--prior-steps", 0,
           "--device", "cpu", "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth")
    interrupt_in_epoch(monkeypatch, 1)
    assert train_in_process(*run, "--lr", 0.001) == 130
    before = (tmp_path / "r" / "checkpoint.pth").read_bytes()
    result = run_script("train_vae.py", "--resume", "--results-dir", tmp_path / "r", "--lr", train_vae.LEARNING_RATE)
    assert_user_error(result, f"drop --lr {train_vae.LEARNING_RATE}", "without --resume")
    assert (tmp_path / "r" / "checkpoint.pth").read_bytes() == before
    monkeypatch.undo()
    assert train_in_process("--resume", "--results-dir", tmp_path / "r", "--lr", 0.001) == 0  # the run's own: fine


def test_a_finished_runs_own_prior_flags_change_nothing_and_a_default_typed_trains_it_again(tmp_path, trained):
    work = tmp_path / "work"
    shutil.copytree(trained["work"], work)
    model = (work / "out" / "model.pth").read_bytes()
    result = run_script("train_vae.py", "--resume", "--results-dir", "out/results", "--device", "cpu",
                        "--prior-steps", 60, "--prior-guide-width", 8, cwd=work)  # as it was trained
    assert result.returncode == 0 and "nothing left to do" in result.stdout, result.stderr[-2000:]
    assert (work / "out" / "model.pth").read_bytes() == model
    result = run_script("train_vae.py", "--resume", "--results-dir", "out/results", "--device", "cpu",
                        "--prior-guide-width", train_vae.PRIOR_GUIDE_WIDTH, cwd=work)  # back to the default
    assert result.returncode == 0, result.stderr[-2000:]
    prior, guide = load_prior(work / "out" / "model.pth")
    assert guide.config["width"] == train_vae.PRIOR_GUIDE_WIDTH and prior.config["width"] == 16


# ------------------------------------------------------------------ one run per results folder
def test_a_second_run_on_a_live_runs_results_folder_is_refused_and_the_live_run_goes_on(tmp_path, image_folder):
    run = ("--data", image_folder, *SMALL_RUN, "--epochs", 60, "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth")
    live = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train_vae.py"), *map(str, run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in live.stdout:
            if line.startswith("epoch   1/60"):
                break
        result = run_script("train_vae.py", "--data", image_folder, *SMALL_RUN, "--results-dir", tmp_path / "r",
                            "--out", tmp_path / "other.pth")
        assert_user_error(result, f"{tmp_path / 'r'} is in use by a training run (process {live.pid} on this machine)",
                          "pass --results-dir with another folder")
        assert live.poll() is None  # the live run goes on
    finally:
        live.terminate()
        live.communicate(timeout=60)
    assert not (tmp_path / "r" / ".lock").exists()  # released by the run's end (SIGTERM: a clean stop)


def test_a_dead_processes_lock_is_taken_over_and_another_machines_honoured(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / ".lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    with cli.folder_lock(str(folder), "--results-dir") as path:
        assert path == str(folder / ".lock")
        assert (folder / ".lock").read_text() == f"{socket.gethostname()} {os.getpid()}\n"
    assert not (folder / ".lock").exists()  # released, and the folder kept: it was there before
    (folder / ".lock").write_text("gpu-node-7 4242\n")
    with pytest.raises(cli.UserError, match=f"in use by a training run on gpu-node-7 \\(process 4242\\); if it "
                                            f"has ended, delete {folder / '.lock'}"):
        with cli.folder_lock(str(folder), "--results-dir"):
            pass
    assert (folder / ".lock").read_text() == "gpu-node-7 4242\n"  # honoured, untouched


# ------------------------------------------------------------------ exact resume on a GPU: its random state too
def test_each_processs_gpu_random_state_is_saved_and_restored_beside_the_cpus(monkeypatch):
    """torch.cuda's generator functions stand in for a GPU's: the state travels as it is."""
    states = {"now": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: states.update(now=state))
    cuda = torch.device("cuda", 0)
    saved = distributed.rng_state(cuda)
    assert torch.equal(saved["cuda"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    cpu_before = torch.get_rng_state()
    torch.rand(3)
    states["now"] = torch.tensor([9, 9, 9], dtype=torch.uint8)
    distributed.set_rng_state(saved, cuda)
    assert torch.equal(states["now"], saved["cuda"]) and torch.equal(torch.get_rng_state(), cpu_before)
    distributed.set_rng_state(cpu_before, cuda)  # a checkpoint from before: the CPU's state alone
    assert torch.equal(torch.get_rng_state(), cpu_before)


def test_the_signal_handler_prints_nothing_and_the_first_look_says_so(capsys):
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = cli.stop_on_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        assert capsys.readouterr().err == "" and stop.signals == [signal.SIGTERM]
        assert stop and stop
        assert capsys.readouterr().err == "\nSIGTERM: saving the work under way, then stopping (again: stop at once)\n"
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
