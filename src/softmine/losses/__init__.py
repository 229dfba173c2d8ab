"""Metric-learning losses: OSM + CAA (paper and authors' forms) and the baselines it is compared with
(pair-based: contrastive, triplet, lifted, multi-similarity, Circle; proxy- and classifier-based:
Proxy-Anchor, normalised softmax, CosFace, ArcFace, Sub-center ArcFace, SoftTriple).

Each loss is a function (the vectorised core) plus a thin module that the
``loss/`` config group instantiates, a :class:`MetricLoss` declaring what it needs from
the model.
"""

from softmine.losses.base import LossNeeds, MetricLoss, needs_of
from softmine.losses.circle import CircleLoss, circle_loss
from softmine.losses.contrastive import ContrastiveHardLoss, contrastive_hard_loss
from softmine.losses.heads import (
    ClassifierHead,
    build_heads,
    gaussian,
    weighted_cross_entropy,
)
from softmine.losses.lifted import LiftedStructureLoss, lifted_structure_loss
from softmine.losses.margin_softmax import (
    ArcFaceLoss,
    CosFaceLoss,
    SubCenterArcFaceLoss,
    arcface_loss,
    class_cosines,
    cosface_loss,
)
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
from softmine.losses.softtriple import SoftTripleLoss, softtriple_loss
from softmine.losses.triplet import (
    TripletBatchHardLoss,
    TripletSemiHardLoss,
    triplet_batchhard_loss,
    triplet_semihard_loss,
)

__all__ = [
    "ArcFaceLoss",
    "CircleLoss",
    "ClassifierHead",
    "ContrastiveHardLoss",
    "CosFaceLoss",
    "LiftedStructureLoss",
    "LossNeeds",
    "MetricLoss",
    "MultiSimilarityLoss",
    "NormSoftmaxLoss",
    "OSMCAAAuthorsLoss",
    "OSMCAAAuthorsVideoLoss",
    "OSMCAALoss",
    "ProxyAnchorLoss",
    "SoftTripleLoss",
    "SubCenterArcFaceLoss",
    "TripletBatchHardLoss",
    "TripletSemiHardLoss",
    "arcface_loss",
    "build_heads",
    "caa_attention",
    "circle_loss",
    "class_cosines",
    "class_logits",
    "contrastive_hard_loss",
    "cosface_loss",
    "gaussian",
    "lifted_structure_loss",
    "multi_similarity_loss",
    "needs_of",
    "normalized_softmax_loss",
    "proxy_anchor_loss",
    "softtriple_loss",
    "triplet_batchhard_loss",
    "triplet_semihard_loss",
    "weighted_contrastive_loss",
    "weighted_cross_entropy",
]
