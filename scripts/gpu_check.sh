#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on one H200): a fake CUB at real size, the CUDA tests,
# then authors_cub for 300 iterations in fp32 and bf16, with and without the decoded-image
# cache + device augmentation, and a summary (images/s, data wait vs compute, peak GPU memory,
# extrapolated wall time of the full 3,000-iteration run + its 9 evaluations (each as long as the
# measured final one), and that time as a multiple of the run's data-decode floor).
# Usage: bash scripts/gpu_check.sh [WORK_DIR]   (python: $PYTHON, default python3)
set -euo pipefail
PYTHON=${PYTHON:-python3}
WORK=${1:-/tmp/softmine-gpu-check}
ITERS=${ITERS:-300}
DATA=$WORK/data/CUB_200_2011
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1

echo "== device"
"$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"

echo "== fake CUB at real size (200 classes, 5,864 train + 5,924 test JPEGs of 500 x 375)"
if [ ! -f "$DATA/images.txt" ]; then
  "$PYTHON" - "$DATA" <<'PY'
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from softmine.testing.fakes import make_cub


def photo(args):
    path, seed = args
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(26, 34, 3))
    low = ((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((500, 375), Image.BICUBIC), np.float32)
    noisy = smooth + rng.normal(0, 12, size=smooth.shape)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


# the real split's sizes: classes 1-100 hold 5,864 images, classes 101-200 hold 5,924
counts = [59] * 64 + [58] * 36 + [60] * 24 + [59] * 76
assert (sum(counts[:100]), sum(counts[100:])) == (5864, 5924)
root = make_cub(Path(sys.argv[1]), num_classes=200, images_per_class=counts)
paths = sorted((root / "images").rglob("*.jpg"))
with ProcessPoolExecutor() as pool:
    list(pool.map(photo, [(p, i) for i, p in enumerate(paths)], chunksize=64))
print(f"{len(paths)} JPEGs in {root}")
PY
fi

echo "== host JPEG decode rate, every core (the data-decode floor)"
DECODE_RATE=$("$PYTHON" - "$DATA" <<'PY'
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from softmine.data.decode import read_image
from softmine.hardware import available_cpus


def decode(paths):
    for p in paths:
        read_image(p)
    return len(paths)


paths = [str(p) for p in sorted((Path(sys.argv[1]) / "images").rglob("*.jpg"))[:4096]]
cores = available_cpus()
chunks = [paths[i::cores] for i in range(cores)]
with ProcessPoolExecutor(cores) as pool:
    list(pool.map(decode, [c[:8] for c in chunks]))  # start the workers
    t0 = time.perf_counter()
    n = sum(pool.map(decode, chunks))
print(f"{n / (time.perf_counter() - t0):.0f}")
PY
)
echo "$DECODE_RATE images/s decoded with every core"

echo "== pytest -m cuda"
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/engine/test_cuda.py || echo "CUDA TESTS FAILED"

run() {  # name, overrides...
  local name=$1; shift
  local dir=$WORK/runs/$name
  rm -rf "$dir"
  local t0=$SECONDS
  "$PYTHON" -m softmine.commands.train experiment=authors_cub backbone.pretrained=false \
    "dataset.root=$DATA" "trainer.max_iters=$ITERS" trainer.eval_every_iters=0 \
    trainer.checkpoint_every=0 trainer.plots=false trainer.progress_bar=false \
    "hydra.run.dir=$dir" "$@" > "$WORK/$name.log" 2>&1 || { tail -20 "$WORK/$name.log"; return 1; }
  echo "$name: $((SECONDS - t0)) s wall (train $ITERS iterations + one evaluation)"
  grep -h "evaluation at iteration" "$WORK/$name.log" | tail -1 || true
}

echo "== authors_cub, $ITERS iterations each"
run fp32 trainer.precision=32
run bf16 trainer.precision=bf16
run fp32_cache trainer.precision=32 dataset.cache=ram dataset/transform=dml_device \
  dataset.transform.device_transform.crop=full "dataset.transform.device_transform.size=[224,224]" \
  dataset.transform.device_transform.flip=0 "dataset.cache_size=[224,224]"
run bf16_cache trainer.precision=bf16 dataset.cache=ram dataset/transform=dml_device \
  dataset.transform.device_transform.crop=full "dataset.transform.device_transform.size=[224,224]" \
  dataset.transform.device_transform.flip=0 "dataset.cache_size=[224,224]"

echo "== summary (rates leave out the first epoch: cuDNN autotuning and worker start)"
"$PYTHON" scripts/gpu_report.py "$WORK"/runs/{fp32,bf16,fp32_cache,bf16_cache} --full-iters 3000 \
  --evals 9 --eval-images 5924 --decode-rate "$DECODE_RATE"
