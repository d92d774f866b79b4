"""Inference speed on real pretrained networks: gluonq's exports against each runtime's own
int8 model of the same float ONNX file.

The networks are rapidocr-onnxruntime's three ONNX models (``examples/ocr_data.py``): the
text-line classifier ``cls`` (MobileNetV3), the recognizer ``rec`` (PP-LCNetV3 with an
attention neck) and the DBNet detector ``det`` (MobileNetV3, FPN, transposed-conv head),
on text rendered at run time. Every quantizer gets the same calibration images. Variants:

* ``mx-fp32``      the float network of ``gluonq.import_onnx``, hybridized (MXNet);
* ``mx-builtin``   MXNet's ``quantize_net_v2`` of that network (naive), if it converts (on
                   these SymbolBlocks MXNet 1.9.1's fails: its quantized network expects a
                   second input, "The argument structure of HybridBlock does not match");
* ``gluonq-mx``    ``gluonq.quantize_net`` of it (``--recipe``), hybridized: the fused
                   oneDNN kernels (MXNet);
* ``ort-fp32``     the ONNX file in onnxruntime;
* ``ort-qstatic``  onnxruntime's ``quantize_static`` (QDQ, U8S8, per channel, MinMax);
* ``gluonq-ort``   ``gluonq.export_onnx`` of gluonq's network in onnxruntime;
* ``gluonq-ort-r8`` the same with ``round_float_results=True`` (convolutions with a float
                   output through an 8-bit intermediate, as QLinearConv);
* ``ov-fp32``      the ONNX file in OpenVINO (its default precision: bf16 where the CPU has it);
* ``ov-nncf``      ``nncf.quantize`` of the ONNX file (its defaults) in OpenVINO;
* ``ov-ort-qdq``   onnxruntime's QDQ model in OpenVINO;
* ``gluonq-ov``    ``gluonq.export_openvino``'s IR.

All variants run in one process, timed in rounds (each round every variant in
``bench_inference.round_order``: one untimed call, then timed calls), onnxruntime's thread
spinning off; the medians are printed with ratios against the fastest int8 anchor of the
same runtime and overall, and paired round by round. For OpenVINO it also prints which
convolutions ran outside int8 in its runtime model (``runtimePrecision``).

    python benchmarks/bench_real_speed.py
    python benchmarks/bench_real_speed.py --models det --batches 1,4 --runs 30
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'examples'))

import bench_inference as B                             # noqa: E402
import ocr_data as O                                    # noqa: E402

VARIANTS = ('mx-fp32', 'mx-builtin', 'gluonq-mx', 'ort-fp32', 'ort-qstatic', 'gluonq-ort',
            'gluonq-ort-r8', 'ov-fp32', 'ov-nncf', 'ov-ort-qdq', 'gluonq-ov')
#: gluonq's variant -> the int8 anchors of the same runtime
ANCHORS = {'gluonq-mx': ('mx-builtin',), 'gluonq-ort': ('ort-qstatic',),
           'gluonq-ort-r8': ('ort-qstatic',), 'gluonq-ov': ('ov-nncf', 'ov-ort-qdq')}
FP32 = {'gluonq-mx': 'mx-fp32', 'gluonq-ort': 'ort-fp32', 'gluonq-ort-r8': 'ort-fp32',
        'gluonq-ov': 'ov-fp32'}
RECIPES = {'plain': {}, 'auto': {'act_scheme': 'auto'}, 'bc': {'bias_correction': True},
           'auto+bc': {'act_scheme': 'auto', 'bias_correction': True}}
#: quant_pre_process options onnxruntime's quantizer needs on each model (see
#: bench_real_models.py)
ORT_PRE = {'cls': {'skip_symbolic_shape': True}, 'rec': {'auto_merge': True},
           'det': {'auto_merge': True}}


def images(kind, n, seed, det_hw):
    if kind == 'cls':
        return O.cls_batch(n, seed=seed)[0]
    if kind == 'rec':
        return O.rec_batch(n, seed=seed)[0]
    return O.det_batch(n, seed, *det_hw)[0]


def build(kind, calib, recipe, workdir):
    """Every variant's callable on a numpy batch: ``{variant: fn or error string}``."""
    import mxnet as mx
    import gluonq
    from bench_onnx import ort_quantize_static
    src = O.model_path(kind)
    p = lambda name: os.path.join(workdir, '%s-%s' % (kind, name))   # noqa: E731
    static = dict(static_alloc=True, static_shape=True)
    shape = (1,) + calib.shape[1:]
    fns = {}

    def mx_runner(net):
        return lambda x: net(mx.nd.array(x)).wait_to_read()

    def attempt(variant, make):
        try:
            fns[variant] = make()
        except Exception as err:                                 # noqa: BLE001
            fns[variant] = '%s: %s' % (type(err).__name__, str(err).splitlines()[0][:120])
            print('%s %s failed: %s' % (kind, variant, fns[variant]), flush=True)

    net = gluonq.import_onnx(src, shape).net
    net.hybridize(**static)
    fns['mx-fp32'] = mx_runner(net)

    def builtin():
        import logging
        from mxnet.contrib.quantization import quantize_net_v2
        logging.disable(logging.CRITICAL)
        data = mx.gluon.data.DataLoader(mx.gluon.data.ArrayDataset(
            mx.nd.array(calib), mx.nd.zeros(len(calib))), batch_size=16)
        q = quantize_net_v2(gluonq.import_onnx(src, shape).net, quantized_dtype='auto',
                            quantize_mode='full', calib_mode='naive', calib_data=data,
                            num_calib_examples=len(calib), ctx=mx.cpu())
        q.hybridize(**static)
        return mx_runner(q)
    attempt('mx-builtin', builtin)
    t = time.time()
    qnet = gluonq.quantize_net(net, calib, progress=False, **RECIPES[recipe])
    print('%s gluonq quantize_net (%s) %.1f s' % (kind, recipe, time.time() - t), flush=True)
    gluonq.export_onnx(qnet, p('gluonq.onnx'), overwrite=True)
    gluonq.export_onnx(qnet, p('gluonq-r8.onnx'), overwrite=True, round_float_results=True)
    gluonq.export_openvino(qnet, p('gluonq.xml'), overwrite=True)
    qnet.hybridize(**static)
    fns['gluonq-mx'] = mx_runner(qnet)
    try:
        ort_quantize_static(src, p('qstatic.onnx'), calib, pre_process_options=ORT_PRE[kind])
    except Exception as err:                                     # noqa: BLE001
        fns['ort-qstatic'] = fns['ov-ort-qdq'] = 'quantize_static failed: %s' % err
    if B.nncf_quantize(src, p('nncf.onnx'), calib) is None:
        fns['ov-nncf'] = 'nncf is not installed'
    onnx_files = {'ort-fp32': src, 'ort-qstatic': p('qstatic.onnx'),
                  'gluonq-ort': p('gluonq.onnx'), 'gluonq-ort-r8': p('gluonq-r8.onnx')}
    for v, path in onnx_files.items():
        if isinstance(fns.get(v), str):
            continue
        attempt(v, lambda path=path: (lambda s: lambda x: B.run_session(s, x))(
            B.session(path, THREADS)))
    ov_files = {'ov-fp32': src, 'ov-nncf': p('nncf.onnx'), 'ov-ort-qdq': p('qstatic.onnx'),
                'gluonq-ov': p('gluonq.xml')}
    for v, path in ov_files.items():
        if isinstance(fns.get(v), str):
            continue
        attempt(v, lambda path=path: B.openvino_runner(path, THREADS))
    return fns, ov_files


def ov_outside_int8(path, x):
    """``{'layerType precision': count}`` of the (de)convolutions OpenVINO's runtime model of
    ``path`` runs outside int8, for input ``x``."""
    import openvino as ov
    from gluonq.openvino import runtime_precisions
    core = ov.Core()
    model = core.read_model(path)
    model.reshape(list(x.shape))
    cm = core.compile_model(model, 'CPU', {'INFERENCE_NUM_THREADS': THREADS})
    return {'%s %s' % k: n for k, n in sorted(runtime_precisions(cm).items())
            if k[0] in ('Convolution', 'Deconvolution') and k[1] not in ('u8', 'i8')}


def time_variants(fns, x, runs, warmup):
    """``({variant: median ms}, {variant: [median ms of each round]})`` of the callables."""
    import numpy as np
    live = [v for v in VARIANTS if callable(fns.get(v))]
    for v in live:
        for _ in range(warmup):
            fns[v](x)
    times = {v: [] for v in live}
    for r in range(-(-runs // B.TURN)):
        for v in B.round_order(live, r):
            fns[v](x)
            for _ in range(B.TURN):
                t = time.perf_counter()
                fns[v](x)
                times[v].append(1000 * (time.perf_counter() - t))
    med = {v: float(np.median(t)) for v, t in times.items()}
    rounds = {v: [float(np.median(t[i:i + B.TURN])) for i in range(0, len(t), B.TURN)]
              for v, t in times.items()}
    return med, rounds


def report(kind, bs, fns, med, rounds):
    print('\n### %s, batch %d: ms per call (median), ratio = anchor time / gluonq time'
          % (kind, bs))
    print('| variant | ms |\n|---|---|')
    for v in VARIANTS:
        print('| %s | %s |' % (v, '%.2f' % med[v] if v in med else fns.get(v, 'not run')))
    int8_anchors = [a for anchors in ANCHORS.values() for a in anchors if a in med]
    for ours, anchors in ANCHORS.items():
        if ours not in med:
            continue
        own = [a for a in anchors if a in med]
        cells = []
        if own:
            a = min(own, key=lambda v: med[v])
            cells.append('vs %s %.2fx (paired %.2fx)' % (
                a, med[a] / med[ours], B.paired_ratio(rounds[ours], rounds[a])))
        if int8_anchors:
            a = min(int8_anchors, key=lambda v: med[v])
            cells.append('vs the fastest int8 anchor %s %.2fx' % (a, med[a] / med[ours]))
        fp32 = FP32[ours]
        if fp32 in med:
            cells.append('vs %s %.2fx' % (fp32, med[fp32] / med[ours]))
        print('%s: %s' % (ours, '; '.join(cells)))


THREADS = 2


def main(argv=None):
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--models', default='cls,rec,det', help='comma-separated: cls, rec, det')
    ap.add_argument('--batches', default='1,8', help='batch sizes (det: pages)')
    ap.add_argument('--runs', type=int, default=30, help='timed calls per variant and batch')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--recipe', default='auto+bc', choices=sorted(RECIPES),
                    help="gluonq's options (auto+bc: act_scheme='auto', bias_correction=True)")
    ap.add_argument('--n-calib', type=int, default=64, help='calibration images (det: 16)')
    ap.add_argument('--det-size', default='320x320', help='det page size HxW (multiples of 32)')
    ap.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    ap.add_argument('--workdir', help='keep the models here (default: temporary)')
    args = ap.parse_args(argv)
    THREADS = args.threads
    det_hw = tuple(int(v) for v in args.det_size.split('x'))
    with B.workdir_for(args.workdir, prefix='gluonq-real-speed-') as workdir:
        print('CPU: %s; %d threads; load average %.2f; onnxruntime spinning off'
              % (B.cpu_info(), THREADS, os.getloadavg()[0]), flush=True)
        for kind in args.models.split(','):
            n = args.n_calib if kind != 'det' else min(args.n_calib, 16)
            calib = images(kind, n, 1, det_hw)
            fns, ov_files = build(kind, calib, args.recipe, workdir)
            for bs in [int(b) for b in args.batches.split(',')]:
                x = images(kind, bs, 2, det_hw)
                med, rounds = time_variants(fns, x, args.runs, args.warmup)
                report(kind, bs, fns, med, rounds)
            x = images(kind, 1, 2, det_hw)
            print('OpenVINO (de)convolutions outside int8: %s' % json.dumps(
                {v: ov_outside_int8(p, x) for v, p in ov_files.items() if callable(fns.get(v))}))
            print('load average %.2f' % os.getloadavg()[0], flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
