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


def _cpu():
    """The CPU model and its int8-relevant ISA flags, from /proc/cpuinfo (Linux)."""
    try:
        info = open('/proc/cpuinfo').read()
    except OSError:
        return 'unknown'
    model = next((ln.split(':', 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith('model name')), 'unknown')
    flags = set(next((ln.split(':', 1)[1].split() for ln in info.splitlines()
                      if ln.startswith('flags')), []))
    isa = [f for f in ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_int8')
           if f in flags]
    return '%s (%s), %d logical CPUs' % (model, ' '.join(isa), os.cpu_count())


def _machine():
    from gluonq import lower
    return ['CPU: %s' % _cpu(),
            'oneDNN int8 kernels exact (VNNI): %s' % lower.int8_kernels_exact()]


def pytest_report_header(config):
    return _machine()


def pytest_terminal_summary(terminalreporter):
    # the header is hidden under -q (the README's command); CI logs keep the tail
    for line in _machine():
        terminalreporter.write_line(line)
