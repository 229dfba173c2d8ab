"""Datasets, samplers and transforms.

Real datasets read the files their publishers distribute, unchanged:
:class:`CUB200`, :class:`Cars196`, :class:`StanfordOnlineProducts`, :class:`InShop`
(images) and :class:`MARS`, :class:`ILIDSVID`, :class:`PRID2011`, :class:`LPW`
(video tracklets). Your own data load from class folders (:class:`ImageFolder`) or
a CSV list (:func:`CSVDataset`). :mod:`softmine.testing.fakes` writes tiny copies of
each published set in the same layouts for tests; :mod:`softmine.data.download`
fetches the sets that have a stable public URL.
"""

from softmine.data.datasets.cars import Cars196
from softmine.data.datasets.csvlist import CSVDataset
from softmine.data.datasets.cub import CUB200
from softmine.data.datasets.digits import Digits
from softmine.data.datasets.digits_pairs import DigitsPairs
from softmine.data.datasets.ilidsvid import ILIDSVID
from softmine.data.datasets.imagefolder import ImageFolder
from softmine.data.datasets.inshop import InShop
from softmine.data.datasets.lpw import LPW
from softmine.data.datasets.mars import MARS
from softmine.data.datasets.prid2011 import PRID2011
from softmine.data.datasets.sop import StanfordOnlineProducts
from softmine.data.samplers import PKSampler

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
