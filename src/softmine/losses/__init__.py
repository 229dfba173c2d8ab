"""Metric-learning losses: OSM + CAA (paper and authors' forms) and baselines."""

from softmine.losses.osm_caa import (
    OSMCAALoss,
    caa_attention,
    class_logits,
    weighted_contrastive_loss,
)

__all__ = ["OSMCAALoss", "caa_attention", "class_logits", "weighted_contrastive_loss"]
