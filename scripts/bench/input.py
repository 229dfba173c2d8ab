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
    one process with one torch thread as in a worker; the same through the
    DataLoader is printed beside it;
(d) reported, not a target: the device augmentation (``DeviceResizedCrop``: crop,
    resize to 224, flip) on this CPU with one thread, and on the GPU when there is one.

"Per host core" is images per CPU-second the host spent (the processes' user +
system time: for a loader, its workers and the main process that receives the
batches), which is the images/s of one fully used core and depends much less on
what else the machine runs; wall-clock images/s are printed beside. Also printed:
(b') the decode loader feeding the device augmentation without a cache (workers
decode and pad whole images), and the cache's build rate. Each timed trial does at
least one second of work (passes over the images are repeated until it does, after
an untimed warm-up trial of each), the measurements take turns trial by trial, and
each prints the best and the median of its ``--trials``. glibc's malloc is told to
serve every block over 128 KiB by mmap (``_timing.fixed_malloc``): each padded batch
of (c) is then fresh pages, as a DataLoader worker's shared-memory batch is; with
glibc's default, whether a freed batch was reused depended on what the process had
done before, and (c) read 13.5 x (a) in one run and 25.4 x in the next. The last line is
``input: cached/decode = X.XX (median Y.YY)``, (c) / (a). Target: (c) >= 5 (a).
(b) is printed for information: the DML recipe's antialiased crop resample sits on
top of the decode (issue 13's measurement), so it has no target against (a).

The data are a fake CUB in the real layout with CUB-sized 500 x 375 JPEGs of
photo-like content (a smooth random field plus noise, quality 90, about 80 kB each),
written to a temporary folder. Usage: ``python scripts/bench/input.py [--images N]``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _timing import MIN_TRIAL_S, TRIALS, Summary, fixed_malloc, headline, interleave, run_for
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


def timed_passes(one_pass: Callable[[], int], min_s: float) -> Rate:
    """Passes of ``one_pass`` (returning the images it did) in this process, for >= ``min_s``."""
    images = 0

    def counted() -> None:
        nonlocal images
        images += one_pass()

    c0 = time.process_time()
    trial = run_for(counted, min_s)
    return Rate(images, time.process_time() - c0, trial.seconds)


def bare_decode(paths: list[str], min_s: float, decode=pillow_rgb) -> Rate:  # noqa: ANN001
    """Every file decoded, pass after pass, for at least ``min_s``."""

    def one_pass() -> int:
        for p in paths:
            decode(p)
        return len(paths)

    return timed_passes(one_pass, min_s)


def host_side(ds, min_s: float) -> Rate:  # noqa: ANN001
    """A worker's work on the cached path, in this process: items + padding, for >= ``min_s``."""
    todo = batches(len(ds), 1)

    def one_pass() -> int:
        for b in todo:
            collate_padded([ds[i] for i in b])
        return len(todo) * BATCH

    return timed_passes(one_pass, min_s)


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


class LoaderTrial:
    """A DataLoader trial whose passes over the data are sized, by its first call, to last >= ``min_s``.

    The first call (the warm-up of :func:`interleave`) runs one pass and sets the passes
    of the next calls from its wall time, with a 30 % margin.
    """

    def __init__(self, ds, workers: int, min_s: float, collate=None) -> None:  # noqa: ANN001
        self.ds, self.workers, self.min_s, self.collate = ds, workers, min_s, collate
        self.repeats = 0

    def __call__(self) -> Rate:
        if self.repeats == 0:
            pilot = loader_rate(self.ds, 2, self.workers, self.collate)
            self.repeats = max(2, math.ceil(2 * 1.3 * self.min_s / max(pilot.wall, 1e-3)))
            return pilot
        return loader_rate(self.ds, self.repeats, self.workers, self.collate)


def device_rate(ds, device: torch.device, min_s: float) -> float:  # noqa: ANN001
    """Images/s of the device augmentation on one padded batch, for >= ``min_s``."""
    batch, _ = collate_padded([ds[i] for i in range(BATCH)])
    batch = batch.to(device)
    augment = DeviceResizedCrop(size=224, crop="random", resize=256)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    augment(batch)
    sync()
    return run_for(lambda: augment(batch), min_s, sync=sync).rate * BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=160, help="training images (8 per class)")
    parser.add_argument("--trials", type=int, default=TRIALS, help="interleaved trials of each")
    parser.add_argument(
        "--min-trial-s", type=float, default=MIN_TRIAL_S, help="least wall time of one trial"
    )
    args = parser.parse_args()
    fixed_malloc()  # every batch in fresh pages, as a worker's: see _timing.fixed_malloc
    min_s = args.min_trial_s
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
        # one torch thread in this process, as in a DataLoader worker: idle OpenMP threads
        # spinning after each parallel copy would count as CPU time of (c)
        torch.set_num_threads(1)
        runs = interleave(
            {
                "a": lambda: bare_decode(paths, min_s),
                "a2": lambda: bare_decode(paths, min_s, read_image),
                "b": LoaderTrial(decode_ds, workers, min_s),
                "b2": LoaderTrial(whole_ds, workers, min_s, collate_padded),
                "c": lambda: host_side(cached_ds, min_s),
                "c_loader": LoaderTrial(cached_ds, workers, min_s, collate_padded),
            },
            args.trials,
        )
        per_core = {k: Summary.of([r.per_core for r in v], True) for k, v in runs.items()}
        wall = {k: Summary.of([r.per_second for r in v], True) for k, v in runs.items()}
        dev_cpu = device_rate(cached_ds, torch.device("cpu"), min_s)
        torch.set_num_threads(cpu_threads)
        dev_gpu = None
        if torch.cuda.is_available():
            dev_gpu = device_rate(cached_ds, torch.device("cuda"), min_s)

    a = per_core["a"]

    def line(label: str, key: str, note: str = "") -> None:
        r, x = per_core[key], per_core[key] / a
        print(
            f"  {label:<48} {r.best:8.1f} {r.median:8.1f}  = {x.best:5.2f} {x.median:5.2f} x (a)"
            f"   [{wall[key].best:7.1f} images/s wall]{note}"
        )

    print(
        f"input pipeline: {len(paths)} CUB-sized JPEGs (500 x 375, {kb:.0f} kB on average), "
        f"{available_cpus()} usable CPUs, default workers = {workers}, batches of {BATCH}, "
        f"{args.trials} interleaved trials of >= {min_s:g} s each"
    )
    print("  images/s per host core (images per CPU-second of every process involved):")
    print(f"  {'':<48} {'best':>8} {'median':>8}    {'best':>5} {'median':>5}")
    line("(a) bare JPEG decode (Pillow, 1 process)", "a")
    line("(a') bare JPEG decode (TorchCodec, 1 process)", "a2", "   the loader's decoder")
    line(f"(b) decode loader, DML transform, {workers} workers", "b", "   information only")
    own = per_core["b"] / per_core["a2"]
    label = "    (b) against the decoder it uses, (a')"
    print(f"  {label:<48} {'':17}  = {own.best:5.2f} {own.median:5.2f} x (a')")
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
    print(headline("input: cached/decode", per_core["c"] / a))


if __name__ == "__main__":
    main()
