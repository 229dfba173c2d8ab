"""Datasets, samplers and transforms."""

from softmine.data.digits import Digits
from softmine.data.samplers import PKSampler

__all__ = ["Digits", "PKSampler"]
