"""Forward+backward time of ``OSMCAALoss`` against two baselines measured in the same run.

(a) a vectorised plain contrastive loss (no mining, no attention, no classifier);
(b) a port in the style of the widely copied public PyTorch port of OSM+CAA, which
    gathers the class-aware attention with a Python loop over samples (written
    here for the comparison; its value equals ours, which the script checks).

Also timed: (a) plus the same cosine classifier's cross-entropy in plain autograd
("(a)+cls"), the like-for-like baseline for the classifier OSMCAALoss trains.

Targets (issue #3): OSMCAALoss <= 1.1x (a); >= 3.5x faster than (b) at n = 56,
>= 6x at n = 512. Batches are P x K with d = 512 and 100 classes. Also printed:
OSMCAALoss with attached weights, whose gradients are those of (b) (the port
detaches nothing).

    python scripts/bench/loss.py                 # CPU, 2-3 minutes
    python scripts/bench/loss.py --no-compile    # without the torch.compile column
    python scripts/bench/loss.py --device cuda

On CPU it runs one thread and times process CPU time by default, so that other
processes on a shared machine do not count (``--wall``, ``--threads`` to change).
Each trial repeats one step for at least ``--min-trial-s`` (1 s) of that clock; the
steps take turns trial by trial (``--trials`` of each), and the table shows each
step's median time and each ratio's best and median.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import MIN_TRIAL_S, TRIALS, Summary, interleave, run_for
from torch import Tensor, nn

from softmine.losses import OSMCAALoss

SIZES = ((56, 4), (180, 4), (512, 8))  # (n, K): P = n / K classes per batch
DIM = 512
NUM_CLASSES = 100
TARGET_A = 1.1
TARGET_B = {56: 3.5, 512: 6.0}


def plain_contrastive(emb: Tensor, labels: Tensor, margin: float = 1.2, lam: float = 0.5) -> Tensor:
    """(a): every pair weight 1; L = (1-lam) 1/2 mean_pos d^2 + lam 1/2 mean_neg max(0, m - d)^2."""
    x = F.normalize(emb, dim=1)
    n = x.shape[0]
    d2 = (2.0 - 2.0 * (x @ x.T)).clamp_min(0.0)
    d = d2.clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    pos = (same & ~torch.eye(n, dtype=torch.bool, device=x.device)).float()
    neg = (~same).float()
    l_pos = 0.5 * (pos * d2).sum() / pos.sum().clamp_min(1.0)
    l_neg = 0.5 * (neg * (margin - d).clamp_min(0.0).pow(2)).sum() / neg.sum().clamp_min(1.0)
    return (1.0 - lam) * l_pos + lam * l_neg


class PlainWithClassifier(nn.Module):
    """(a) plus the classifier OSMCAALoss trains: CE on cosine logits to the same class vectors.

    Same arithmetic as OSMCAALoss without the soft weights and attention, in plain
    autograd; the like-for-like baseline for the classifier's three n x K x d products.
    """

    def __init__(self, class_vectors: Tensor) -> None:
        super().__init__()
        self.class_vectors = nn.Parameter(class_vectors.detach().clone())

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        logits = F.normalize(emb, dim=1) @ F.normalize(self.class_vectors, dim=1).T
        return plain_contrastive(emb, labels) + F.cross_entropy(logits, labels)


class LoopPort(nn.Module):
    """(b): OSM+CAA as the public port writes it, attention gathered one sample at a time.

    Same quantity as ``OSMCAALoss`` (cosine-softmax attention, OSM weights, CE on the
    class vectors); nothing is detached.
    """

    def __init__(self, class_vectors: Tensor, alpha: float = 1.2, lam: float = 0.5) -> None:
        super().__init__()
        self.embd = nn.Parameter(class_vectors.detach().T.clone())  # (d, C), as in the port
        self.alpha, self.lam, self.osm_sigma = alpha, lam, 0.8

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        x = F.normalize(x, p=2, dim=1)
        n = x.size(0)
        dist = torch.pow(x, 2).sum(dim=1, keepdim=True).expand(n, n)
        dist = dist + dist.t()
        dist = torch.addmm(dist, x, x.t(), beta=1, alpha=-2)
        dist = dist.clamp(min=1e-12).sqrt()
        s = torch.exp(-1.0 * torch.pow(dist, 2) / (self.osm_sigma * self.osm_sigma))
        s_ = torch.clamp(self.alpha - dist, min=0.0)
        p_mask = labels.expand(n, n).eq(labels.expand(n, n).t()).float()
        n_mask = 1 - p_mask
        s = s * p_mask + s_ * n_mask
        embd = F.normalize(self.embd, p=2, dim=0)
        logits = torch.mm(x, embd)
        denominator = torch.sum(torch.exp(logits), 1)
        att = []
        for i in range(n):
            att.append(torch.exp(torch.dot(x[i], embd[:, labels[i]])) / denominator[i])
        atten_class = torch.stack(att)
        a = torch.min(atten_class.expand(n, n), atten_class.view(-1, 1).expand(n, n))
        w = s * a
        off = 1 - torch.eye(n, n, device=x.device)
        w_p = w * p_mask * off
        w_n = w * n_mask * off
        l_p = 1.0 / 2 * torch.sum(w_p * torch.pow(dist, 2)) / torch.sum(w_p)
        l_n = 1.0 / 2 * torch.sum(w_n * torch.pow(s_, 2)) / torch.sum(w_n)
        return (1 - self.lam) * l_p + self.lam * l_n + F.cross_entropy(logits, labels)


def clustered_embeddings(labels: Tensor, seed: int) -> Tensor:
    """Class clusters around correlated centres, so positives and negatives both lie near the margin.

    (Independent Gaussian vectors in 512-d are all ~sqrt(2) apart: every negative would
    be outside the margin and the port would return NaN.)
    """
    g = torch.Generator().manual_seed(seed)
    p = int(labels.max()) + 1
    base = torch.randn(DIM, generator=g)
    centres = base / base.norm() + torch.randn(p, DIM, generator=g) / DIM**0.5
    return centres[labels.cpu()] + 0.6 * torch.randn(len(labels), DIM, generator=g) / DIM**0.5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    trials: int,
    min_s: float,
    clock: Callable[[], float],
) -> dict[str, Summary]:
    """Seconds per call of each step, best and median of ``trials`` interleaved trials.

    Each trial repeats its step for at least ``min_s`` of ``clock``; the steps take
    turns trial by trial, so load drifting on the machine hits them alike.
    """
    for step in steps.values():  # warm-up
        for _ in range(3):
            step()
    sync(device)
    runs = interleave(
        {
            name: lambda s=step: run_for(s, min_s, clock, lambda: sync(device)).per_unit
            for name, step in steps.items()
        },
        trials,
        warmup=False,
    )
    return {name: Summary.of(v, False) for name, v in runs.items()}


def make_step(fn: Callable[[Tensor, Tensor], Tensor], emb: Tensor, labels: Tensor, params):
    def step() -> None:
        for p in params:
            p.grad = None
        fn(emb, labels).backward()

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--trials", type=int, default=TRIALS, help="interleaved trials of each step")
    ap.add_argument(
        "--min-trial-s", type=float, default=MIN_TRIAL_S, help="least clock time of one trial"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--wall", action="store_true", help="CPU: wall-clock instead of CPU time")
    ap.add_argument(
        "--no-compile", action="store_true", help="skip OSMCAALoss(compile=True) (compiles ~20 s)"
    )
    args = ap.parse_args()
    # torch's own compiler emits deprecation notices about its internals while compiling
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu_time = device.type == "cpu" and not args.wall
    clock = time.process_time if cpu_time else time.perf_counter
    print(
        f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"timer: {'process CPU time' if cpu_time else 'wall clock'}"
    )
    print(
        f"d = {DIM}, {NUM_CLASSES} classes; {args.trials} interleaved trials of >= "
        f"{args.min_trial_s:g} s per step: median ms per forward+backward, ratios as "
        "best (of the best times) and median; targets checked on the best\n"
    )
    print(
        f"{'n':>5} {'OSMCAA':>8} {'(a) plain':>10} {'(b) port':>9} {'OSMCAA/(a)':>12}"
        f" {'(b)/OSMCAA':>12} {'compiled/(a)':>12}   targets (default OSMCAALoss; compile=True)"
    )
    print(f"{'':>5} {'':>8} {'':>10} {'':>9} {'best med':>12} {'best med':>12} {'best med':>12}")
    diag = []
    compile_s: dict[int, float] = {}
    for n, k in SIZES:
        labels = torch.arange(n // k).repeat_interleave(k).to(device)
        emb = clustered_embeddings(labels, n).to(device).requires_grad_()
        ours = OSMCAALoss(NUM_CLASSES, DIM).to(device)
        attached = OSMCAALoss(NUM_CLASSES, DIM, detach_weights=False).to(device)
        attached.load_state_dict(ours.state_dict())
        osm_only = OSMCAALoss(NUM_CLASSES, DIM, caa=False, ce_weight=0.0).to(device)
        port = LoopPort(ours.class_vectors).to(device)
        plain_cls = PlainWithClassifier(ours.class_vectors).to(device)
        compiled = None
        if not args.no_compile:
            compiled = OSMCAALoss(NUM_CLASSES, DIM, compile=True).to(device)
            compiled.load_state_dict(ours.state_dict())
            t0 = time.perf_counter()
            make_step(compiled, emb, labels, [emb, *compiled.parameters()])()
            compile_s[n] = time.perf_counter() - t0
        with torch.no_grad():
            diff = abs(float(ours(emb, labels)) - float(port(emb, labels)))
        assert diff < 1e-4, f"port and OSMCAALoss disagree by {diff}"
        steps = {
            "ours": make_step(ours, emb, labels, [emb, *ours.parameters()]),
            "plain": make_step(plain_contrastive, emb, labels, [emb]),
            "port": make_step(port, emb, labels, [emb, *port.parameters()]),
            "attached": make_step(attached, emb, labels, [emb, *attached.parameters()]),
            "osm_only": make_step(osm_only, emb, labels, [emb, *osm_only.parameters()]),
            "plain_cls": make_step(plain_cls, emb, labels, [emb, *plain_cls.parameters()]),
        }
        if compiled is not None:
            steps["compiled"] = make_step(compiled, emb, labels, [emb, *compiled.parameters()])
        t = time_steps(steps, device, args.trials, args.min_trial_s, clock)
        r_a, r_b = t["ours"] / t["plain"], t["port"] / t["ours"]
        want_b = TARGET_B.get(n)
        verdict = f"(a) <= {TARGET_A}x: {'met' if r_a.best <= TARGET_A else 'NOT MET'}"
        r_c = f"{'-':>12}"
        if compiled is not None:
            c_a = t["compiled"] / t["plain"]
            r_c = f"{c_a.best:>6.2f} {c_a.median:>5.2f}"
            verdict += f" (compiled: {'met' if c_a.best <= TARGET_A else 'NOT MET'})"
        if want_b is not None:
            verdict += f"; (b) >= {want_b}x: {'met' if r_b.best >= want_b else 'NOT MET'}"
        ms = {name: 1e3 * v.median for name, v in t.items()}
        print(
            f"{n:>5} {ms['ours']:>8.3f} {ms['plain']:>10.3f} {ms['port']:>9.3f}"
            f" {r_a.best:>6.2f} {r_a.median:>5.2f} {r_b.best:>6.1f} {r_b.median:>5.1f} {r_c}"
            f"   {verdict}"
        )
        diag.append((n, t))
    print(
        "\nwhere the time goes: OSM only = OSMCAALoss(caa=False, ce_weight=0), no classifier;"
        "\nattached = OSMCAALoss(detach_weights=False), autograd through the weights like (b);"
        "\n(a)+cls = (a) plus the same cosine classifier's cross-entropy (the work OSMCAALoss adds"
        "\nto a pair loss: three n x K x d matmuls), the like-for-like baseline"
    )
    print(
        f"{'n':>5} {'OSM only':>9} {'OSM only/(a)':>13} {'attached':>9} {'(b)/attached':>13}"
        f" {'(a)+cls':>8} {'OSMCAA/((a)+cls)':>17}"
    )
    for n, t in diag:
        m = {name: v.median for name, v in t.items()}  # medians: these are for information
        print(
            f"{n:>5} {1e3 * m['osm_only']:>9.3f} {m['osm_only'] / m['plain']:>12.2f}x"
            f" {1e3 * m['attached']:>9.3f} {m['port'] / m['attached']:>12.1f}x"
            f" {1e3 * m['plain_cls']:>8.3f} {m['ours'] / m['plain_cls']:>16.2f}x"
        )
    if compile_s:
        from softmine.losses import fused

        how = "FAILED, eager fallback" if fused._COMPILE_FAILED else "first call, excluded"
        done = ", ".join(f"n = {n}: {sec:.1f} s" for n, sec in compile_s.items())
        print(f"\ncompiled = OSMCAALoss(compile=True); compile time ({how}): {done}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
