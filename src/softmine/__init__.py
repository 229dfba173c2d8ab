"""softmine: deep metric learning with Online Soft Mining and Class-Aware Attention.

Reproduces Wang et al., "Deep Metric Learning by Online Soft Mining and
Class-Aware Attention", AAAI 2019, and the baselines it is compared with.
"""

__version__ = "0.1.0"

import logging as _logging

from softmine import _moved

# faiss logs eight INFO lines about which CPU build it loads at every import; under
# Hydra's console logging they would bury a run's first line (or its one-line error).
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)

# Old module paths (softmine.train, softmine.engine.run_folder, ...) import as the modules they became.
_moved.install()
