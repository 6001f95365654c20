"""
What it costs a run to know its images: image_data.images_key over folders of distinct files.

    python benchmarks/bench_fingerprint.py --data ../shared/pokemon --copies 1 12

For each K it builds a folder of K x (the images of --data) distinct files: copies, each with its
own bytes appended (a JPEG or PNG reader stops at its end marker), so that no two files share
their bytes or their disk blocks. It times images_key twice: cold, after each file's pages are
dropped from the page cache (posix_fadvise DONTNEED, as after a reboot or on a new machine), and
warm, right after. Prints one Markdown table. Linux only (posix_fadvise).
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_memory import folder_of_copies  # noqa: E402
from image_data import FINGERPRINT_BYTES, image_files, images_key  # noqa: E402


def distinct_folder(data, copies, root):
    """A folder of `copies` copies of every image of `data`, each with bytes of its own."""
    def copy(source, target, k):
        with open(source, "rb") as original, open(target, "wb") as new:
            new.write(original.read() + f"copy {k}".encode())
    return folder_of_copies(data, copies, root, copy)


def drop_from_page_cache(files):
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # written pages must reach the disk before they can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_key(folder):
    tick = time.perf_counter()
    key = images_key(image_files(folder), folder)
    return time.perf_counter() - tick, key


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data", required=True, help="a folder of images")
    p.add_argument("--copies", type=int, nargs="+", default=[1, 12], help="folder sizes, x --data")
    p.add_argument("--work", default=None, help="where the folders go (default: a temporary one)")
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench_fingerprint_")
    print(f"reading {FINGERPRINT_BYTES // 1024} KiB from each end of a file\n")
    print("| files | MB | cold page cache, s | warm, s |")
    print("|---:|---:|---:|---:|")
    for copies in args.copies:
        folder = distinct_folder(args.data, copies, work)
        files = image_files(folder)
        megabytes = sum(os.path.getsize(file) for file in files) / 1e6
        drop_from_page_cache(files)
        cold, key = timed_key(folder)
        warm, again = timed_key(folder)
        assert key == again
        print(f"| {len(files):,} | {megabytes:.0f} | {cold:.2f} | {warm:.2f} |", flush=True)


if __name__ == "__main__":
    main()
