"""onnxruntime speed and accuracy of gluonq's ONNX export against onnxruntime's own int8.

Speed (``speed`` command): for each model (gluoncv ``resnet50_v1``, ``mobilenetv2_1.0``,
random weights, 224x224) three onnxruntime sessions on the same weights:

* ``ort-fp32``: the float model exported with ``mx.onnx.export_model`` (initializers that
  are also listed as graph inputs removed, so that they fold);
* ``ort-qstatic``: onnxruntime's own ``quantize_static`` of it (QDQ, QUInt8 activations,
  QInt8 weights, per_channel=True, MinMax, after ``quant_pre_process``), calibrated with a
  CalibrationDataReader over the same calibration images gluonq uses;
* ``gluonq-onnx``: ``gluonq.quantize_net`` (naive calibration, the same images) then
  ``gluonq.export_onnx`` with int8 weights (U8S8, the kernels of ``ort-qstatic``).
  (``benchmarks/bench_inference.py`` also times the uint8-weight export.)

All sessions use ``intra_op_num_threads=2``, ``inter_op_num_threads=1`` and full graph
optimization. Timing: warm-up runs, then ``--rounds`` rounds in which every variant runs
once in turn (the two int8 models interleaved, the order reversed every other round, so
that load from other jobs on the machine hits both alike; the fp32 model afterwards, with
a quarter of the rounds). Reported: the median over rounds of each variant, the ratio of
those medians, the median of the per-round ratios (the two int8 variants ran back to
back, so a change of load during the measurement cancels), the load
average before and after, and the op types onnxruntime runs for each int8 model after its
graph optimizations. ``--reuse`` times the ONNX files already in ``--workdir``.

Accuracy (``accuracy`` command): the float MNIST nets shipped in data/models/ (others from
``examples/mnist_models.py`` are trained for ``--epochs`` and cached in ``--cache-dir``);
top-1 of gluonq's MXNet int8 (its reference chain), gluonq's ONNX in onnxruntime -- the
default export (``weight_dtype='auto'``, the pre-add ranges recorded at conversion: what
``gluonq-convert --onnx`` writes), and with ``calib_data`` = the calibration images with
int8 weights (U8S8) and with uint8 weights (U8U8) -- and onnxruntime's own quantize_static
(same calibration images, MinMax = gluonq's 'naive'); the logit SQNR of each against the
fp32 network.

    python benchmarks/bench_onnx.py speed --models resnet50_v1,mobilenetv2_1.0 --batches 1,16
    python benchmarks/bench_onnx.py accuracy --models resnet20,mobilenet0.25,incres
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'examples'))

import mxnet as mx                                   # noqa: E402

import gluonq                                        # noqa: E402
from gluonq import quant                             # noqa: E402
from gluonq.onnx import export_onnx                  # noqa: E402

from bench_inference import run_session, session     # noqa: E402


# ---------------------------------------------------------------------------------------
# float export and onnxruntime's own quantizer
# ---------------------------------------------------------------------------------------
def export_fp32(net, shape, path, dynamic_batch=True):
    """Float ONNX of a hybridized Gluon net via ``mx.onnx.export_model``; initializers
    that the exporter also lists as graph inputs are removed from the inputs."""
    import onnx
    net.hybridize()
    net(mx.nd.zeros(shape))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, 'float')
        net.export(prefix)
        sym, arg, aux = mx.model.load_checkpoint(prefix, 0)
    params = dict(arg)
    params.update(aux)
    dyn = [(None,) + tuple(shape[1:])] if dynamic_batch else None
    mx.onnx.export_model(sym, params, in_shapes=[tuple(shape)], in_types=[np.float32],
                         onnx_file_path=path, dynamic=dynamic_batch,
                         dynamic_input_shapes=dyn)
    model = onnx.load(path)
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.save(model, path)
    return path


class _Reader:
    """CalibrationDataReader over numpy batches."""

    def __init__(self, input_name, batches):
        self._input_name = input_name
        self._batches = list(batches)
        self._it = iter(self._batches)

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {self._input_name: b}

    def rewind(self):
        self._it = iter(self._batches)


def ort_quantize_static(fp32_path, out_path, calib, batch_size=1, per_channel=True,
                        method='MinMax', pre_process_options=None):
    """onnxruntime's own int8 model: quant_pre_process, then QDQ U8S8 (per-channel by
    default) with the calibration ``method`` ('MinMax', 'Entropy', 'Percentile' or
    'Distribution': onnxruntime's ``CalibrationMethod`` names, its default options).
    ``pre_process_options`` go to ``quant_pre_process`` (models with free spatial sizes,
    such as rapidocr's, need ``{'auto_merge': True}`` for its symbolic shape inference).
    A model of opset < 13 is first converted to opset 13 (``onnx.version_converter``) for
    per-channel quantization: quantize_static writes per-channel DequantizeLinear nodes
    (an ``axis``, opset 13) into older models, which onnxruntime then refuses to load."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if method not in CalibrationMethod.__members__:
        raise ValueError('method must be one of %s, got %r'
                         % (sorted(CalibrationMethod.__members__), method))
    pre = out_path + '.pre.onnx'
    src = fp32_path
    model = onnx.load(fp32_path)
    opset = max(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))
    if per_channel and opset < 13:
        src = out_path + '.opset13.onnx'
        onnx.save(onnx.version_converter.convert_version(model, 13), src)
    quant_pre_process(src, pre, **(pre_process_options or {}))
    if src != fp32_path:
        os.remove(src)
    name = onnx.load(pre).graph.input[0].name
    batches = [calib[i:i + batch_size] for i in range(0, len(calib), batch_size)]
    quantize_static(pre, out_path, _Reader(name, batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=per_channel,
                    calibrate_method=CalibrationMethod[method])
    os.remove(pre)
    return out_path


def op_counts(sess_path):
    """op types of the graph onnxruntime actually runs (after its optimizations)."""
    import onnx
    import onnxruntime as ort
    from collections import Counter
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        so.optimized_model_filepath = os.path.join(tmp, 'opt.onnx')
        ort.InferenceSession(sess_path, so, providers=['CPUExecutionProvider'])
        m = onnx.load(so.optimized_model_filepath)
    return dict(Counter(n.op_type for n in m.graph.node))


# ---------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------
def build_imagenet_model(name, seed=0):
    from gluoncv.model_zoo import get_model
    mx.random.seed(seed)
    np.random.seed(seed)
    net = get_model(name, pretrained=False)
    net.initialize(mx.init.Xavier(rnd_type='gaussian', factor_type='in', magnitude=2))
    net(mx.nd.zeros((1, 3, 224, 224)))                 # finish deferred initialization
    # give the BatchNorms non-trivial statistics so that folding is exercised
    for pname, p in net.collect_params().items():
        if pname.endswith('running_var'):
            p.set_data(mx.nd.array(np.random.uniform(0.5, 2.0, p.shape)))
        elif pname.endswith('running_mean'):
            p.set_data(mx.nd.array(np.random.uniform(-0.2, 0.2, p.shape)))
        elif pname.endswith('gamma'):
            p.set_data(mx.nd.array(np.random.uniform(0.5, 1.5, p.shape)))
        elif pname.endswith('beta'):
            p.set_data(mx.nd.array(np.random.uniform(-0.2, 0.2, p.shape)))
    return net


def calibration_images(n, shape, seed=0):
    """Smooth random images (low-frequency noise, normalized like ImageNet inputs)."""
    rs = np.random.RandomState(seed)
    c, h, w = shape
    low = rs.randn(n, c, h // 16, w // 16).astype(np.float32)
    img = np.repeat(np.repeat(low, 16, axis=2), 16, axis=3)
    img += 0.3 * rs.randn(n, c, h, w).astype(np.float32)
    return img.astype(np.float32)


def prepare_variants(name, workdir, n_calib=32, shape=(3, 224, 224), reuse=False):
    """Write the three ONNX files of one model; returns {variant: path} and sizes."""
    paths = {v: os.path.join(workdir, '%s.%s.onnx' % (name, v))
             for v in ('ort-fp32', 'ort-qstatic', 'gluonq-onnx')}
    if reuse and all(os.path.exists(p) for p in paths.values()):
        return paths, {'seconds': {}, 'bytes': {v: os.path.getsize(p)
                                                for v, p in paths.items()}}
    net = build_imagenet_model(name)
    calib = calibration_images(n_calib, shape)
    t = time.time()
    export_fp32(net, (1,) + shape, paths['ort-fp32'])
    t_fp32 = time.time() - t
    t = time.time()
    ort_quantize_static(paths['ort-fp32'], paths['ort-qstatic'], calib)
    t_qs = time.time() - t
    t = time.time()
    qnet = gluonq.quantize_net(net, calib, calib_mode='naive', progress=False)
    t_cal = time.time() - t
    t = time.time()
    export_onnx(qnet, paths['gluonq-onnx'], input_shape=(1,) + shape, overwrite=True,
                calib_data=calib, weight_dtype='int8')
    t_exp = time.time() - t
    info = {'seconds': {'fp32 export': t_fp32, 'quantize_static': t_qs,
                        'gluonq quantize_net': t_cal, 'gluonq export_onnx': t_exp},
            'bytes': {v: os.path.getsize(p) for v, p in paths.items()}}
    return paths, info


def time_interleaved(sessions, x, rounds=9, warmup=3):
    """Median seconds per run of each session, the variants interleaved round by round."""
    for _ in range(warmup):
        for s in sessions.values():
            run_session(s, x)
    times = {k: [] for k in sessions}
    order = list(sessions)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            run_session(sessions[k], x)
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}, times


def speed(models, batches, rounds, workdir, threads=2, show_ops=True, reuse=False):
    rows = []
    for name in models:
        paths, info = prepare_variants(name, workdir, reuse=reuse)
        print('# %s: sizes %s' % (name, {k: '%.1f MB' % (v / 1e6)
                                         for k, v in info['bytes'].items()}), flush=True)
        print('# %s: build seconds %s' % (name, {k: round(v, 1)
                                                  for k, v in info['seconds'].items()}))
        if show_ops:
            for v in ('ort-qstatic', 'gluonq-onnx'):
                print('# %s %s runs: %s' % (name, v, op_counts(paths[v])))
        sessions = {v: session(p, threads) for v, p in paths.items()}
        for bs in batches:
            x = calibration_images(bs, (3, 224, 224), seed=100 + bs)
            load0 = os.getloadavg()[0]
            # the two int8 models interleaved with each other; the (much slower) fp32
            # model timed on its own afterwards: running it between them was seen to
            # slow whichever int8 model came next
            int8 = {v: sessions[v] for v in ('ort-qstatic', 'gluonq-onnx')}
            med, times = time_interleaved(int8, x, rounds=rounds)
            med_f, _ = time_interleaved({'ort-fp32': sessions['ort-fp32']}, x,
                                        rounds=max(5, rounds // 4), warmup=1)
            med.update(med_f)
            load1 = os.getloadavg()[0]
            row = {'model': name, 'batch': bs, 'rounds': rounds, 'load_before': load0,
                   'load_after': load1}
            for v, s in med.items():
                row[v + ' ms'] = 1e3 * s
                row[v + ' img/s'] = bs / s
            row['gluonq/qstatic'] = med['ort-qstatic'] / med['gluonq-onnx']
            # the same ratio per round (the two ran back to back), median over rounds:
            # less sensitive to load that changes during the measurement
            row['gluonq/qstatic paired'] = float(np.median(
                np.array(times['ort-qstatic']) / np.array(times['gluonq-onnx'])))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def print_speed_table(rows):
    print('\n| model | batch | ORT fp32 img/s | ORT quantize_static img/s | gluonq ONNX img/s '
          '| gluonq / quantize_static (medians) | same, paired per round '
          '| load avg (before/after) |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print('| %s | %d | %.1f | %.1f | %.1f | %.2fx | %.2fx | %.1f / %.1f |' % (
            r['model'], r['batch'], r['ort-fp32 img/s'], r['ort-qstatic img/s'],
            r['gluonq-onnx img/s'], r['gluonq/qstatic'], r['gluonq/qstatic paired'],
            r['load_before'], r['load_after']))


# ---------------------------------------------------------------------------------------
# accuracy on MNIST-trained nets
# ---------------------------------------------------------------------------------------
def trained_mnist_net(name, epochs, cache_dir, seed=0, verbose=False):
    """The MNIST-trained net ``name``: the float checkpoint shipped in data/models/ when
    there is one (examples/mnist_models.RECIPES), else trained here for ``epochs`` and
    cached in ``cache_dir``."""
    import mnist_models as M
    if name in M.RECIPES:
        return M.pretrained(name)
    net = M.build(name)
    path = os.path.join(cache_dir, 'mnist_%s_e%g_s%d.params' % (name, epochs, seed))
    if os.path.exists(path):
        net.load_parameters(path, ctx=mx.cpu())
    else:
        if epochs < 1:
            M.train(net, max_steps=int(epochs * 468), seed=seed, verbose=verbose,
                    eval_test=False)
        else:
            M.train(net, epochs=int(epochs), seed=seed, verbose=verbose, eval_test=False)
        net.save_parameters(path)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def batched(fn, x, bs=500):
    return np.concatenate([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def accuracy(models, epochs, n_calib, n_test, workdir, cache_dir):
    import mnist_models as M
    xcal, _ = M.load('train', n_calib)
    xte, yte = M.load('test', n_test)
    rows = []
    for name in models:
        net = trained_mnist_net(name, epochs, cache_dir)
        fp32 = batched(lambda b: net(mx.nd.array(b)).asnumpy(), xte)
        qnet = gluonq.quantize_net(net, xcal, calib_mode='naive', progress=False)
        # gluonq's reference int8 chain, eager (the integers the ONNX export reproduces)
        gq = batched(lambda b: qnet.forward_all(mx.nd.array(b))[qnet.spec['outputs'][0]]
                     .asnumpy(), xte)
        gpath = os.path.join(workdir, 'mnist_%s.gluonq.onnx' % name)
        export_onnx(qnet, gpath, input_shape=(1,) + xte.shape[1:], overwrite=True,
                    calib_data=xcal, weight_dtype='int8')
        gs = session(gpath)
        go = batched(lambda b: run_session(gs, b), xte)
        upath = os.path.join(workdir, 'mnist_%s.gluonq-u8u8.onnx' % name)
        export_onnx(qnet, upath, input_shape=(1,) + xte.shape[1:], overwrite=True,
                    calib_data=xcal, weight_dtype='uint8')
        gu = batched(lambda b: run_session(_cached_session(upath), b), xte)
        wpath = os.path.join(workdir, 'mnist_%s.gluonq-default.onnx' % name)
        export_onnx(qnet, wpath, input_shape=(1,) + xte.shape[1:], overwrite=True)
        gw = batched(lambda b: run_session(_cached_session(wpath), b), xte)
        fpath = os.path.join(workdir, 'mnist_%s.fp32.onnx' % name)
        export_fp32(net, (1,) + xte.shape[1:], fpath)
        qpath = os.path.join(workdir, 'mnist_%s.qstatic.onnx' % name)
        ort_quantize_static(fpath, qpath, xcal, batch_size=32)
        qs = batched(lambda b: run_session(_cached_session(qpath), b), xte)
        fo = batched(lambda b: run_session(_cached_session(fpath), b), xte)
        top1 = {k: 100.0 * float((v.argmax(1) == yte).mean())
                for k, v in (('fp32', fp32), ('ort-fp32', fo), ('gluonq-mxnet', gq),
                             ('gluonq-onnx', go), ('gluonq-onnx-u8u8', gu),
                             ('gluonq-onnx-default', gw), ('ort-qstatic', qs))}
        sq = {k: quant.sqnr_db(fp32, v) for k, v in (('gluonq-mxnet', gq), ('gluonq-onnx', go),
                                                      ('gluonq-onnx-u8u8', gu),
                                                      ('gluonq-onnx-default', gw),
                                                      ('ort-qstatic', qs))}
        row = {'model': name, 'top1': top1, 'sqnr_db': sq,
               'onnx_vs_mxnet_top1_agree': 100.0 * float((go.argmax(1) == gq.argmax(1)).mean()),
               'u8u8_vs_mxnet_top1_agree': 100.0 * float((gu.argmax(1) == gq.argmax(1)).mean()),
               'default_vs_mxnet_top1_agree':
                   100.0 * float((gw.argmax(1) == gq.argmax(1)).mean()),
               'n_test': int(len(yte)), 'n_calib': int(len(xcal))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


_SESSIONS = {}


def _cached_session(path):
    if path not in _SESSIONS:
        _SESSIONS[path] = session(path)
    return _SESSIONS[path]


def print_accuracy_table(rows):
    print("\nexport_onnx's default weight_dtype='auto' writes %s weights on this CPU"
          % gluonq.onnx.resolve_weight_dtype('auto'))
    print('\n| model | fp32 | gluonq MXNet int8 | gluonq ONNX default | ONNX U8S8 | ONNX U8U8 '
          '| ORT quantize_static | SQNR gluonq MXNet | SQNR ONNX default | SQNR U8S8 '
          '| SQNR U8U8 | SQNR ORT quantize_static '
          '| top-1 agreement with MXNet int8: default / U8S8 / U8U8 |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        t, s = r['top1'], r['sqnr_db']
        print('| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f dB | %.1f dB | %.1f dB '
              '| %.1f dB | %.1f dB | %.2f%% / %.2f%% / %.2f%% |'
              % (r['model'], t['fp32'], t['gluonq-mxnet'], t['gluonq-onnx-default'],
                 t['gluonq-onnx'], t['gluonq-onnx-u8u8'], t['ort-qstatic'],
                 s['gluonq-mxnet'], s['gluonq-onnx-default'], s['gluonq-onnx'],
                 s['gluonq-onnx-u8u8'], s['ort-qstatic'], r['default_vs_mxnet_top1_agree'],
                 r['onnx_vs_mxnet_top1_agree'], r['u8u8_vs_mxnet_top1_agree']))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('speed')
    s.add_argument('--models', default='resnet50_v1,mobilenetv2_1.0')
    s.add_argument('--batches', default='1,16')
    s.add_argument('--rounds', type=int, default=9)
    s.add_argument('--threads', type=int, default=2)
    s.add_argument('--workdir', default=None)
    s.add_argument('--reuse', action='store_true',
                   help='reuse the ONNX files already in --workdir')
    a = sub.add_parser('accuracy')
    a.add_argument('--models', default='resnet20,mobilenet0.25,mobilenetv2_0.25,incres')
    a.add_argument('--epochs', type=float, default=1)
    a.add_argument('--n-calib', type=int, default=512)
    a.add_argument('--n-test', type=int, default=10000)
    a.add_argument('--workdir', default=None)
    a.add_argument('--cache-dir', default=os.path.join(tempfile.gettempdir(), 'gluonq_mnist'))
    args = p.parse_args(argv)
    from bench_inference import workdir_for
    print('# load average at start: %.2f %.2f %.2f on %d cpus' % (os.getloadavg() +
                                                                   (os.cpu_count(),)))
    with workdir_for(args.workdir, prefix='gluonq_bench_onnx_') as workdir:
        if args.cmd == 'speed':
            rows = speed(args.models.split(','), [int(b) for b in args.batches.split(',')],
                         args.rounds, workdir, args.threads, reuse=args.reuse)
            print_speed_table(rows)
        else:
            os.makedirs(args.cache_dir, exist_ok=True)
            rows = accuracy(args.models.split(','), args.epochs, args.n_calib, args.n_test,
                            workdir, args.cache_dir)
            print_accuracy_table(rows)
    print('# load average at end: %.2f %.2f %.2f' % os.getloadavg())


if __name__ == '__main__':
    main()
