"""Datasets, samplers and transforms.

Real datasets read the files their publishers distribute, unchanged:
:class:`CUB200`, :class:`Cars196` (images) and :class:`MARS`, :class:`ILIDSVID`,
:class:`PRID2011` (video tracklets). :mod:`softmine.data.fakes` writes tiny
copies of each in the same layouts for tests.
"""

from softmine.data.cars import Cars196
from softmine.data.cub import CUB200
from softmine.data.digits import Digits
from softmine.data.ilidsvid import ILIDSVID
from softmine.data.mars import MARS
from softmine.data.prid2011 import PRID2011
from softmine.data.samplers import PKSampler

__all__ = ["CUB200", "MARS", "PRID2011", "Cars196", "Digits", "ILIDSVID", "PKSampler"]
