"""train_vae.py with one piece patched in one process, as a user's run under torchrun meets a
fault, or to count what the processes do; named by the environment variable PATCH:

    diverge-on-rank-0   rank 0's validation loss becomes nan in epoch 2 (others see no fault)
    no-data-on-rank-1   rank 1's --data names a folder that is not there (a second machine's)
    oom-on-rank-1       rank 1 runs out of GPU memory in epoch 2
    gpu-out-of-memory   every process runs out of GPU memory in epoch 2
    cpu-out-of-memory   the CPU's allocator fails in the first epoch, as under ulimit -v
    count-decodes       each process that decodes images into the cache writes its rank in the
                        file DECODE_LOG names
    write-to-fd-1       every process writes a line to its file descriptor 1 in each epoch, as
                        a C++ library would (the Gloo of torch 2.8 does as it connects)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import image_data  # noqa: E402
import train_vae  # noqa: E402
from cli import run_main  # noqa: E402

PATCH = os.environ["PATCH"]
RANK = int(os.environ.get("RANK", 0))

if PATCH == "diverge-on-rank-0":
    real_check = train_vae.check_finite

    def check_finite(row, model, args, epoch):
        return real_check({**row, "val_loss": float("nan")} if epoch == 2 else row, model, args,
                          epoch)
    train_vae.check_finite = check_finite
elif PATCH == "no-data-on-rank-1" and RANK == 1:
    sys.argv[sys.argv.index("--data") + 1] = "/nowhere/pokemon"
elif PATCH == "gpu-out-of-memory" or PATCH == "oom-on-rank-1" and RANK == 1:
    real_epoch = train_vae.train_one_epoch

    def train_one_epoch(model, images, index, epoch, **state):
        if epoch == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_epoch(model, images, index, epoch, **state)
    train_vae.train_one_epoch = train_one_epoch
elif PATCH == "cpu-out-of-memory":
    def train_one_epoch(*args, **state):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 8589934592 bytes. Error code 12")
    train_vae.train_one_epoch = train_one_epoch
elif PATCH == "count-decodes":
    real_build = image_data.build_cache

    def build_cache(*args):
        with open(os.environ["DECODE_LOG"], "a") as log:
            log.write(f"{RANK}\n")
        return real_build(*args)
    image_data.build_cache = build_cache
elif PATCH == "write-to-fd-1":
    real_epoch = train_vae.train_one_epoch

    def train_one_epoch(model, images, index, epoch, **state):
        os.write(1, f"rank {RANK} wrote to file descriptor 1\n".encode())
        return real_epoch(model, images, index, epoch, **state)
    train_vae.train_one_epoch = train_one_epoch

if __name__ == "__main__":
    run_main(train_vae.main)
