"""train_vae.py under torchrun: 2 CPU processes with gloo train one model, and survive Ctrl-C,
SIGTERM and a lost worker. Each test starts torchrun as a user would (python -m torch.distributed.run)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import ddp_step
import distributed
import train_vae
from conftest import CACHE_HOME, HF_HOME, ROOT, assert_user_error, run_script
from latent_prior import load_prior
from test_train_vae import Recorder
from vae_model import load_vae

PATCHED = os.path.join(ROOT, "tests", "patched_run.py")  # train_vae.py with a piece patched
RUN = ("--epochs", 6, "--image-size", 32, "--batch-size", 2, "--save-every", 100, "--prior-steps", 0,
       "--device", "cpu", "--seed", 1)


def torchrun(*args, nproc=2, cwd=None, wait=True, torchrun_flags=(), env=None, launcher=("-m", "torch.distributed.run")):
    """torchrun with `nproc` processes of one thread each on train_vae.py (or another script)."""
    script = args[0] if str(args[0]).endswith(".py") else os.path.join(ROOT, "train_vae.py")
    args = args[1:] if script == args[0] else args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": HF_HOME, "XDG_CACHE_HOME": CACHE_HOME, "MPLBACKEND": "Agg", **(env or {})}
    # --standalone: a free port of its own (the default 29500 would join runs of other tests).
    standalone = [] if "--nnodes" in torchrun_flags else ["--standalone"]
    command = [sys.executable, *launcher, *standalone, "--nproc_per_node", str(nproc),
               *torchrun_flags, script, *map(str, args)]
    if not wait:
        return subprocess.Popen(command, cwd=cwd or ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=300)


def finish(process, timeout=300):
    """communicate(); on a timeout, torchrun is told to stop its workers before the test fails."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.communicate(timeout=60)
        raise


def first_line(stdout):
    """The run's first line of its own: the Gloo that comes with torch 2.8 writes "[Gloo] Rank 0
    is connected to 1 peer ranks" to every process's standard output as it connects."""
    return next(line for line in stdout.splitlines() if not line.startswith("[Gloo]"))


def weights(path):
    return load_vae(path).state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def metrics_without_timing(results):
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "elapsed_s")} for row in rows]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, image_folder):
    """A 2-process run of RUN, never stopped: what a stopped and resumed one must equal."""
    work = tmp_path_factory.mktemp("undisturbed")
    result = torchrun(PATCHED, "--data", image_folder, *RUN, "--results-dir", work / "r", "--out", work / "m.pth",
                      "--cache-dir", work / "cache",  # a cache of its own: decoded in this run
                      env={"PATCH": "count-decodes", "DECODE_LOG": str(work / "decodes")})
    assert result.returncode == 0, result.stderr[-3000:]
    return {"work": work, "stdout": result.stdout, "stderr": result.stderr}


def test_two_processes_average_the_gradients_of_one_process_with_twice_the_batch(tmp_path):
    """2 ranks x batch 3 against 1 process x batch 6, on the same 6 images, augmentation and noise
    off: every image is in exactly one rank's share, and DDP averages what they computed."""
    result = torchrun(os.path.join(ROOT, "tests", "ddp_step.py"), 3, tmp_path / "two.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    gradients, losses = ddp_step.one_step(6)
    for a, b in zip(gradients, two["gradients"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two["losses"], losses, rtol=1e-5, atol=0)


def test_each_process_takes_an_equal_share_of_the_shuffled_order_and_together_every_image(monkeypatch):
    """7 images, 3 processes: every third of the epoch's shuffled order, filled up to 9 from its start."""
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    index, order = torch.tensor([9, 2, 7, 0, 4, 5, 1]), torch.randperm(7, generator=torch.Generator().manual_seed(5))
    args = train_vae.parse_args(["--batch-size", "2"])
    args.epochs, args.use_amp, args.amp_dtype = 1, False, "bfloat16"
    monkeypatch.setattr(train_vae, "WORLD_SIZE", 3)
    seen = []
    for rank in range(3):
        monkeypatch.setattr(train_vae, "RANK", rank)
        model = Recorder()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        train_vae.train_one_epoch(model, images, index, 1, optimizer=optimizer, scheduler=scheduler,
                                  scaler=torch.amp.GradScaler("cpu", enabled=False), augment=lambda batch: batch,
                                  shuffle=torch.Generator().manual_seed(5), args=args, device=torch.device("cpu"))
        seen.append([image for batch in model.batches for image in batch[:, 0, 0, 0].add(1).mul(127.5).round().long().tolist()])
    expected = index[torch.cat([order, order[:2]])]
    assert seen == [expected[rank::3].tolist() for rank in range(3)]


def test_torchrun_trains_one_model_in_half_the_steps_that_sample_vae_loads(undisturbed):
    work, results = undisturbed["work"], undisturbed["work"] / "r"
    assert "2 processes x batch 2 = 4" in first_line(undisturbed["stdout"])
    assert undisturbed["stdout"].count("epoch   1/6") == 1  # rank 0 alone speaks
    # One decoding on this machine, by its first process, while the other waits at the barrier.
    assert (work / "decodes").read_text() == "0\n"
    assert len(os.listdir(work / "cache")) == 1
    assert [row["epoch"] for row in metrics_without_timing(results)] == list(range(1, 7))
    checkpoint = torch.load(results / "checkpoint.pth", weights_only=True)
    # 11 training images: one process takes 6 steps of 2 an epoch, each of two processes 3.
    assert checkpoint["scheduler"]["_step_count"] - 1 == 6 * 3
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_states"]) == 2
    assert not torch.equal(*[state["cpu"] for state in checkpoint["rng_states"]])  # each its own draws
    result = run_script("sample_vae.py", "--model", work / "m.pth", "--no-show", "--device", "cpu",
                        "--out", work / "recon.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_prior(work / "m.pth") == (None, None)


def test_a_resume_with_another_number_of_processes_is_refused(undisturbed):
    result = run_script("train_vae.py", "--resume", "--results-dir", undisturbed["work"] / "r")
    assert_user_error(result, "trained by 2 process(es)", "not 1")


def worker_pids(process):
    """{rank: pid} of torchrun's workers."""
    pids = {}
    for child in open(f"/proc/{process.pid}/task/{process.pid}/children").read().split():
        try:
            environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):  # a child that ended since the listing
            continue
        ranks = [int(item[5:]) for item in environ if item.startswith(b"RANK=")]
        if ranks:  # a worker (a child that has not started the script yet has torchrun's environment)
            pids[ranks[0]] = int(child)
    return pids


def wait_for_epoch(process, epoch):
    for line in process.stdout:
        if line.startswith(f"epoch {epoch:3d}/"):
            return
    raise AssertionError(f"the run ended before epoch {epoch}: {process.stderr.read()[-3000:]}")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers in /proc")
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_undisturbed(tmp_path, image_folder, undisturbed):
    process = torchrun("--data", image_folder, *RUN, "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth",
                       wait=False, torchrun_flags=("--max-restarts", "1"))
    wait_for_epoch(process, 2)
    os.kill(worker_pids(process)[1], signal.SIGKILL)
    stdout, stderr = finish(process)
    assert process.returncode == 0, stderr[-3000:]
    assert "resuming after epoch" in stdout
    assert metrics_without_timing(tmp_path / "r") == metrics_without_timing(undisturbed["work"] / "r")
    assert_same_weights(weights(tmp_path / "m.pth"), weights(undisturbed["work"] / "m.pth"))


def test_ctrl_c_stops_every_process_and_resume_ends_as_if_undisturbed(tmp_path, image_folder, undisturbed):
    run = ("--data", image_folder, *RUN, "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth")
    process = torchrun(*run, wait=False)
    wait_for_epoch(process, 2)
    process.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends torchrun, which passes it on
    _, stderr = finish(process, 120)
    # torchrun itself ends in its SignalException's traceback; the workers stop cleanly.
    assert "Ctrl-C: saving the work under way" in stderr and 'train_vae.py", line' not in stderr
    assert stderr.count("interrupted after epoch") == 1, stderr[-3000:]
    stopped = torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=True)["epoch"]
    assert 2 <= stopped < 6 and not (tmp_path / "m.pth").exists()
    result = torchrun(*run, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming after epoch {stopped} of 6" in result.stdout
    assert metrics_without_timing(tmp_path / "r") == metrics_without_timing(undisturbed["work"] / "r")
    assert_same_weights(weights(tmp_path / "m.pth"), weights(undisturbed["work"] / "m.pth"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(tmp_path, image_folder, *flags, torchrun_flags=(), **options):
    """Two torchrun agents with --nnodes 2 on this machine, each with its own cache and results
    folders, as two machines without a shared disk would have."""
    rendezvous = ("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                  "--rdzv-id", "vae-test", *torchrun_flags)
    return [torchrun("--data", image_folder, *RUN[2:], *flags, "--cache-dir", tmp_path / f"cache{n}",
                     "--results-dir", tmp_path / f"r{n}", "--out", tmp_path / f"m{n}.pth", nproc=1, wait=False,
                     torchrun_flags=rendezvous, **options) for n in (0, 1)]


EXIT_BARRIER_S = 2  # how long the test's torchrun agents wait for each other at their exit


def exit_barrier_waits(stderr):
    """The seconds each failed wait at torchrun's exit barrier lasted, as its agent logs them.

    A wait that lasts the whole EXIT_BARRIER_S is an agent left waiting for rank 0's prior. A
    short one is torch's own race at the end: the agent that holds the store may close it while
    the other is still reading the barrier's last key; both have finished by then."""
    found = re.findall(r"Error waiting on exit barrier\. Elapsed: ([0-9.]+) seconds", stderr)
    return [float(seconds) for seconds in found]


def test_two_machines_build_a_cache_each_and_train_one_model_and_its_prior(tmp_path, image_folder):
    """Rank 0 trains the prior alone, longer than the other machine's torchrun would wait for it
    at its exit barrier (2 s here, 300 s by default): the other process waits for rank 0 instead."""
    agents = two_machines(tmp_path, image_folder, "--epochs", 2, "--prior-steps", 300, "--prior-width", 16,
                          "--prior-guide-steps", 0, env={"EXIT_BARRIER_S": str(EXIT_BARRIER_S)},
                          launcher=(os.path.join(ROOT, "tests", "torchrun_short_exit_barrier.py"),))
    ended = [finish(agent) for agent in agents]
    for agent, (_, stderr) in zip(agents, ended):
        assert agent.returncode == 0, stderr[-3000:]
        assert all(wait < EXIT_BARRIER_S for wait in exit_barrier_waits(stderr)), stderr[-3000:]
    for n in (0, 1):
        assert len(os.listdir(tmp_path / f"cache{n}")) == 1  # one cache file each
    models = [n for n in (0, 1) if (tmp_path / f"m{n}.pth").exists()]
    assert len(models) == 1 and (tmp_path / f"r{models[0]}" / "checkpoint.pth").exists()
    assert not (tmp_path / f"r{1 - models[0]}").exists()
    assert "2 processes x batch 2 = 4" in ended[models[0]][0]
    prior, _ = load_prior(tmp_path / f"m{models[0]}.pth")
    assert prior.config["width"] == 16


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers in /proc")
def test_a_restart_that_the_two_machines_count_differently_still_trains(tmp_path, image_folder):
    """The worker of one machine is killed: its torchrun counts a restart, the other's sees a
    new member and restarts its worker without counting one. The new processes meet anyway."""
    agents = two_machines(tmp_path, image_folder, "--epochs", 12, torchrun_flags=("--max-restarts", "1"))
    workers = [{}, {}]
    while not all(workers):  # which machine holds rank 0, the one that speaks
        time.sleep(0.2)
        workers = [worker_pids(agent) for agent in agents]
    speaker = 0 if 0 in workers[0] else 1
    wait_for_epoch(agents[speaker], 2)
    os.kill(workers[1 - speaker][1], signal.SIGKILL)
    ended = [finish(agent) for agent in agents]
    for agent, (_, stderr) in zip(agents, ended):
        assert agent.returncode == 0, stderr[-3000:]
    assert "resuming after epoch" in ended[speaker][0]
    assert torch.load(tmp_path / f"r{speaker}" / "checkpoint.pth", weights_only=True)["epoch"] == 12


@pytest.mark.parametrize("device, phrase", [("mps", "pass --device auto, cuda or cpu"),
                                            ("cuda:1", "takes the GPU of its LOCAL_RANK")])
def test_a_device_that_torchrun_cannot_share_out_is_refused_in_one_sentence(device, phrase, monkeypatch):
    with pytest.raises(distributed.UserError, match=phrase):
        distributed.process_device(device)


def test_more_processes_than_gpus_is_refused_in_one_sentence(monkeypatch):
    monkeypatch.setattr(distributed, "LOCAL_RANK", 1)
    monkeypatch.setattr(distributed, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.UserError, match=r"more processes on this machine than it has GPUs \(1\)"):
        distributed.process_device("auto")


def test_only_rank_0_writes_to_standard_output_even_below_python(tmp_path, image_folder):
    result = torchrun(PATCHED, "--data", image_folder, "--epochs", 2, *RUN[2:], "--results-dir", tmp_path / "r",
                      "--out", tmp_path / "m.pth", env={"PATCH": "write-to-fd-1"})
    assert result.returncode == 0, result.stderr[-3000:]
    written = [line for line in result.stdout.splitlines() if "wrote to file descriptor 1" in line]
    assert written == ["rank 0 wrote to file descriptor 1"] * 2


def test_compile_under_torchrun_trains_and_saves_the_plain_model(tmp_path, image_folder):
    """torch.compile inside DDP (nanoGPT's order: compile, then wrap); the first epoch compiles."""
    result = torchrun("--data", image_folder, "--epochs", 2, *RUN[2:], "--compile", "--results-dir", tmp_path / "r",
                      "--out", tmp_path / "m.pth")
    assert result.returncode == 0, result.stderr[-3000:]
    line = first_line(result.stdout)
    assert "2 processes x batch 2 = 4" in line and line.endswith(", torch.compile")
    state = torch.load(tmp_path / "m.pth", weights_only=True)["model"]
    assert not any(key.startswith(("_orig_mod", "module")) for key in state)  # the unwrapped model's names
    assert load_vae(tmp_path / "m.pth").image_size == 32


# ------------------------------------------------------------------ a failure anywhere ends the run, said once


def worker_tracebacks(stderr):
    """The workers' tracebacks (torchrun's own report, after them, has one of its own)."""
    return stderr.count('train_vae.py", line') + stderr.count('distributed.py", line')


@pytest.mark.parametrize("flags, sentence", [
    (("--data", "/nowhere/pokemon"), "error: the data folder /nowhere/pokemon does not exist"),
    (("--epochs", "0"), "error: argument --epochs: must be a positive whole number"),
    (("--device", "mps"), "error: under torchrun each process takes the GPU of its LOCAL_RANK")])
def test_a_bad_folder_or_flag_is_said_once_under_torchrun(tmp_path, flags, sentence):
    result = torchrun(*RUN, "--results-dir", tmp_path / "r", "--out", tmp_path / "m.pth", *flags)
    assert result.returncode != 0
    assert result.stderr.count(sentence) == 1, result.stderr[-3000:]
    assert result.stderr.count("error:") == 1 and worker_tracebacks(result.stderr) == 0, result.stderr[-3000:]
    assert not (tmp_path / "r").exists()


def test_a_folder_missing_for_one_process_only_is_said_by_that_process(tmp_path, image_folder):
    result = torchrun(PATCHED, "--data", image_folder, *RUN, "--results-dir", tmp_path / "r",
                      "--out", tmp_path / "m.pth", env={"PATCH": "no-data-on-rank-1"})
    assert result.returncode != 0
    assert result.stderr.count("error: the data folder /nowhere/pokemon does not exist") == 1, result.stderr[-3000:]
    assert result.stderr.count("error:") == 1 and worker_tracebacks(result.stderr) == 0, result.stderr[-3000:]
    assert "rank      : 1 (local_rank: 1)" in result.stderr  # torchrun's report names the one that failed


@pytest.mark.parametrize("restarts", [0, 1])
def test_a_divergence_on_rank_0_ends_every_process_at_once_and_is_never_trained_again(tmp_path, image_folder,
                                                                                     restarts):
    """Rank 1 is waiting for rank 0 when rank 0's check fails: it learns of it there and ends
    (1,000 epochs would take minutes); a restart by torchrun stops at once, training nothing."""
    started = time.monotonic()
    result = torchrun(PATCHED, "--data", image_folder, "--epochs", 1000, *RUN[2:], "--results-dir", tmp_path / "r",
                      "--out", tmp_path / "m.pth", env={"PATCH": "diverge-on-rank-0"},
                      torchrun_flags=("--max-restarts", str(restarts)))
    assert time.monotonic() - started < 60
    assert result.returncode != 0
    assert result.stderr.count("error: training diverged in epoch 2") == 1, result.stderr[-3000:]
    assert worker_tracebacks(result.stderr) == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   1/1000") == 1  # trained once, whatever the restarts
    assert torch.load(tmp_path / "r" / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_out_of_memory_in_one_process_is_not_trained_again_under_max_restarts(tmp_path, image_folder):
    result = torchrun(PATCHED, "--data", image_folder, "--epochs", 1000, *RUN[2:], "--results-dir", tmp_path / "r",
                      "--out", tmp_path / "m.pth", env={"PATCH": "oom-on-rank-1"},
                      torchrun_flags=("--max-restarts", "1"))
    assert result.returncode != 0
    assert result.stderr.count("error: the GPU ran out of memory training at 32 px, batch 2") == 1, result.stderr[-3000:]
    assert worker_tracebacks(result.stderr) == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   1/1000") == 1  # trained once: the restart stopped at once
