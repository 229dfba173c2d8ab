"""Helpers for tests: tiny fake copies of every published data set, in the published layouts.

Public, for softmine's own tests, ``scripts/gpu_check.sh`` and your tests: build a fake
CUB-200-2011 with :func:`~softmine.testing.fakes.make_cub` and train on it as on the real one.
"""
