"""Both CPU kinds on one machine.

oneDNN's int8 kernels are exact on CPUs with VNNI and saturate pairs of products at int16
without it (README, "CPUs without VNNI"); the tests that depend on this carry the marker
``onednn`` and assert, on each kind, what that kind computes. On a VNNI CPU,
``DNNL_MAX_CPU_ISA=AVX512_CORE`` (set before MXNet is imported) makes oneDNN run its
non-VNNI kernels, so this test re-runs every ``onednn`` test in a subprocess that way: one
VNNI machine then covers both branches. The converse cannot be done: no setting gives a
CPU without VNNI the VNNI kernels, so there the suite covers the non-VNNI branch only.

By hand: ``DNNL_MAX_CPU_ISA=AVX512_CORE python -m pytest -m onednn`` (the report header
says which kernels ran: ``oneDNN int8 kernels exact (VNNI): False``).

onnxruntime has no such switch (its U8S8 probe follows the real CPU), so the ONNX tests
are not re-run; nor are the accuracy tests (minutes of 10k-image evaluations), whose
bounds were measured on both kinds (tests/test_accuracy.py).
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from gluonq import lower

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: the probe's line in the report header (tests/conftest.py)
HEADER = 'oneDNN int8 kernels exact (VNNI): %s'
#: test files that hold CPU-dependent oneDNN tests; the re-run must reach each of them
MODULES = {'test_lower', 'test_convert'}


def test_onednn_tests_pass_on_the_non_vnni_kernels(tmp_path):
    if not lower.int8_kernels_exact():
        pytest.skip('no VNNI here: this run already took the non-VNNI branch of every '
                    'onednn test, and nothing can make oneDNN use VNNI on this CPU')
    xml = str(tmp_path / 'onednn.xml')
    env = dict(os.environ, DNNL_MAX_CPU_ISA='AVX512_CORE')
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-m', 'onednn', '-p',
                           'no:cacheprovider', '--junitxml', xml, '-o',
                           'junit_family=xunit1', HERE],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=900)
    log = proc.stdout.decode(errors='replace')
    assert HEADER % False in log, log[:3000]          # oneDNN really ran without VNNI
    assert proc.returncode == 0, log[-5000:]
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
    counts = {k: int(suite.get(k)) for k in ('tests', 'failures', 'errors', 'skipped')}
    assert counts['tests'] >= 20 and counts['failures'] == counts['errors'] == \
        counts['skipped'] == 0, counts
    ran = {case.get('classname').split('.')[-1] for case in suite.iter('testcase')}
    assert MODULES <= ran, ran
