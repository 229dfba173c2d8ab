"""Backbones (trunks) and the embedding network built on them."""

from softmine.models.embedding import EmbeddingNet
from softmine.models.tiny import TinyCNN

__all__ = ["EmbeddingNet", "TinyCNN"]
