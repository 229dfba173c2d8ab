"""Metric-learning losses: OSM + CAA (paper and authors' forms) and the baselines it is compared with
(pair-based, proxy-based: Proxy-Anchor, normalised softmax).

Each loss is a function (the vectorised core) plus a thin module that the
``loss/`` config group instantiates, a :class:`MetricLoss` declaring what it needs from
the model.
"""

from softmine.losses.base import LossNeeds, MetricLoss, needs_of
from softmine.losses.contrastive import ContrastiveHardLoss, contrastive_hard_loss
from softmine.losses.heads import (
    ClassifierHead,
    build_heads,
    gaussian,
    weighted_cross_entropy,
)
from softmine.losses.lifted import LiftedStructureLoss, lifted_structure_loss
from softmine.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
from softmine.losses.normsoftmax import NormSoftmaxLoss, normalized_softmax_loss
from softmine.losses.osm_caa import (
    OSMCAALoss,
    caa_attention,
    class_logits,
    weighted_contrastive_loss,
)
from softmine.losses.osm_caa_authors import OSMCAAAuthorsLoss, OSMCAAAuthorsVideoLoss
from softmine.losses.osm_caa_authors import OSMCAAOfficialLoss as OSMCAAOfficialLoss  # old name
from softmine.losses.osm_caa_authors import (
    OSMCAAOfficialVideoLoss as OSMCAAOfficialVideoLoss,  # old name
)
from softmine.losses.proxy_anchor import ProxyAnchorLoss, proxy_anchor_loss
from softmine.losses.triplet import (
    TripletBatchHardLoss,
    TripletSemiHardLoss,
    triplet_batchhard_loss,
    triplet_semihard_loss,
)

__all__ = [
    "ClassifierHead",
    "ContrastiveHardLoss",
    "LiftedStructureLoss",
    "LossNeeds",
    "MetricLoss",
    "MultiSimilarityLoss",
    "NormSoftmaxLoss",
    "OSMCAALoss",
    "OSMCAAAuthorsLoss",
    "OSMCAAAuthorsVideoLoss",
    "ProxyAnchorLoss",
    "TripletBatchHardLoss",
    "TripletSemiHardLoss",
    "build_heads",
    "caa_attention",
    "class_logits",
    "contrastive_hard_loss",
    "gaussian",
    "lifted_structure_loss",
    "multi_similarity_loss",
    "needs_of",
    "normalized_softmax_loss",
    "proxy_anchor_loss",
    "triplet_batchhard_loss",
    "triplet_semihard_loss",
    "weighted_contrastive_loss",
    "weighted_cross_entropy",
]
