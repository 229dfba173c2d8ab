"""A trained model, ready for inference: rebuilt from a run folder or checkpoint with its own test transform.

A checkpoint holds the resolved config it was trained with, so the network is
rebuilt exactly (backbone, embedding size, input normalisation) and the images
go through the run's own test transform (``dataset.test.transform``, or the
re-ID ``dataset.query.transform``): the embeddings of a file on disk equal
those the run computed when it evaluated the same image.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from softmine.config import build
from softmine.engine.checkpoint import load_checkpoint, load_state_checked
from softmine.engine.setup import resolve_device
from softmine.errors import ConfigError
from softmine.runs.folder import stale_checkpoint
from softmine.runs.layout import RunLayout

log = logging.getLogger(__name__)

TRANSFORM_SPLITS = ("test", "query", "gallery")  # where the run's deterministic transform lives


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint of ``path``: a run folder's ``checkpoints/last.pt``, or the ``.pt`` file itself."""
    path = Path(path)
    if path.is_dir():
        ckpt = RunLayout(path).last_checkpoint
        if not ckpt.exists():
            raise ConfigError(
                f"no checkpoint at {ckpt}; is {path} a softmine run folder (outputs/DATE/TIME)?"
            )
        return ckpt
    if not path.exists():
        raise ConfigError(
            f"model {path} does not exist; give a run folder (outputs/DATE/TIME) or a checkpoint (.pt)"
        )
    return path


def fingerprint(model: nn.Module) -> str:
    """A short hash of the weights: equal for the same trained model, different for any other."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def input_channels(model: nn.Module) -> int:
    """Image channels the network takes: those of its first convolution (3 if it has none)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            return int(m.in_channels)
    return int(getattr(getattr(model, "input_norm", None), "channels", 3))


def test_transform_node(cfg: DictConfig) -> DictConfig | None:
    """The run's deterministic image transform config, or None when its test images go in as they are."""
    dataset = cfg.get("dataset") or {}
    for split in TRANSFORM_SPLITS:
        node = dataset.get(split)
        if node is not None and node.get("transform") is not None:
            return node.transform
    return None


class ImageEmbedder(nn.Module):
    """``images`` (N, C, H, W) floats in [0, 1] -> (N, D) embeddings, for image and video models.

    A video model (one with ``frame_embeddings``) embeds each image as a one-frame
    tracklet: its frame embedding, L2-normalised when the model normalises, which is
    what the model gives a clip of that single frame under any pooling.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.video = hasattr(model, "frame_embeddings")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.video:
            return self.model(images)
        z = self.model.frame_embeddings(images)
        return F.normalize(z, dim=1) if getattr(self.model, "normalize", True) else z


@dataclass
class LoadedModel:
    """A trained embedding network in eval mode, on its device, with what inference needs.

    Attributes:
        model: the network (input normalisation included), as trained.
        embedder: ``model`` as a function of images (N, C, H, W) in [0, 1] -> (N, D).
        config: the resolved run config stored in the checkpoint.
        checkpoint: the checkpoint file it was loaded from.
        device: where ``model`` runs.
        transform: the run's test transform (Pillow image -> uint8 tensor), or None.
        fingerprint: hash of the weights (see :func:`fingerprint`).
        channels: image channels the network takes (1: grayscale, 3: RGB).
        step: training iterations behind these weights.
    """

    model: nn.Module
    embedder: ImageEmbedder
    config: DictConfig
    checkpoint: Path
    device: torch.device
    transform: Callable[[Any], Any] | None
    fingerprint: str
    channels: int
    step: int

    @property
    def embedding_dim(self) -> int:
        return int(self.config.backbone.embedding_dim)

    @property
    def normalized(self) -> bool:
        """Whether the network L2-normalises its output."""
        return bool(getattr(self.model, "normalize", True))

    def describe(self) -> dict[str, Any]:
        """What identifies the model, for the files made with it (embeddings, index, export)."""
        return {
            "checkpoint": str(self.checkpoint.resolve()),
            "fingerprint": self.fingerprint,
            "backbone": str(self.config.backbone.get("name", "")),
            "embedding_dim": self.embedding_dim,
            "dataset": str(self.config.get("dataset", {}).get("name", "")),
            "step": self.step,
        }


def load_model(path: str | Path, device: str = "auto") -> LoadedModel:
    """Rebuild the network of a run folder or ``.pt`` checkpoint, load its weights, eval mode.

    Args:
        path: a run folder (its ``checkpoints/last.pt``) or a checkpoint file.
        device: ``auto`` (CUDA when there is one) | ``cpu`` | ``cuda`` | ``cuda:N``.
    """
    ckpt = find_checkpoint(path)
    _warn_if_stale(ckpt)
    state = load_checkpoint(ckpt)
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ConfigError(f"{ckpt} is not a softmine checkpoint (no 'config'/'model' entries)")
    cfg = OmegaConf.create(state["config"])
    dev = resolve_device(device)
    model = build_network(cfg, int(state.get("num_classes", 0)) or None)
    load_state_checked(model, state["model"], "model", ckpt)
    model.eval().to(dev)
    node = test_transform_node(cfg)
    transform = build(node, "dataset.test.transform") if node is not None else None
    train_state = state.get("train_state") or {}
    return LoadedModel(
        model=model,
        embedder=ImageEmbedder(model).eval(),
        config=cfg,
        checkpoint=ckpt,
        device=dev,
        transform=transform,
        fingerprint=fingerprint(model),
        channels=input_channels(model),
        step=int(train_state.get("step", 0)),
    )


def _warn_if_stale(ckpt: Path) -> None:
    """Say so when a run's ``last.pt`` is not the network its ``metrics.json`` describes."""
    run_dir = ckpt.parent.parent
    if ckpt != RunLayout(run_dir).last_checkpoint:
        return
    stale = stale_checkpoint(run_dir)
    if stale is not None:
        log.warning(
            "%s; these weights are not the ones its metrics describe: finish the run with its "
            "command plus resume=true hydra.run.dir=%s",
            stale,
            run_dir,
        )


def build_network(cfg: DictConfig, num_classes: int | None) -> nn.Module:
    """The run's backbone, built from its config with the sizes it left open filled in."""
    from softmine.engine.components import run_time_sizes

    node = no_pretrained_download(cfg.backbone)
    sizes = run_time_sizes(node, num_classes, int(node.embedding_dim))
    return build(node, "backbone", **sizes)


def no_pretrained_download(node: DictConfig) -> DictConfig:
    """A copy of a backbone config with every ``pretrained`` key off: the checkpoint's weights replace them anyway."""
    copy = OmegaConf.create(OmegaConf.to_container(node, resolve=True))

    def walk(n: Any) -> None:
        if isinstance(n, DictConfig):
            for key in n:
                if key == "pretrained":
                    n[key] = False
                else:
                    walk(n[key])
        elif isinstance(n, ListConfig):
            for item in n:
                walk(item)

    walk(copy)
    return copy
