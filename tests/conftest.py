import os
import sys

import mxnet as mx
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)                                  # tests/reference.py
sys.path.insert(0, os.path.join(ROOT, "examples"))        # examples/mnist_models.py


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    np.random.seed(0)
