import os
import sys

import mxnet as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)                                  # tests/reference.py
sys.path.insert(0, os.path.join(ROOT, "examples"))        # examples/mnist_models.py

# Property tests: the same examples on every run and machine (derandomized, no example
# database written), no per-example deadline (MXNet's first calls are slow).
settings.register_profile('ci', derandomize=True, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    np.random.seed(0)
