"""Where onnxruntime spends its time on gluonq's QDQ export and on its own ``quantize_static``
model of the same float network, node by node.

Wall-clock ratios of two sessions scatter by several percent on a shared VM, more than two
graphs of the same kernels differ. onnxruntime's profiler separates the two: the two
sessions run in one process, their calls interleaved (the order reversed every call),
thread spinning off, and for each node of the optimized graph the median kernel time over
the calls is taken. It prints, per model:

* the time per call of each op type in both graphs (what one graph runs that the other
  does not, e.g. gluonq's integer ``Clip`` after a ReLU'd int8 residual add);
* the QLinearConv nodes paired by weight shape and strides, in graph order: the median of
  their time ratios (the same kernels on the same shapes give 1.00). Convolutions only one
  graph has are counted as unpaired.

The models are the ones ``bench_inference.py`` builds (random weights, 224x224, the same
calibration images); they are made in ``--workdir`` if it does not hold them yet.

    python benchmarks/ort_node_times.py --models resnet50_v1,mobilenetv2_1.0 --batch 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_inference as B                             # noqa: E402

ANCHOR, OURS = 'ort-qstatic', 'gluonq-onnx'


def ensure_models(model, workdir, n_calib):
    """Path maker of ``model``'s ONNX variants; writes gluonq's checkpoint and both ONNX models of ``model`` unless present."""
    path = lambda v: os.path.join(workdir, '%s-%s.onnx' % (model, v))   # noqa: E731
    if all(os.path.exists(path(v)) for v in (ANCHOR, OURS)):
        return path
    B.job_convert(model, 'gluonq', workdir, n_calib)
    B.job_convert(model, 'onnx', workdir, n_calib)
    return path


def _conv_key(node, shapes):
    """What a QLinearConv computes, as far as its time goes: weight shape and strides."""
    strides = [list(a.ints) for a in node.attribute if a.name == 'strides']
    return (tuple(shapes.get(node.input[3], ())), tuple(strides[0]) if strides else ())


def _profiled_times(sess, optimized_path):
    """``({op type: ms per call}, {conv key: [median us of each such conv]})`` of a profiled
    session: per node the median over its calls after the two warm-up ones."""
    import onnx
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    times, op_of = defaultdict(list), {}
    for e in events:
        if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time'):
            name = e['name'][:-len('_kernel_time')]
            times[name].append(e['dur'])
            op_of[name] = e['args']['op_name']
    med = {n: statistics.median(t[2:]) for n, t in times.items() if len(t) > 2}
    per_op = defaultdict(float)
    for n, t in med.items():
        per_op[op_of[n]] += t / 1000.0
    graph = onnx.load(optimized_path).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    convs = defaultdict(list)
    for n in graph.node:
        if n.op_type == 'QLinearConv' and n.name in med:
            convs[_conv_key(n, shapes)].append(med[n.name])
    return per_op, convs


def node_times(paths, batch, calls, threads):
    """``{variant: ({op type: ms per call}, {conv key: [median us of each such conv]})}``."""
    import numpy as np
    import onnxruntime as ort
    x = np.random.RandomState(0).rand(batch, *B.SHAPE).astype(np.float32)
    out = {}
    with tempfile.TemporaryDirectory(prefix='gluonq-ort-prof-') as tmp:
        sessions = {}
        for v, p in paths.items():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.add_session_config_entry('session.intra_op.allow_spinning', '0')
            so.log_severity_level = 3
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tmp, v)
            so.optimized_model_filepath = os.path.join(tmp, v + '-optimized.onnx')
            sessions[v] = (ort.InferenceSession(p, so, providers=['CPUExecutionProvider']), so)
        order = list(sessions)
        for i in range(calls + 2):                          # the first two calls warm up
            for v in (order if i % 2 else order[::-1]):
                sess = sessions[v][0]
                sess.run(None, {sess.get_inputs()[0].name: x})
        for v, (sess, so) in sessions.items():
            out[v] = _profiled_times(sess, so.optimized_model_filepath)
    return out


def report(model, batch, res):
    print('\n%s, batch %d: ms per call by op type' % (model, batch))
    per_op = {v: defaultdict(float, r[0]) for v, r in res.items()}
    ops = sorted(set().union(*per_op.values()), key=lambda o: -max(p[o] for p in
                                                                    per_op.values()))
    print('  %-26s %12s %12s' % ('op', ANCHOR, OURS))
    for op in ops:
        print('  %-26s %12.3f %12.3f' % (op, per_op[ANCHOR][op], per_op[OURS][op]))
    print('  %-26s %12.3f %12.3f' % ('total', sum(per_op[ANCHOR].values()),
                                     sum(per_op[OURS].values())))
    a, b = res[ANCHOR][1], res[OURS][1]
    ratios = [tb / ta for k in a if k in b and len(a[k]) == len(b[k])
              for ta, tb in zip(a[k], b[k]) if ta > 0]
    unpaired = sum(abs(len(a.get(k, ())) - len(b.get(k, ()))) for k in set(a) | set(b))
    print('  QLinearConv paired by weight shape and strides, in graph order (%d; %d unpaired):'
          ' median ratio %s/%s %.3f, range %.2f-%.2f'
          % (len(ratios), unpaired, OURS, ANCHOR, statistics.median(ratios), min(ratios),
             max(ratios)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    B.add_profile_args(ap)
    args = ap.parse_args(argv)
    with B.workdir_for(args.workdir, prefix='gluonq-bench-') as workdir:
        print('%d cores, %d threads; load average %.2f; onnxruntime spinning off'
              % (os.cpu_count(), args.threads, os.getloadavg()[0]))
        for model in B._split(args.models):
            path = ensure_models(model, workdir, args.calib)
            res = node_times({v: path(v) for v in (ANCHOR, OURS)}, args.batch, args.calls,
                             args.threads)
            report(model, args.batch, res)
    return 0


if __name__ == '__main__':
    sys.exit(main())
