"""benchmarks/: each script runs end to end on a tiny budget, so that its tables can be re-made:
time to quality and its ablation switches, the GPU check's CPU mode, memory, and the measures of
sample quality."""
import ast
import math
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_user_error

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_samples  # noqa: E402  (benchmarks/ is not a package: found through sys.path)


def test_bench_train_prints_one_row_per_recipe(image_folder):
    recipes = ["baseline", "project", "project:norm=batch,up=transpose,res=off"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"),
                             "--data", image_folder, "--image-size", "32", "--minutes", "0.05",
                             "--recipes", *recipes], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert [row.split("|")[1].strip() for row in rows] == recipes
    for row in rows:  # every cell after the name and the precision is a finite number
        cells = [cell.strip().rstrip("%") for cell in row.split("|")[3:-1]]
        cells = [cell for cell in cells if cell != "n/a"]  # bf16 share, where bf16 is emulated
        assert len(cells) >= 9 and all(math.isfinite(float(cell)) for cell in cells), row
    # Each recipe trains for its whole budget. (How its learning rate follows the clock is tested
    # below without a clock: a loaded machine takes too few steps in 3 s to show the schedule.)
    runs = [ast.literal_eval(line[len("done: "):]) for line in result.stderr.splitlines() if line.startswith("done: ")]
    assert [run["recipe"] for run in runs] == recipes
    for run in runs:
        assert 0.05 * 60 <= run["seconds"] < 0.05 * 60 + 5, run


def test_bench_train_stretches_the_one_cycle_schedule_over_the_time_budget():
    from bench_train import follow_clock, one_cycle
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = one_cycle(optimizer, 1e-3, warmup=0.3)
    optimizer.step()  # no gradient, so no change; the scheduler warns if it steps first
    lrs = []
    for fraction in (0.0, 0.15, 0.3, 0.65, 0.9999):  # uneven gaps, as slow or fast steps leave them
        follow_clock(scheduler, fraction)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] < 1e-4 < lrs[1] < lrs[2]  # climbs from lr / 25 ...
    assert lrs[2] == pytest.approx(1e-3, rel=1e-3)  # ... to the peak at the end of the warm-up ...
    assert lrs[2] > lrs[3] > lrs[4] and lrs[4] < 1e-6  # ... and anneals to almost nothing at the end


def test_bench_train_evaluates_a_trained_model(image_folder, trained):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"),
                             "--data", image_folder, "--evaluate", trained["model"]],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"val PSNR ([\d.]+) dB, val KL / image ([\d.]+) nats, val objective / image ([\d.]+)",
                      result.stdout)
    assert found, result.stdout
    psnr, kl, objective = map(float, found.groups())
    assert 5 < psnr < 60 and kl > 0 and objective > 0.1 * kl, result.stdout


def test_bench_train_evaluate_names_a_missing_model(image_folder, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"),
                             "--data", image_folder, "--evaluate", tmp_path / "none.pth"],
                            capture_output=True, text=True, timeout=300)
    assert_user_error(result, "none.pth", "train_vae.py")


def test_ablation_undoes_each_design_choice():
    import torch.nn as nn
    from bench_train import ablate
    from vae_model import VAE, ResBlock

    def count(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())

    plain = VAE(32, 4, (8, 16, 16))
    assert count(plain, nn.GroupNorm) > 0 and count(plain, ResBlock) > 0 and count(plain, nn.Upsample) == 2
    model = ablate(VAE(32, 4, (8, 16, 16)), {"norm": "batch", "up": "transpose", "res": "off"})
    assert count(model, nn.GroupNorm) == 0 and count(model, nn.BatchNorm2d) > 0
    assert count(model, ResBlock) == 0
    assert count(model, nn.Upsample) == 0 and count(model, nn.ConvTranspose2d) == 2
    recon, mu, _ = model(torch.rand(2, 3, 32, 32))
    assert recon.shape == (2, 3, 32, 32) and mu.shape == (2, 4, 4, 4)


def test_the_gpu_check_runs_end_to_end_in_its_cpu_mode(image_folder, tmp_path):
    """The prepared GPU check, in the small CPU mode (no install, no test suite, 32 and 16 px):
    its numbers, the projected default run made of them, the log and the 16-sample grid."""
    import json
    from PIL import Image
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--cpu",
                             "--data", image_folder, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for key in ("images_per_s_big", "images_per_s_small", "prior_steps_per_s", "guide_steps_per_s", "evaluate_s"):
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert results["tests_exit_status"] is None and results["train_images"] == 11  # 12 images, 1 held out
    vae_min = 200 * (11 / results["images_per_s_big"] + results["evaluate_s"]) / 60
    prior_min = (4000 / results["prior_steps_per_s"] + 1000 / results["guide_steps_per_s"]) / 60
    assert results["projected_vae_min"] == pytest.approx(vae_min)
    assert results["projected_prior_min"] == pytest.approx(prior_min)
    assert results["projected_total_min"] == pytest.approx(vae_min + prior_min + results["decode_s"] / 60)
    log = (out / "log.txt").read_text()
    assert f"| images/s at 32 px, batch 8 | {results['images_per_s_big']:.1f} |" in log
    assert f"| {results['projected_total_min']:.0f} min" in log and "test suite: skipped" in log
    assert "latent: 2 levels" in log  # the 4 x 4 latent of 32 px
    assert results["torchrun_images_per_s"]["1"] > 0 and "torchrun, 1 process(es): trained" in log
    with Image.open(out / "samples_32.png") as grid:  # 16 samples of 32 px, 8 to a row
        assert grid.size == (8 * 34 + 2, 2 * 34 + 2)
        assert len(np.unique(np.asarray(grid.convert("RGB")).reshape(-1, 3), axis=0)) > 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine with a CUDA GPU the check would run")
def test_the_gpu_check_says_when_there_is_no_gpu(image_folder, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--no-setup",
                             "--data", image_folder, "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: no CUDA GPU is visible" in result.stdout.strip().splitlines()[-1]


def test_the_memory_benchmark_times_a_first_and_a_second_run_of_linked_folders(image_folder, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_memory.py"),
                             "--data", image_folder, "--copies", "2", "--sizes", "32", "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = [line for line in result.stdout.splitlines() if line.startswith("| 24 |")]
    cells = [cell.strip().removesuffix(" GB") for cell in row.split("|")[1:-1]]
    assert cells[:2] == ["24", "32"] and all(float(cell) > 0 for cell in cells[2:]), row
    linked = tmp_path / "2x"  # hard links under distinct names, not copies
    assert sorted(os.listdir(linked))[:2] == ["00_blob_00.png", "00_blob_01.png"] and len(os.listdir(linked)) == 24
    assert os.stat(linked / "01_blob_03.png").st_ino == os.stat(os.path.join(image_folder, "blob_03.png")).st_ino
    [cache] = os.listdir(tmp_path / "cache")  # the runs' own cache, kept apart from the user's
    assert "-32px-pad-" in cache and cache.endswith(".npy")


# ------------------------------------------------------------------ benchmarks/bench_samples.py

def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    a = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
    assert abs(bench_samples.frechet_distance(a, a)) < 1e-6
    shifts = [bench_samples.frechet_distance(a, a + s) for s in (0.5, 1.0, 2.0)]
    assert shifts[0] == pytest.approx(6 * 0.25, rel=1e-6) and shifts[0] < shifts[1] < shifts[2]
    # A wider spread counts too: scaling a set by 2 moves its mean m to 2m and gives
    # tr(C + 4C - 2 (4C^2)^1/2) = tr(C) for the covariances.
    b = torch.randn(500, 3, generator=torch.Generator().manual_seed(1)).double()
    expected = b.mean(0).pow(2).sum() + torch.cov(b.T).trace()
    assert bench_samples.frechet_distance(b, 2 * b) == pytest.approx(expected.item(), rel=1e-9)


def test_one_piece_counts_figures_that_are_not_fragments():
    images = torch.ones(4, 3, 32, 32)  # white
    images[0, :, 4:20, 4:20] = -1  # one square
    images[1, :, 4:12, 4:12] = images[1, :, 20:28, 20:28] = -1  # two apart
    images[2, :, 4:12, 4:12] = images[2, 0, 24:27, 24:27] = -1  # one square and a red speck
    images[3, :, 4:12, 4:12] = images[3, :, 12:20, 12:20] = 0  # two grey squares touching corners
    assert [bench_samples.one_piece(image[None]) for image in images] == [1, 0, 1, 1]
    assert bench_samples.one_piece(images) == 0.75
    assert bench_samples.one_piece(torch.ones(2, 3, 8, 8)) == 0  # nothing drawn: no figure
    images[0, :, 1:31, 1:31] = -1  # one piece, but it fills the frame: not a figure on white
    assert bench_samples.one_piece(images[:1]) == 0


def test_bench_samples_prints_every_row(trained, image_folder, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_samples.py"),
                             "--model", str(trained["model"]), "--data", image_folder, "--samples", "16",
                             "--val-fraction", "0.3", "--sample-steps", "3", "--grids", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "distance" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["real training images (floor)", "real latents (reconstructions)", "N(0, I)",
                     "diagonal data prior", "PCA Gaussian", "learned prior without autoguidance",
                     "learned prior (chosen)", f"learned prior at temperature {bench_samples.LOW_TEMPERATURE}"]
    for name, row in zip(names, rows):
        layout, texture, whole, copy = (float(cell) for cell in row.split("|")[2:6])
        assert layout > -1e-6 and texture > -1e-6 and 0 <= whole <= 1, row
        # The floor's samples are training images: each is its own nearest neighbour.
        assert (copy == 0) == (name == "real training images (floor)"), row
    assert len(os.listdir(tmp_path)) == 6
    # The low-temperature row draws from the same noise, shrunk: other samples, other distances.
    assert rows[-1].split("|")[2:6] != rows[-2].split("|")[2:6]
    # Stage two's training time, stored in the checkpoint, belongs to the chosen row alone.
    assert float(rows[-2].split("|")[6]) > 0 and rows[-1].split("|")[6].strip() == ""

    # Another --draw-seed draws other samples from every prior, against the same real images;
    # --low-temperature 0 leaves that row out, and --only draws only the priors it names.
    again = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_samples.py"),
                            "--model", str(trained["model"]), "--data", image_folder, "--samples", "16",
                            "--val-fraction", "0.3", "--sample-steps", "3", "--draw-seed", "1",
                            "--low-temperature", "0", "--only", "learned prior"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]

    def distances(row):
        return row.split("|")[2:6]

    rows_again = [line for line in again.stdout.splitlines() if line.startswith("| ") and "distance" not in line]
    kept = [name for name in names[:-1] if name.startswith("real") or "learned prior" in name]
    assert [row.split("|")[1].strip() for row in rows_again] == kept == names[:2] + names[5:7]
    assert [distances(row) for row in rows_again[:2]] == [distances(row) for row in rows[:2]]
    assert all(distances(a) != distances(b) for a, b in zip(rows_again[2:], rows[5:7]))


def test_bench_samples_names_a_missing_model(image_folder, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_samples.py"),
                             "--model", str(tmp_path / "none.pth"), "--data", image_folder],
                            capture_output=True, text=True, timeout=300)
    assert_user_error(result, "none.pth", "train_vae.py")


def test_bench_ddp_measures_one_process_against_two_and_projects_from_the_gradient(image_folder, tmp_path):
    import json
    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_ddp.py"), "--data", image_folder,
                             "--out", str(out), "--parts", "speed", "quality", "--epochs", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    speed = results["speed"]
    assert speed["gradient_bytes"] == 4 * 952_344 and speed["allreduce_s"] > 0  # the VAE's float32 gradient
    assert speed["one_process"]["images_per_s"] > 0 and speed["two_processes"]["images_per_s"] > 0
    rows = {(row["gpus"], row["link"]): row for row in speed["projection"]}
    assert rows[(1, "NVLink")]["efficiency"] == 1.0 and len(rows) == 11
    # A ring all-reduce of n processes: 2 (n - 1) hops of 1/n of the gradient each.
    assert rows[(4, "25 Gbit/s")]["allreduce_ms"] == pytest.approx(1e3 * 6 * (4 * 952_344 / 4 / 2.8e9 + 50e-6))
    assert rows[(2, "PCIe 4.0")]["efficiency"] > rows[(4, "PCIe 4.0")]["efficiency"] > rows[(8, "PCIe 4.0")]["efficiency"]
    for run in results["quality"].values():
        assert math.isfinite(run["val_psnr"]) and run["val_psnr"] > 0
    assert "| 2 x 1 (gloo) | 1 |" in result.stdout and "| 2 x 1 |" in result.stdout


# ------------------------------------------------------------------ benchmarks/bench_fingerprint.py
def test_the_fingerprint_benchmark_times_distinct_files_cold_and_warm(image_folder, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_fingerprint.py"),
                             "--data", image_folder, "--copies", "2", "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = [line for line in result.stdout.splitlines() if line.startswith("| 24 |")]
    assert all(float(cell) >= 0 for cell in row.split("|")[2:-1]), row
    copies = [open(tmp_path / "2x" / f"{k:02d}_blob_03.png", "rb").read() for k in (0, 1)]
    assert copies[0] != copies[1] and copies[0].startswith(open(os.path.join(image_folder, "blob_03.png"), "rb").read())
