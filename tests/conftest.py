"""Shared fixtures: small models trained once per test session on sklearn's digits."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits_models():
    """Three MLPs (width 0.25: 128 hidden units) trained on digits with seeds 0, 1, 2."""
    import combinability as cb

    return [cb.train("mlp", "digits", backend="torch", seed=s, epochs=6, width=0.25) for s in (0, 1, 2)]


@pytest.fixture(scope="session")
def digits_pair(digits_models):
    import combinability as cb

    a, b, _ = digits_models
    return cb.ModelPair(a, b, architecture="mlp", backend="torch").align("weight", seed=0)


@pytest.fixture(scope="session")
def digits_triple(digits_models):
    import combinability as cb

    a, b, c = digits_models
    return cb.ModelPair(a, b, backend="torch", model_c=c).align("weight", seed=0)
