"""Input pipeline speed: bare JPEG decoding against the decode loader and the cached loader.

Prints, in one run, images/s per host core of:

(a) bare JPEG decoding: Pillow open + RGB of each file, one process (the issue's baseline;
    also printed, (a'): libjpeg-turbo through TorchCodec's ``decode_jpeg``, the
    decoder the loader uses, ``read_image``);
(b) the decode loader path: CUB200 with the DML train transform (decode, resize +
    random crop, flip) through a DataLoader with the default workers
    (``trainer.num_workers=auto``), 56-image batches;
(c) the cached path's host side: what a worker still does per image once the
    decoded-image cache exists (``dataset.cache=ram``, ``dataset/transform=dml_device``):
    take the cached array and pad it into the batch (``ToHWC`` + ``collate_padded``),
    one process; the same through the DataLoader is printed beside it;
(d) reported, not a target: the device augmentation (``DeviceResizedCrop``: crop,
    resize to 224, flip) on this CPU with one thread, and on the GPU when there is one.

"Per host core" is images per CPU-second the host spent (the processes' user +
system time: for a loader, its workers and the main process that receives the
batches), which is the images/s of one fully used core and does not depend on what
else the machine runs; wall-clock images/s are printed beside. Also printed: (b')
the decode loader feeding the device augmentation without a cache (workers decode
and pad whole images), and the cache's build rate. The last line is
``input: cached/decode = X.XX``, (c) / (a). Targets: (c) >= 5 (a); (b) >= 0.9 (a).

The data are a fake CUB in the real layout with CUB-sized 500 x 375 JPEGs of
photo-like content (a smooth random field plus noise, quality 90, about 80 kB each),
written to a temporary folder. Usage: ``python scripts/bench/input.py [--images N]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from softmine.config import compose_config
from softmine.data import CUB200
from softmine.data.decode import read_image
from softmine.data.device_transforms import DeviceResizedCrop, ToHWC, collate_padded
from softmine.engine.setup import resolve_num_workers
from softmine.hardware import available_cpus
from softmine.testing.fakes import make_cub

BATCH = 56  # the authors-CUB batch: 8 classes x 7 images


def write_photos(root: Path, seed: int = 0) -> list[Path]:
    """Replace the fake copy's tiny images by 500 x 375 JPEGs with photo-like statistics."""
    rng = np.random.default_rng(seed)
    paths = sorted((root / "images").rglob("*.jpg"))
    for p in paths:
        low = rng.normal(size=(26, 34, 3))
        low = ((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize((500, 375), Image.BICUBIC), np.float32)
        noisy = smooth + rng.normal(0, 12, size=smooth.shape)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(p, quality=90)
    return paths


def batches(n: int, repeats: int) -> list[list[int]]:
    order = np.concatenate([np.random.default_rng(r).permutation(n) for r in range(repeats)])
    return [order[i : i + BATCH].tolist() for i in range(0, len(order) - BATCH + 1, BATCH)]


class Rate:
    """Images, host CPU-seconds and wall seconds of one measurement."""

    def __init__(self, images: int, cpu: float, wall: float) -> None:
        self.images, self.cpu, self.wall = images, cpu, wall

    @property
    def per_core(self) -> float:
        return self.images / max(self.cpu, 1e-9)

    @property
    def per_second(self) -> float:
        return self.images / max(self.wall, 1e-9)


def process_cpu(pids: list[int]) -> float:
    """User + system CPU-seconds of processes ``pids`` so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def pillow_rgb(path: str) -> None:
    with Image.open(path) as im:
        im.convert("RGB")


def bare_decode(paths: list[str], repeats: int, decode=pillow_rgb) -> Rate:  # noqa: ANN001
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for p in paths:
            decode(p)
    return Rate(repeats * len(paths), time.process_time() - c0, time.perf_counter() - t0)


def loader_rate(ds, repeats: int, workers: int, collate=None) -> Rate:  # noqa: ANN001
    """Through a DataLoader, the first batch (worker start-up) not counted; CPU of all processes."""
    loader = DataLoader(
        ds, batch_sampler=batches(len(ds), repeats), num_workers=workers, collate_fn=collate
    )
    it = iter(loader)
    next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]
    t0, c0 = time.perf_counter(), time.process_time()
    w0 = w1 = process_cpu(pids)
    n = 0
    for _, y in it:
        n += len(y)
        w1 = process_cpu(pids)  # read while the workers live (they exit with the last batch)
    cpu = time.process_time() - c0 + w1 - w0
    return Rate(n, cpu, time.perf_counter() - t0)


def host_side(ds, repeats: int) -> Rate:  # noqa: ANN001
    """A worker's work on the cached path, in this process: items + padding."""
    todo = batches(len(ds), repeats)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in todo:
        collate_padded([ds[i] for i in b])
    return Rate(len(todo) * BATCH, time.process_time() - c0, time.perf_counter() - t0)


def device_rate(ds, device: torch.device, steps: int) -> float:  # noqa: ANN001
    batch, _ = collate_padded([ds[i] for i in range(BATCH)])
    batch = batch.to(device)
    augment = DeviceResizedCrop(size=224, crop="random", resize=256)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    augment(batch)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        augment(batch)
    sync()
    return steps * BATCH / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=160, help="training images (8 per class)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over them per trial")
    parser.add_argument("--trials", type=int, default=3, help="interleaved trials, best of each")
    parser.add_argument("--device-steps", type=int, default=3, help="timed augmentation batches")
    args = parser.parse_args()
    cfg = compose_config(["dataset=cub"])
    from hydra.utils import instantiate

    cpu_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        classes = 2 * max(1, args.images // 8)
        root = make_cub(Path(tmp) / "CUB_200_2011", num_classes=classes, images_per_class=8)
        write_photos(root)
        decode_ds = CUB200(root, "train", transform=instantiate(cfg.dataset.transform.train))
        paths = [p for p, _ in decode_ds.samples]
        kb = np.mean([os.path.getsize(p) for p in paths]) / 1e3
        workers = resolve_num_workers(cfg.trainer.num_workers, decode_ds)
        t0 = time.perf_counter()
        cached_ds = CUB200(root, "train", transform=ToHWC(), cache="ram", cache_size=256)
        build = len(cached_ds) / (time.perf_counter() - t0)
        whole_ds = CUB200(root, "train", transform=ToHWC())
        runs: dict[str, list[Rate]] = {k: [] for k in ("a", "a2", "b", "b2", "c", "c_loader")}
        for _ in range(args.trials):
            runs["a"].append(bare_decode(paths, args.repeats))
            runs["a2"].append(bare_decode(paths, args.repeats, read_image))
            runs["b"].append(loader_rate(decode_ds, args.repeats, workers))
            runs["b2"].append(loader_rate(whole_ds, args.repeats, workers, collate_padded))
            runs["c"].append(host_side(cached_ds, args.repeats))
            runs["c_loader"].append(loader_rate(cached_ds, args.repeats, workers, collate_padded))
        best = {k: max(v, key=lambda r: r.per_core) for k, v in runs.items()}
        torch.set_num_threads(1)
        dev_cpu = device_rate(cached_ds, torch.device("cpu"), args.device_steps)
        torch.set_num_threads(cpu_threads)
        dev_gpu = None
        if torch.cuda.is_available():
            dev_gpu = device_rate(cached_ds, torch.device("cuda"), 20 * args.device_steps)

    a = best["a"].per_core

    def line(label: str, key: str, note: str = "") -> None:
        r = best[key]
        print(
            f"  {label:<52} {r.per_core:8.1f}  = {r.per_core / a:5.2f} x (a)"
            f"   [{r.per_second:7.1f} images/s wall]{note}"
        )

    print(
        f"input pipeline: {len(paths)} CUB-sized JPEGs (500 x 375, {kb:.0f} kB on average), "
        f"{available_cpus()} usable CPUs, default workers = {workers}, batches of {BATCH}, "
        f"best of {args.trials} trials"
    )
    print("  images/s per host core (images per CPU-second of every process involved):")
    line("(a) bare JPEG decode (Pillow, 1 process)", "a")
    line("(a') bare JPEG decode (TorchCodec, 1 process)", "a2", "   the loader's decoder")
    line(f"(b) decode loader, DML transform, {workers} workers", "b", "   target >= 0.90 x (a)")
    own = best["b"].per_core / best["a2"].per_core
    label = "    (b) against the decoder it uses, (a')"
    print(f"  {label:<52} {'':8}  = {own:5.2f} x (a')")
    line("(b') decode loader for the device augmentation", "b2", "   no cache: decode + pad")
    line("(c) cached path, host side (1 process)", "c", "   target >= 5 x (a)")
    line(f"    the same through the DataLoader, {workers} workers", "c_loader")
    print(
        f"  (d) device augmentation on this CPU, 1 thread: {dev_cpu:8.1f} images/s (reported only)"
    )
    if dev_gpu is not None:
        print(f"      on {torch.cuda.get_device_name()}: {dev_gpu:8.1f} images/s")
    else:
        print("      no GPU here: the GPU rate is not measured")
    print(
        f"  cache build (decode + resize to 256, {available_cpus()} threads): {build:.1f} images/s wall"
    )
    print(f"input: cached/decode = {best['c'].per_core / a:.2f}")


if __name__ == "__main__":
    main()
