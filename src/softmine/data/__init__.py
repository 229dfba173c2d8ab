"""Datasets, samplers and transforms.

Real datasets read the files their publishers distribute, unchanged:
:class:`CUB200`, :class:`Cars196`, :class:`StanfordOnlineProducts`, :class:`InShop`
(images) and :class:`MARS`, :class:`ILIDSVID`, :class:`PRID2011`, :class:`LPW`
(video tracklets). Your own data load from class folders (:class:`ImageFolder`) or
a CSV list (:func:`CSVDataset`). :mod:`softmine.data.fakes` writes tiny copies of
each published set in the same layouts for tests; :mod:`softmine.data.download`
fetches the sets that have a stable public URL.
"""

from softmine.data.cars import Cars196
from softmine.data.csvlist import CSVDataset
from softmine.data.cub import CUB200
from softmine.data.digits import Digits
from softmine.data.digits_pairs import DigitsPairs
from softmine.data.ilidsvid import ILIDSVID
from softmine.data.imagefolder import ImageFolder
from softmine.data.inshop import InShop
from softmine.data.lpw import LPW
from softmine.data.mars import MARS
from softmine.data.prid2011 import PRID2011
from softmine.data.samplers import PKSampler
from softmine.data.sop import StanfordOnlineProducts

__all__ = [
    "CUB200",
    "CSVDataset",
    "ILIDSVID",
    "LPW",
    "MARS",
    "PRID2011",
    "Cars196",
    "Digits",
    "DigitsPairs",
    "ImageFolder",
    "InShop",
    "PKSampler",
    "StanfordOnlineProducts",
]
