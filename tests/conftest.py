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


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'onednn: takes a branch that depends on the CPU kind of oneDNN int8 '
        'kernels (VNNI or not); tests/test_cpu_kinds.py re-runs these tests with '
        'DNNL_MAX_CPU_ISA=AVX512_CORE where the CPU has VNNI')


def pytest_report_header(config):
    from gluonq import lower
    return 'oneDNN int8 kernels exact (VNNI): %s' % lower.int8_kernels_exact()
