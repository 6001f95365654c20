"""
How fast the explorer page answers: serves explore_vae.py, then moves each "Walk the latent"
slider through gradio_client as the page does, and times every answer (the decode, the PNG and
the HTTP round trip); the same for "Interpolate" and one "Generate". With --screenshot, also
saves the page as a headless Chromium shows it (the README's picture).

    python benchmarks/bench_explorer.py                       # the shipped model
    python benchmarks/bench_explorer.py --screenshot figures/explorer.png
"""
import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, os.path.join(ROOT, "explore_vae.py"), "--port", str(port)]
    process = subprocess.Popen(command + (["--model", model] if model else []), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        found = re.search(r"Running on local URL:\s+(\S+)", line)
        if found:
            return process, found.group(1)
    raise SystemExit("the page did not start")


def timed(call, *args, api_name):
    tick = time.perf_counter()
    call(*args, api_name=api_name)
    return time.perf_counter() - tick


def screenshot(url, path):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=shutil.which("chromium"),
                                         args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 560})
        page.goto(url)
        page.get_by_role("tab", name="Walk the latent").click()
        page.locator("img[src*='gradio_api/file=']:visible").wait_for(timeout=60000)
        slider = page.get_by_role("slider").first
        slider.focus()
        for _ in range(12):
            slider.press("ArrowRight")
        page.wait_for_timeout(2000)
        page.screenshot(path=path)
        browser.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="default: the shipped model")
    p.add_argument("--moves", type=int, default=20, help="moves of each slider")
    p.add_argument("--screenshot", metavar="PNG")
    args = p.parse_args()
    from gradio_client import Client
    process, url = serve(args.model)
    try:
        client = Client(url, verbose=False)
        client.predict(0, 0, 0, 0, 0, api_name="/walk")  # untimed: the first answer is slower
        walks = [timed(client.predict, 0, *([0.0] * k), 3 * i / args.moves, *([0.0] * (3 - k)),
                       api_name="/walk") for k in range(4) for i in range(args.moves)]
        slides = [timed(client.predict, 0, 1, i / args.moves, api_name="/interpolate")
                  for i in range(args.moves)]
        draw = timed(client.predict, 0, 1.5, api_name="/generate")
        for name, times in (("walk (a slider move)", walks), ("interpolate", slides)):
            print(f"{name}: {len(times)} answers, median {statistics.median(times):.3f} s, "
                  f"slowest {max(times):.3f} s")
        print(f"generate (8 new Pokémon, 200 prior steps, guided): {draw:.1f} s")
        if args.screenshot:
            screenshot(url, args.screenshot)
            print(f"saved {args.screenshot}")
    finally:
        process.terminate()


if __name__ == "__main__":
    main()
