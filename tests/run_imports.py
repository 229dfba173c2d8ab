"""What a training run imports, imported once in the test process.

A child forked from the test process (:class:`tests.conftest.ForkedPopen`, a ``fork``
start of torch.multiprocessing) starts with this process's modules: when a test forks
runs, importing their heavy modules here first spares each run importing them again
(seconds each on a busy 2-core machine; the parent pays them once per xdist worker).
"""

from __future__ import annotations


def import_what_a_run_imports() -> None:
    """The trainer and what building and evaluating it import: the digits (scikit-learn's
    datasets), NMI (its metrics) and torch._dynamo (the first optimizer imports it)."""
    import sklearn.datasets  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import torch._dynamo  # noqa: F401

    from softmine.engine import Trainer  # noqa: F401
    from softmine.reporting import artifacts  # noqa: F401
