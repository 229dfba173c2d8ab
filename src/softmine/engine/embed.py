"""Compute embeddings of a whole dataset with a model, in batches, without gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def extract_embeddings(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (n, d), labels int64 (n,)) of every item, in dataset order."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for x, y in loader:
        feats.append(model(x.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def raw_inputs(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Flattened raw inputs and labels of every item: the 'raw pixels' baseline."""
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    x = torch.stack([torch.as_tensor(v) for v in xs]).flatten(1).float().numpy()
    return x, np.asarray(ys, dtype=np.int64)
