"""Where OpenVINO spends its time on gluonq's IR and on the anchors' own int8 models of the
same float network, layer type by layer type.

Wall-clock ratios of two compiled models scatter by more on a shared VM than two graphs of
the same kernels differ. OpenVINO's performance counters (``PERF_COUNT``) separate the two:
the models are compiled in one process, their calls interleaved (the order reversed every
call), and for each (layer type, kernel) of the runtime model the median over the calls of
its summed time per call is taken. It prints, per model, the median wall time per call and
the per-kernel times of gluonq's IR (``gluonq-ov``), NNCF's int8 model (``ov-nncf``, where
nncf is installed) and onnxruntime's QDQ model (``ov-ort-qdq``).

The models are the ones ``bench_inference.py`` builds (random weights, 224x224, the same
calibration images); they are made in ``--workdir`` if it does not hold them yet (that
runs all of bench_inference.py's conversions and exports: tens of minutes on 2 cores, so
point ``--workdir`` at a bench_inference.py run's).

    python benchmarks/ov_layer_times.py --models resnet50_v1,mobilenetv2_1.0 --batch 16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_inference as B                             # noqa: E402

VARIANTS = ('gluonq-ov', 'ov-nncf', 'ov-ort-qdq')
WARMUP = 5


def ensure_models(model, workdir, n_calib):
    """``{variant: path}`` of the OpenVINO variants of ``model`` that exist (converted and
    exported into ``workdir`` unless present)."""
    path = lambda v: os.path.join(workdir, '%s-%s' % (model, B.OV_FILES[v]))   # noqa: E731
    if not os.path.exists(path('gluonq-ov')):
        for which in ('gluonq', 'onnx', 'openvino'):
            B.job_convert(model, which, workdir, n_calib)
    return {v: path(v) for v in VARIANTS if os.path.exists(path(v))}


def layer_times(paths, batch, calls, threads):
    """``{variant: (wall ms per call, {(layer type, kernel): ms per call})}``, medians."""
    import numpy as np
    import openvino as ov
    core = ov.Core()
    reqs = {}
    for v, path in paths.items():
        m = core.read_model(path)
        m.reshape([batch] + list(B.SHAPE))
        reqs[v] = core.compile_model(m, 'CPU', {'PERF_COUNT': 'YES',
                                                'INFERENCE_NUM_THREADS': threads}
                                     ).create_infer_request()
    x = np.random.RandomState(0).rand(batch, *B.SHAPE).astype(np.float32)
    wall = defaultdict(list)
    per = {v: defaultdict(list) for v in reqs}
    for call in range(WARMUP + calls):
        for v in (list(reqs) if call % 2 else list(reqs)[::-1]):
            t = time.perf_counter()
            reqs[v].infer({0: x})
            if call < WARMUP:
                continue
            wall[v].append(1e3 * (time.perf_counter() - t))
            summed = defaultdict(float)
            for info in reqs[v].profiling_info:
                summed[(info.node_type, info.exec_type)] += info.real_time.total_seconds() * 1e3
            for key, ms in summed.items():
                per[v][key].append(ms)
    return {v: (statistics.median(wall[v]),
                {k: statistics.median(t) for k, t in per[v].items()}) for v in reqs}


def report(model, batch, res):
    print('\n## %s, batch %d: OpenVINO ms per call (median)\n' % (model, batch))
    variants = list(res)
    print('| layer type | kernel | ' + ' | '.join(variants) + ' |')
    print('|---|---|' + '---|' * len(variants))
    print('| wall | | ' + ' | '.join('%.2f' % res[v][0] for v in variants) + ' |')
    keys = sorted({k for v in variants for k in res[v][1]},
                  key=lambda k: -max(res[v][1].get(k, 0.0) for v in variants))
    for k in keys:
        cells = [res[v][1].get(k) for v in variants]
        if max(c or 0.0 for c in cells) < 0.01:
            continue
        print('| %s | %s | ' % k + ' | '.join('-' if c is None else '%.2f' % c
                                              for c in cells) + ' |')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    B.add_profile_args(ap)
    args = ap.parse_args(argv)
    with B.workdir_for(args.workdir, prefix='gluonq-ovt-') as workdir:
        for model in B._split(args.models):
            paths = ensure_models(model, workdir, args.calib)
            report(model, args.batch, layer_times(paths, args.batch, args.calls,
                                                  args.threads))
    return 0


if __name__ == '__main__':
    sys.exit(main())
