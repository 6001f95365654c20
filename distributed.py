"""The processes of one training run under torchrun, and everything they ask of each other.

    torchrun --standalone --nproc_per_node 4 train_vae.py     # 4 processes, one model (DDP)

torchrun starts the same script in every process and tells each its place in the environment
(RANK, LOCAL_RANK, WORLD_SIZE); a plain `python` run is process 0 of 1, and then every function
here returns at once. DistributedDataParallel averages the gradients over the default process
group (NCCL for GPUs, gloo for CPUs); the run's own questions (did anyone stop or fail? rank 0's
checkpoint for all, every rank's random state for rank 0, wait while the cache is built) go
through a second, gloo group whose long timeout allows hours of waiting on one process.

A failure in one process ends all of them: the run's own errors are said once, by the first
process that met them, and marked in torchrun's store, which outlives a restart, so that
`--max-restarts` does not train the same mistake again.
"""
import gc
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from cli import UserError, pick_device

RANK = int(os.environ.get("RANK", 0))              # this process among all of them
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))  # this process among this machine's
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))  # how many processes train the model
MASTER = RANK == 0                                  # rank 0 alone evaluates, prints and writes
LONG_WAIT = timedelta(hours=5)  # the longest one process may keep the others waiting
GOING, STOPPED, FAILED = 0, 1, 2  # what every process agrees on, the worst of their states
# Keys in torchrun's store, which outlives a restart:
FAILED_KEY = "vae/failed"  # the run's own error, which a restart would meet again
SAID_KEY = "vae/said"      # how many processes wanted to say their error
PORT_KEY = "vae/port"      # the port of this attempt's store (rank 0's)

_torchrun_store = None  # torchrun's store, for the marks above; None in one process
_attempt_store = None   # this attempt's store, which the process groups use
_control = None         # the gloo group for the run's own questions


class FailedElsewhere(Exception):
    """Another process failed and said why: this one ends quietly with exit status 2."""


# --- Joining -----------------------------------------------------------------------------------
def join(device_name):
    """This process's device; under torchrun, joined to the others: NCCL for GPUs, else gloo."""
    if WORLD_SIZE == 1:
        return pick_device(device_name)
    global _torchrun_store, _attempt_store, _control
    if not MASTER:
        silence_stdout()
    _torchrun_store = next(dist.rendezvous("env://"))[0]  # first: an error here is said once
    if _torchrun_store.check([FAILED_KEY]):  # restarted after an error that would come again
        raise FailedElsewhere()
    device = process_device(device_name)
    _attempt_store = attempt_store(_torchrun_store)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=_attempt_store, rank=RANK, world_size=WORLD_SIZE)
    _control = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    return device


def silence_stdout():
    """Rank 0 alone speaks; the others' errors still go to stderr. Their file descriptor 1 goes
    nowhere, not only Python's sys.stdout: the C++ libraries write there too (the Gloo of torch
    2.8 announces each connection), and two processes' lines would interleave."""
    sys.stdout.flush()
    nowhere = os.open(os.devnull, os.O_WRONLY)
    os.dup2(nowhere, sys.stdout.fileno())
    os.close(nowhere)


def process_device(device_name):
    """The GPU of this process's LOCAL_RANK, or the CPU (--device cpu, or no CUDA GPU)."""
    if device_name not in ("auto", "cuda", "cpu"):
        raise UserError(f"under torchrun each process takes the GPU of its LOCAL_RANK, or the "
                        f"CPU; pass --device auto, cuda or cpu, not {device_name}")
    cuda = device_name != "cpu" and pick_device(device_name).type == "cuda"
    if cuda and LOCAL_RANK >= torch.cuda.device_count():
        raise UserError(f"torchrun started more processes on this machine than it has GPUs "
                        f"({torch.cuda.device_count()}); pass --nproc_per_node with at most that")
    device = torch.device(f"cuda:{LOCAL_RANK}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device


def attempt_store(torchrun_store):
    """A store of this attempt's own, served by rank 0 on a free port.

    torchrun's store outlives a restart, and the keys a lost attempt left in it lead the new
    processes to dead peers. A prefix per attempt needs a number that every process agrees on,
    but each machine's torchrun counts its restarts for itself. A store served by the new rank 0
    is fresh by construction: the others read its port and retry until they reach a live one,
    since the server of a lost attempt died with its process."""
    host = os.environ["MASTER_ADDR"]  # rank 0's machine, which serves torchrun's store too
    if MASTER:
        store = dist.TCPStore(host, 0, WORLD_SIZE, is_master=True, wait_for_workers=False)
        torchrun_store.set(PORT_KEY, str(store.port))
        return store
    deadline = time.monotonic() + 600
    while True:
        port = int(torchrun_store.get(PORT_KEY))
        try:
            return dist.TCPStore(host, port, WORLD_SIZE, is_master=False,
                                 timeout=timedelta(seconds=5))
        except (RuntimeError, OSError):  # a lost attempt's port: its rank 0 has not written yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def leave(failed=False):
    """The process groups, then the stores, closed now: left to the interpreter's exit, their
    threads may outlive what they use, and the process aborts. After a failure the groups are
    left as they are: NCCL's would wait for the peers that are gone."""
    global _torchrun_store, _attempt_store, _control
    if dist.is_initialized() and not failed:
        dist.destroy_process_group()
    _control = _attempt_store = _torchrun_store = None
    gc.collect()


# --- What the run asks of every process (each a collective: all processes call it) ----------
def from_rank0(value):
    """Rank 0's `value` in every process (a broadcast: the others pass anything, say None)."""
    if WORLD_SIZE == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def agree(stopped, failure=None):
    """GOING, STOPPED or FAILED, the same in every process: the worst of their states."""
    state = FAILED if failure is not None else STOPPED if stopped else GOING
    if WORLD_SIZE == 1:
        return state
    worst = torch.tensor([state])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=_control)
    return int(worst)


def any_process(flag):
    """Whether `flag` is true in any process, in every process."""
    if WORLD_SIZE == 1:
        return bool(flag)
    found = torch.tensor([int(bool(flag))])
    dist.all_reduce(found, op=dist.ReduceOp.MAX, group=_control)
    return bool(found)


def mean_over_processes(values):
    """The mean of every process's `values` (a CPU tensor), in every process."""
    if WORLD_SIZE == 1:
        return values
    total = values.clone()
    dist.all_reduce(total, group=_control)
    return total / WORLD_SIZE


def rng_state(device):
    """This process's random state: the CPU's, and the GPU's that draws the VAE's noise there."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    """rng_state's inverse; a checkpoint from before the GPU's state was kept holds a tensor."""
    state = state if isinstance(state, dict) else {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def rng_states(device):
    """Every rank's random state, in rank order, on rank 0 (None in the others)."""
    state = rng_state(device)
    if WORLD_SIZE == 1:
        return [state]
    states = [None] * WORLD_SIZE if MASTER else None
    dist.gather_object(state, states, dst=0, group=_control)
    return states


def machine_first(work):
    """work() in each machine's first process, while the others wait; then in them too.

    For the image cache: one process per machine decodes the images into it (hours for a large
    folder: the wait's timeout is LONG_WAIT), then the others read the file it wrote."""
    if WORLD_SIZE > 1 and LOCAL_RANK > 0:
        dist.barrier(group=_control)
    result = work()
    if WORLD_SIZE > 1 and LOCAL_RANK == 0:
        dist.barrier(group=_control)
    return result


def wait_for_rank0(status):
    """Rank 0's exit status in every process, once it has finished its work alone.

    Rank 0 trains the prior alone (minutes on one GPU), and the other processes wait for it
    here rather than end: a torchrun of another machine whose processes ended would wait for
    this one at its exit barrier, and give up after 300 s."""
    return from_rank0(status)


# --- A failure in one process ends all of them -------------------------------------------------
def speaks(error):
    """Whether this process says its error. Under torchrun the first process to fail says a
    UserError; the others, and whoever failed for it, stay quiet. An error that would come again
    (the run's own UserError, memory too small) marks the run failed in torchrun's store, so
    that --max-restarts does not train it again."""
    if _torchrun_store is None:  # one process, or torchrun's before they joined: rank 0's
        return MASTER and not isinstance(error, FailedElsewhere)
    if isinstance(error, FailedElsewhere) or _torchrun_store.check([FAILED_KEY]):
        return False
    if isinstance(error, (UserError, torch.cuda.OutOfMemoryError)):
        _torchrun_store.set(FAILED_KEY, str(error))  # before this process's exit breaks a peer's
    if isinstance(error, UserError):
        return _torchrun_store.add(SAID_KEY, 1) == 1
    return True
