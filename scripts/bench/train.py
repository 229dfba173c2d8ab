"""Training throughput of the reproduce-CUB setting, and the input pipeline against bare JPEG decoding.

Prints, in one run:

1. the input pipeline's images/s (CUB200 + the standard DML train transform through a
   DataLoader with the default worker count) against bare decoding of the same JPEG
   files (Pillow open + RGB convert, one process): the ratio must be >= 0.9;
2. images/s of full training steps of the reproduce-CUB model (BN-Inception, the
   authors' 1024-d embedding, OSM+CAA, 8 classes x 7 images) on the CPU, and on the
   GPU with precision 32 and bf16 when one is present.

The data are a fake copy in the real CUB layout with CUB-sized JPEGs (500 x 375),
written to a temporary folder. Usage: ``python scripts/bench/train.py [--steps N]``.
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

from softmine.config import compose_config
from softmine.data import CUB200
from softmine.data.fakes import make_cub
from softmine.engine.objective import Objective
from softmine.engine.setup import resolve_num_workers
from softmine.losses import OSMCAALoss


def write_cub_sized_jpegs(root: Path) -> list[Path]:
    """Replace the fake copy's tiny images by 500 x 375 JPEGs with natural-image-like content."""
    rng = np.random.default_rng(0)
    paths = sorted((root / "images").rglob("*.jpg"))
    yy, xx = np.mgrid[0:375, 0:500]
    for i, p in enumerate(paths):
        base = np.stack([(xx + 7 * i) % 256, (yy + 3 * i) % 256, (xx + yy) // 4 % 256], -1)
        noise = rng.integers(0, 40, size=base.shape)
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(p, quality=90)
    return paths


def bare_decode(paths: list[Path], repeats: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        for p in paths:
            with Image.open(p) as im:
                im.convert("RGB").load()
    return repeats * len(paths) / (time.perf_counter() - t0)


def pipeline(root: Path, cfg, repeats: int, num_workers: int) -> float:
    from hydra.utils import instantiate

    transform = instantiate(cfg.dataset.transform.train)
    ds = CUB200(str(root), "train", transform=transform)
    idx = list(range(len(ds))) * repeats
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, idx), batch_size=56, num_workers=num_workers
    )
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0, n = time.perf_counter(), 0
    for x, _ in it:
        n += len(x)
    return n / (time.perf_counter() - t0)


def train_steps(cfg, device: torch.device, precision: str, steps: int) -> float:
    from hydra.utils import instantiate

    torch.manual_seed(0)
    model = instantiate(cfg.backbone).to(device)
    loss = OSMCAALoss(num_classes=100, embedding_dim=int(cfg.backbone.embedding_dim)).to(device)
    dtype = {"bf16": torch.bfloat16}.get(precision)
    obj = Objective(model, loss, dtype).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(obj.parameters(), lr=1e-4, momentum=0.9)
    x = torch.rand(56, 3, 224, 224, device=device)
    y = torch.arange(56, device=device) // 7
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_value, _ = obj(x, y)
        loss_value.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * 56 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed training steps on the CPU")
    parser.add_argument("--gpu-steps", type=int, default=20, help="timed training steps on a GPU")
    parser.add_argument(
        "--repeats",
        type=int,
        default=12,
        help="passes over the 80 training images (input pipeline)",
    )
    parser.add_argument("--trials", type=int, default=3, help="interleaved trials, best of each")
    args = parser.parse_args()
    cfg = compose_config(["experiment=reproduce_cub", "backbone.pretrained=false"])
    with tempfile.TemporaryDirectory() as tmp:
        root = make_cub(Path(tmp) / "CUB_200_2011", num_classes=8, images_per_class=20)
        paths = write_cub_sized_jpegs(root)
        train_files = [p for p in paths if int(p.parent.name[:3]) <= 4]
        workers = resolve_num_workers(cfg.trainer.num_workers, CUB200(str(root), "train"))
        # Interleaved trials, best of each: the least disturbed measurement of both sides.
        bare, piped = 0.0, 0.0
        for _ in range(args.trials):
            bare = max(bare, bare_decode(train_files, repeats=args.repeats))
            piped = max(piped, pipeline(root, cfg, repeats=args.repeats, num_workers=workers))
    print(f"input pipeline ({os.cpu_count()} CPUs, num_workers={workers}, best of {args.trials})")
    print(f"  bare JPEG decoding (1 process):      {bare:8.1f} images/s")
    print(f"  CUB200 + DML transform + DataLoader: {piped:8.1f} images/s")
    print(f"  ratio pipeline / bare decoding:      {piped / bare:8.2f}x   (target >= 0.90)")
    print(
        "training steps, reproduce-CUB model (BN-Inception, 1024-d authors' embedding, 8x7 batch)"
    )
    cpu = train_steps(cfg, torch.device("cpu"), "32", args.steps)
    print(f"  CPU, precision 32:                   {cpu:8.1f} images/s")
    if torch.cuda.is_available():
        for precision in ("32", "bf16"):
            gpu = train_steps(cfg, torch.device("cuda"), precision, args.gpu_steps)
            print(f"  {torch.cuda.get_device_name()}, precision {precision}: {gpu:8.1f} images/s")
    else:
        print("  no GPU on this machine: GPU figures not measured")


if __name__ == "__main__":
    main()
