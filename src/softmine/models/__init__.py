"""Backbones (trunks), the embedding network built on them, and the video (tracklet) model."""

from softmine.models.bninception import BNINCEPTION_INPUT_NORM, BNINCEPTION_URL, BNInception
from softmine.models.embedding_net import EmbeddingNet, freeze_batchnorm, set_batchnorm_eval
from softmine.models.features import FeatureInfo
from softmine.models.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNormalize
from softmine.models.tiny import TinyCNN
from softmine.models.trunks import GlobalPool, TimmTrunk, TorchvisionTrunk
from softmine.models.video import VideoEmbeddingNet, frame_attention, temporal_pool
from softmine.models.weights import load_matching_state_dict, read_state_dict

__all__ = [
    "BNINCEPTION_INPUT_NORM",
    "BNINCEPTION_URL",
    "BNInception",
    "EmbeddingNet",
    "FeatureInfo",
    "GlobalPool",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputNormalize",
    "TimmTrunk",
    "TinyCNN",
    "TorchvisionTrunk",
    "VideoEmbeddingNet",
    "frame_attention",
    "freeze_batchnorm",
    "load_matching_state_dict",
    "read_state_dict",
    "set_batchnorm_eval",
    "temporal_pool",
]
