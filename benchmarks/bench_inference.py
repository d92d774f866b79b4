"""Inference speed and memory of gluonq's int8 against fp32, MXNet's built-in int8,
onnxruntime and OpenVINO (each with its own quantizer's int8), in one run.

gluoncv models at 224x224 (random weights, the same for every variant):

* ``fp32``          hybridized (static_alloc, static_shape);
* ``fp32-mkldnn``   hybridized with ``backend='MKLDNN'`` (oneDNN graph fusion);
* ``builtin``       MXNet's ``quantize_net_v2`` (naive calibration, quantize_mode='full',
                    quantized_dtype='auto'), exported and reloaded with SymbolBlock.imports;
* ``gluonq``        ``gluonq.load_quantized`` + ``qnet.hybridize()`` (the fast path);
* ``fast-export``   ``gluonq.export.export_fast`` reloaded in stock MXNet (no gluonq import);
* ``int8w-export``  ``export_fast(int8_weights=True)``: int8 weights on disk, fused kernels;
* ``compact``       ``gluonq.export_compact`` (gluonq's reference chain, int8 on disk);
* ``ort-fp32``      onnxruntime on the float model (``mx.onnx.export_model``);
* ``ort-qstatic``   onnxruntime on its own ``quantize_static`` model (QDQ, U8S8, per channel,
                    MinMax, after ``quant_pre_process``; the same calibration images);
* ``gluonq-onnx``   onnxruntime on ``gluonq.export_onnx`` of the same gluonq network with
                    int8 weights (U8S8, the kernels ``quantize_static``'s model runs on);
* ``gluonq-onnx-u8u8`` the same with uint8 weights (U8U8): exact also without VNNI, and
                    what ``weight_dtype='auto'`` (the default) writes on such a CPU;
* ``ov-fp32``       OpenVINO on the float ONNX, in float32 (``INFERENCE_PRECISION_HINT``
                    f32: its default on CPUs with bf16 would run it in bf16);
* ``gluonq-ov``     OpenVINO on ``gluonq.export_openvino`` of the same gluonq network;
* ``ov-ort-qdq``    OpenVINO on ``ort-qstatic``'s QDQ model;
* ``ov-nncf``       OpenVINO on NNCF's own int8: ``nncf.quantize`` of the float ONNX with
                    the same calibration images (``pip install "gluonq[nncf]"``; without
                    nncf the variant is dropped, said so, and ``ov-ort-qdq`` is
                    OpenVINO's int8 anchor).

OpenVINO models are compiled for each batch size with a static input shape and
``INFERENCE_NUM_THREADS`` = ``--threads``.

Speed: the MXNet variants of a model are loaded side by side in one process, the
onnxruntime and OpenVINO ones in another (which imports neither MXNet nor gluonq), and
timed in rounds: in each round every variant takes one turn of one untimed and three timed
calls, in an order rotated by one place each round and reversed on odd rounds, so that
each variant runs in every position and after different variants, and the load of a
shared machine changes all of them alike (onnxruntime's threads do not spin while idle).
Images/s is the median over ``--runs`` timed calls, after ``--warmup`` calls. For each
gluonq variant the report gives its ratio to the fastest anchor of the same runtime and to
the fastest anchor overall (anchors: the fp32 variants, MXNet's built-in int8, onnxruntime's
``quantize_static``, OpenVINO on that and on NNCF's model), and whether the issue's bars
hold (``gluonq-ov`` >= ``ov-nncf``, or ``ov-ort-qdq`` without nncf; ``gluonq-onnx`` >=
``ort-qstatic``), as the ratio of the medians and, paired round by round, as the median
of the rounds' ratios (:func:`paired_ratio`). Memory: each variant runs alone in its own
process (the MXNet exports without gluonq), and its peak RSS is reported. The lines before
the tables say whether this CPU runs int8 exactly (VNNI): without VNNI oneDNN and
onnxruntime saturate int16 pairs, and int8 gains less over fp32.

    python benchmarks/bench_inference.py                              # everything
    python benchmarks/bench_inference.py --models resnet50_v1,mobilenetv2_1.0 --batches 1,16
    python benchmarks/bench_inference.py --models mobilenetv2_1.0 --batches 1 --runs 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

MODELS = ['resnet18_v1', 'resnet50_v1', 'mobilenet1.0', 'mobilenetv2_1.0']
VARIANTS = ['fp32', 'fp32-mkldnn', 'builtin', 'gluonq', 'fast-export', 'int8w-export',
            'compact', 'ort-fp32', 'ort-qstatic', 'gluonq-onnx', 'gluonq-onnx-u8u8',
            'ov-fp32', 'gluonq-ov', 'ov-ort-qdq', 'ov-nncf']
ORT_VARIANTS = ('ort-fp32', 'ort-qstatic', 'gluonq-onnx', 'gluonq-onnx-u8u8')
OV_VARIANTS = ('ov-fp32', 'gluonq-ov', 'ov-ort-qdq', 'ov-nncf')
#: the runtime of each variant
RUNTIME = dict([(v, 'onnxruntime') for v in ORT_VARIANTS] +
               [(v, 'openvino') for v in OV_VARIANTS] +
               [(v, 'mxnet') for v in VARIANTS if v not in ORT_VARIANTS + OV_VARIANTS])
#: the variants gluonq is measured against: fp32 and each runtime's own int8
ANCHORS = ('fp32', 'fp32-mkldnn', 'builtin', 'ort-fp32', 'ort-qstatic', 'ov-fp32',
           'ov-ort-qdq', 'ov-nncf')
#: the issue's bars: (gluonq variant, [anchor, fallback anchor])
BARS = (('gluonq-ov', ['ov-nncf', 'ov-ort-qdq']), ('gluonq-onnx', ['ort-qstatic']))
#: the file each OpenVINO variant reads
OV_FILES = {'ov-fp32': 'ort-fp32.onnx', 'gluonq-ov': 'gluonq-ov.xml',
            'ov-ort-qdq': 'ort-qstatic.onnx', 'ov-nncf': 'ov-nncf.onnx'}
SHAPE = (3, 224, 224)


def session(path, threads=2):
    """An onnxruntime CPU session with full graph optimization. Its threads do not spin
    while idle: several sessions share the benchmark's process, and the spinning pools of
    the idle ones were seen to halve the speed of the one running."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])


def run_session(sess, x):
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def openvino_runner(path, threads=2, precision=None):
    """A callable running the OpenVINO model ``path`` on a numpy batch: compiled for the
    CPU once per input shape (static shapes, at the first call with that shape) with
    ``threads`` inference threads; ``precision`` sets ``INFERENCE_PRECISION_HINT``."""
    import openvino as ov
    core = ov.Core()
    config = {'INFERENCE_NUM_THREADS': threads}
    if precision:
        config['INFERENCE_PRECISION_HINT'] = precision
    requests = {}

    def run(x):
        if x.shape not in requests:
            model = core.read_model(path)
            model.reshape(list(x.shape))
            requests[x.shape] = core.compile_model(model, 'CPU', config).create_infer_request()
        req = requests[x.shape]
        req.infer({0: x})
        return req.get_output_tensor(0).data
    return run


# ---------------------------------------------------------------------------------------
# the float model and calibration data (identical in every process)
# ---------------------------------------------------------------------------------------
def build_float(model, workdir):
    """gluoncv ``model`` with the weights saved in ``workdir`` (created at the first call:
    Xavier weights, random BatchNorm statistics, seed 0)."""
    import mxnet as mx
    import numpy as np
    from gluoncv.model_zoo import get_model
    net = get_model(model, pretrained=False)
    path = os.path.join(workdir, model + '-float.params')
    if os.path.exists(path):
        net.load_parameters(path)
        return net
    mx.random.seed(0)
    r = np.random.RandomState(0)
    net.initialize(mx.init.Xavier(magnitude=2))
    net(mx.nd.zeros((1,) + SHAPE))
    for name, p in net.collect_params().items():
        n = p.shape[0]
        if name.endswith('running_mean'):
            p.set_data(mx.nd.array(r.normal(0, 0.1, n)))
        elif name.endswith('running_var'):
            p.set_data(mx.nd.array(r.uniform(0.5, 1.5, n)))
        elif name.endswith('gamma'):
            p.set_data(mx.nd.array(r.uniform(0.5, 1.5, n)))
        elif name.endswith('beta'):
            p.set_data(mx.nd.array(r.normal(0, 0.1, n)))
    net.save_parameters(path)
    return net


def calib_images(n):
    import numpy as np
    return np.random.RandomState(1).uniform(-2, 2, (n,) + SHAPE).astype(np.float32)


# ---------------------------------------------------------------------------------------
# subprocess jobs
# ---------------------------------------------------------------------------------------
def job_convert(model, which, workdir, n_calib):
    """Convert ``model`` (timed) and write what the variants load."""
    import logging
    import mxnet as mx
    net = build_float(model, workdir)
    net.hybridize(static_alloc=True, static_shape=True)
    x = calib_images(n_calib)
    p = lambda name: os.path.join(workdir, '%s-%s' % (model, name))   # noqa: E731
    out = {}
    if which == 'builtin':
        from mxnet.contrib.quantization import quantize_net_v2
        logging.disable(logging.CRITICAL)
        data = mx.gluon.data.DataLoader(mx.gluon.data.ArrayDataset(
            mx.nd.array(x), mx.nd.zeros(len(x))), batch_size=16)
        t = time.time()
        qnet = quantize_net_v2(net, quantized_dtype='auto', quantize_mode='full',
                               calib_mode='naive', calib_data=data, num_calib_examples=len(x),
                               ctx=mx.cpu())
        out['convert_s'] = time.time() - t
        qnet.hybridize(static_alloc=True, static_shape=True)
        qnet(mx.nd.array(x[:1])).wait_to_read()
        qnet.export(p('builtin'))
        return out
    import gluonq
    if which == 'onnx':
        import bench_onnx
        shape = (1,) + SHAPE
        bench_onnx.export_fp32(net, shape, p('ort-fp32.onnx'))
        t = time.time()
        bench_onnx.ort_quantize_static(p('ort-fp32.onnx'), p('ort-qstatic.onnx'), x)
        out['ort_quantize_s'] = time.time() - t
        t = time.time()
        qnet = gluonq.load_quantized(p('gluonq'))
        gluonq.export_onnx(qnet, p('gluonq-onnx.onnx'), input_shape=shape, overwrite=True,
                           calib_data=x, weight_dtype='int8')
        out['export_onnx_s'] = time.time() - t
        gluonq.export_onnx(qnet, p('gluonq-onnx-u8u8.onnx'), input_shape=shape,
                           overwrite=True, calib_data=x, weight_dtype='uint8')
        out['sizes'] = {v: os.path.getsize(p(v + '.onnx')) for v in ORT_VARIANTS}
        return out
    if which == 'openvino':
        from gluonq.openvino import export_openvino
        t = time.time()
        qnet = gluonq.load_quantized(p('gluonq'))
        export_openvino(qnet, p('gluonq-ov.xml'), input_shape=(1,) + SHAPE, overwrite=True,
                        calib_data=x)
        out['export_openvino_s'] = time.time() - t
        seconds = nncf_quantize(p('ort-fp32.onnx'), p('ov-nncf.onnx'), x)
        out['sizes'] = {'gluonq-ov': os.path.getsize(p('gluonq-ov.xml')) +
                        os.path.getsize(p('gluonq-ov.bin'))}
        if seconds is not None:
            out['nncf_quantize_s'] = seconds
            out['sizes']['ov-nncf'] = os.path.getsize(p('ov-nncf.onnx'))
        return out
    from gluonq import lower as L
    from gluonq.export import export_fast
    t = time.time()
    qnet = gluonq.quantize_net(net, x, calib_mode='naive', progress=False)
    out['convert_s'] = time.time() - t
    t = time.time()
    low = L.lower(qnet, exact=False)
    out['lower_s'] = time.time() - t
    out['lowering'] = low.counts()
    out['not_fused'] = [(r['step'], r['lowering'], r['reason']) for r in low.report
                        if r['lowering'] in ('int32', 'reference')]
    gluonq.save_quantized(qnet, p('gluonq'), overwrite=True)
    export_fast(qnet, p('fast'), overwrite=True)
    export_fast(qnet, p('int8w'), overwrite=True, int8_weights=True)
    gluonq.export_compact(qnet, p('compact'), overwrite=True)
    sizes = {}
    for name in ['fast', 'int8w', 'compact']:
        sizes[name] = os.path.getsize(p(name) + '-0000.params')
    sizes['fp32'] = os.path.getsize(os.path.join(workdir, model + '-float.params'))
    out['sizes'] = sizes
    return out


def nncf_quantize(fp32_path, out_path, x):
    """NNCF's own int8 QDQ model of the float ONNX (MinMax and FastBiasCorrection on the
    calibration images ``x``, one per batch). Returns its time in seconds, or None when
    nncf is not installed."""
    try:
        import nncf
    except ImportError:
        return None
    import onnx
    import logging
    logging.getLogger('nncf').setLevel(logging.ERROR)
    t = time.time()
    model = onnx.load(fp32_path)
    name = model.graph.input[0].name
    data = nncf.Dataset([{name: x[i:i + 1]} for i in range(len(x))])
    onnx.save(nncf.quantize(model, data, subset_size=len(x)), out_path)
    return time.time() - t


def load_variant(model, variant, workdir, threads):
    """A callable running ``variant`` on a numpy batch (waiting for the result).

    The MXNet exports are loaded with stock MXNet (``SymbolBlock.imports``); onnxruntime
    variants import neither MXNet nor gluonq when loaded first in their process.
    """
    if variant in ORT_VARIANTS:
        sess = session(os.path.join(workdir, '%s-%s.onnx' % (model, variant)), threads)
        return lambda x: run_session(sess, x)
    if variant in OV_VARIANTS:
        return openvino_runner(os.path.join(workdir, '%s-%s' % (model, OV_FILES[variant])),
                               threads, 'f32' if variant == 'ov-fp32' else None)
    import warnings
    import mxnet as mx
    warnings.simplefilter('ignore')
    p = lambda name: os.path.join(workdir, '%s-%s' % (model, name))   # noqa: E731
    static = dict(static_alloc=True, static_shape=True)
    if variant in ('fp32', 'fp32-mkldnn'):
        net = build_float(model, workdir)
        if variant == 'fp32':
            net.hybridize(**static)
        else:
            net.hybridize(backend='MKLDNN', **static)
    elif variant == 'gluonq':
        import gluonq
        net = gluonq.load_quantized(p('gluonq'))
        net.hybridize(**static)
    else:
        name = {'builtin': 'builtin', 'fast-export': 'fast', 'int8w-export': 'int8w',
                'compact': 'compact'}[variant]
        net = mx.gluon.SymbolBlock.imports(p(name) + '-symbol.json', ['data'],
                                           p(name) + '-0000.params')
        net.hybridize(**static)
    return lambda x: net(mx.nd.array(x)).wait_to_read()


def _batch(bs):
    import numpy as np
    return np.random.RandomState(2).uniform(-2, 2, (bs,) + SHAPE).astype(np.float32)


#: timed calls per turn of a variant in job_speed (after one untimed call)
TURN = 3


def round_order(variants, r):
    """The order of the variants in round ``r``: rotated by ``r`` places, reversed on odd
    rounds (so each variant runs in every position and after different variants)."""
    k = r % len(variants)
    order = list(variants[k:]) + list(variants[:k])
    return order[::-1] if r % 2 else order


def job_speed(model, variants, workdir, batches, runs, warmup, threads):
    """Images/s of ``variants`` loaded side by side in this process and timed in rounds:
    in each round every variant takes one turn, one untimed call (threads of the previous
    variant may still be busy) and ``TURN`` timed calls, in the order of
    :func:`round_order`, until each has ``runs`` timed calls, so that a change of load on
    the machine hits all of them alike. Returns {variant: {batch: images/s (median)}}."""
    import numpy as np
    if all(RUNTIME[v] != 'mxnet' for v in variants):
        for mod in ('mxnet', 'gluonq'):
            sys.modules[mod] = None
    fns = {v: load_variant(model, v, workdir, threads) for v in variants}
    res = {v: {} for v in variants}
    for bs in batches:
        x = _batch(bs)
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        times = {v: [] for v in variants}
        for r in range(-(-runs // TURN)):
            for v in round_order(variants, r):
                fns[v](x)
                for _ in range(TURN):
                    t = time.perf_counter()
                    fns[v](x)
                    times[v].append(time.perf_counter() - t)
        for v in variants:
            res[v][str(bs)] = bs / float(np.median(times[v]))
            # the median time of each round, for ratios paired round by round
            res[v]['rounds ' + str(bs)] = [float(np.median(times[v][i:i + TURN]))
                                           for i in range(0, len(times[v]), TURN)]
    return res


def paired_ratio(rounds_ours, rounds_anchor):
    """Median over the rounds of (anchor's time / ours) in the same round: a speed ratio
    that a change of the machine's speed between rounds moves far less than the ratio of
    the two medians does."""
    return _median([a / o for o, a in zip(rounds_ours, rounds_anchor)])


def job_memory(model, variant, workdir, batches, threads):
    """Peak RSS (MB) of a process that loads ``variant`` alone and runs each batch twice;
    the MXNet exports and onnxruntime variants run without gluonq."""
    if variant not in ('fp32', 'fp32-mkldnn', 'gluonq'):
        sys.modules['gluonq'] = None
    if RUNTIME[variant] != 'mxnet':
        sys.modules['mxnet'] = None
    fn = load_variant(model, variant, workdir, threads)
    for bs in batches:
        x = _batch(bs)
        fn(x)
        fn(x)
    return {'rss_mb': peak_rss_mb()}


def peak_rss_mb():
    """Peak resident memory of this process since it started (exec'd), in MB.

    ``VmHWM`` of /proc/self/status: ``ru_maxrss`` survives ``exec`` on Linux, so in a child
    it is never below the RSS of the parent it was forked from (the driver, which has
    imported MXNet and onnxruntime to probe the CPU)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:                                     # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_info():
    """Whether oneDNN's and onnxruntime's int8 kernels are exact here (VNNI)."""
    from gluonq.lower import int8_kernels_exact
    from gluonq.onnx import ort_u8s8_exact, resolve_weight_dtype
    return {'onednn_int8_exact': int8_kernels_exact(), 'ort_u8s8_exact': ort_u8s8_exact(),
            "export_onnx weight_dtype='auto' writes": resolve_weight_dtype('auto')}


def _sub(args_list, threads, timeout=3600):
    cmd = [sys.executable, os.path.abspath(__file__)] + args_list
    env = dict(os.environ)
    env['OMP_NUM_THREADS'] = str(threads)
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')      # as run.sh: idle threads sleep
    env['MXNET_SUBGRAPH_VERBOSE'] = '0'
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         timeout=timeout, check=False, universal_newlines=True)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError('%s failed:\n%s\n%s' % (' '.join(args_list), out.stdout[-2000:],
                                                out.stderr[-4000:]))


# ---------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--models', nargs='+', default=MODELS,
                    help='gluoncv models (space- or comma-separated)')
    ap.add_argument('--batches', nargs='+', default=['1', '16'],
                    help='batch sizes (space- or comma-separated)')
    ap.add_argument('--variants', nargs='+', default=VARIANTS,
                    help='variants to run (space- or comma-separated): %s' % ' '.join(VARIANTS))
    ap.add_argument('--runs', type=int, default=24,
                    help='timed calls per variant and batch, in turns of %d (default 24: '
                    'eight rounds, as many as the onnxruntime + OpenVINO variants, so that '
                    'each takes every position once)' % TURN)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--calib', type=int, default=64, help='calibration images')
    ap.add_argument('--threads', type=int, default=os.cpu_count() or 1,
                    help='threads per run (OMP_NUM_THREADS, onnxruntime intra-op '
                         'threads); default: every core')
    ap.add_argument('--workdir', help='keep models and exports here (default: temporary)')
    ap.add_argument('--_job', nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.models, args.variants = _split(args.models), _split(args.variants)
    args.batches = [int(b) for b in _split(args.batches)]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error('unknown variant(s) %s; choose from %s' % (', '.join(unknown),
                                                            ' '.join(VARIANTS)))
    if args._job:
        kind, model = args._job
        workdir = args.workdir
        if kind in ('builtin', 'gluonq', 'onnx', 'openvino'):
            r = job_convert(model, kind, workdir, args.calib)
        elif kind == 'speed':
            r = job_speed(model, args.variants, workdir, args.batches, args.runs,
                          args.warmup, args.threads)
        else:
            r = job_memory(model, kind[len('memory:'):], workdir, args.batches, args.threads)
        print('RESULT ' + json.dumps(r))
        return 0

    with workdir_for(args.workdir) as workdir:
        return run_all(args, list(args.variants), workdir)


def run_all(args, variants, workdir):
    """Every conversion, speed and memory job in subprocesses, then the report."""
    print('workdir %s; %d cores, %d thread(s) per run; load average at start %.2f'
          % (workdir, os.cpu_count(), args.threads, os.getloadavg()[0]), flush=True)
    print('int8 kernels exact on this CPU (VNNI): %s' % cpu_info(), flush=True)
    ovv = [v for v in variants if v in OV_VARIANTS]
    ort = [v for v in variants if v in ORT_VARIANTS]
    mxv = [v for v in variants if RUNTIME[v] == 'mxnet']
    converts = ['builtin', 'gluonq'] + (['onnx'] if ort or ovv else []) + \
        (['openvino'] if ovv else [])
    common = ['--workdir', workdir, '--calib', str(args.calib), '--threads',
              str(args.threads), '--batches'] + [str(b) for b in args.batches]

    def job(kind, model, threads, extra=()):
        return _sub(['--_job', kind, model] + common + list(extra), threads)

    conv, speed, memory, loads = {}, {}, {}, []
    for model in args.models:
        for which in converts:
            conv[(model, which)] = r = job(which, model, os.cpu_count() or 1)
            if which == 'openvino':
                print('exported %-16s openvino: gluonq export_openvino %.1f s, %s' % (
                    model, r['export_openvino_s'], 'nncf.quantize %.1f s'
                    % r['nncf_quantize_s'] if 'nncf_quantize_s' in r else
                    'NNCF IS NOT INSTALLED (pip install "gluonq[nncf]"): no ov-nncf; '
                    "OpenVINO's int8 anchor is ov-ort-qdq"), flush=True)
                if 'nncf_quantize_s' not in r and 'ov-nncf' in variants:
                    variants.remove('ov-nncf')
                    ovv.remove('ov-nncf')
                continue
            if which == 'onnx':
                print('exported %-16s onnx: quantize_static %.1f s, gluonq export_onnx '
                      '%.1f s' % (model, r['ort_quantize_s'], r['export_onnx_s']),
                      flush=True)
                continue
            print('converted %-16s %-8s in %6.1f s%s' % (
                model, which, r['convert_s'],
                '' if 'lower_s' not in r else '  (lowering %.1f s: %s; not fused: %s)'
                % (r['lower_s'], r['lowering'], r['not_fused'])), flush=True)
    for model in args.models:
        for group in (mxv, ort + ovv):
            if not group:
                continue
            speed.update({(model, v): r for v, r in job(
                'speed', model, args.threads,
                ['--runs', str(args.runs), '--warmup', str(args.warmup), '--variants'] +
                group).items()})
            loads.append(os.getloadavg()[0])
        print('%-16s %s  (load %.2f)' % (model, '  '.join(
            '%s %s' % (v, '/'.join('%.1f' % speed[(model, v)][str(b)]
                                   for b in args.batches)) for v in variants),
            loads[-1]), flush=True)
        for v in variants:
            memory[(model, v)] = job('memory:' + v, model, args.threads)['rss_mb']
    report(args, variants, conv, speed, memory, loads)
    return 0


@contextlib.contextmanager
def workdir_for(path, prefix='gluonq-bench-'):
    """The folder ``path`` (created if needed, kept afterwards), or a temporary one removed
    afterwards when ``path`` is None: every benchmark's ``--workdir``."""
    folder = path or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(folder, exist_ok=True)
    try:
        yield folder
    finally:
        if not path:
            shutil.rmtree(folder, ignore_errors=True)


def add_profile_args(ap):
    """The options of the per-layer profilers (ort_node_times.py, ov_layer_times.py)."""
    ap.add_argument('--models', nargs='+', default=['resnet50_v1', 'mobilenetv2_1.0'],
                    help='gluoncv models (space- or comma-separated)')
    ap.add_argument('--batch', type=int, default=1)
    ap.add_argument('--calls', type=int, default=30, help='profiled calls per model')
    ap.add_argument('--calib', type=int, default=16, help='calibration images')
    ap.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    ap.add_argument('--workdir', help="bench_inference.py's --workdir (default: temporary)")


def _split(values):
    """Command-line values given space- or comma-separated, as one list."""
    return [v for item in values for v in item.split(',') if v]


def _median(vals):
    vals = sorted(vals)
    n = len(vals)
    return vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])


def fastest(speeds, candidates):
    """(name, images/s) of the fastest of ``candidates`` measured in ``speeds``, or None."""
    have = [(speeds[c], c) for c in candidates if c in speeds]
    return None if not have else max(have)[::-1]


def report(args, variants, conv, speed, memory, loads):
    print('\n## images/s (median of %d calls per variant, timed in rotated rounds; MXNet '
          'variants in one process, onnxruntime and OpenVINO variants in another)\n'
          % args.runs)
    head = '| model | batch | ' + ' | '.join(variants) + ' |'
    print(head)
    print('|' + '---|' * (head.count('|') - 1))
    for model in args.models:
        for bs in args.batches:
            print('| %s | %d | %s |' % (model, bs, ' | '.join(
                '%.1f' % speed[(model, var)][str(bs)] for var in variants)))
    anchors = [a for a in ANCHORS if a in variants]
    ours = [v for v in variants if v not in ANCHORS]
    if anchors and ours:
        print('\n## gluonq against the fastest anchor (anchors: %s)\n' % ', '.join(anchors))
        print('| model | batch | variant | img/s | fastest anchor, same runtime | ratio '
              '| fastest anchor overall | ratio |')
        print('|---|---|---|---|---|---|---|---|')
        for model in args.models:
            for bs in args.batches:
                v = {var: speed[(model, var)][str(bs)] for var in variants}
                for var in ours:
                    same = fastest(v, [a for a in anchors if RUNTIME[a] == RUNTIME[var]])
                    best = fastest(v, anchors)
                    print('| %s | %d | %s | %.1f | %s | %s | %s %.1f | %.2f |' % (
                        model, bs, var, v[var], '-' if same is None else '%s %.1f' % same,
                        '-' if same is None else '%.2f' % (v[var] / same[1]), best[0],
                        best[1], v[var] / best[1]))
    bars = [(g, next(a for a in alts if a in variants)) for g, alts in BARS
            if g in variants and any(a in variants for a in alts)]
    if bars:
        print('\n## the issue\'s bars (>= 1.00x in every cell)\n')
        for g, a in bars:
            cells = [(model, bs, speed[(model, g)][str(bs)] / speed[(model, a)][str(bs)])
                     for model in args.models for bs in args.batches]
            note = ' (nncf not installed)' if g == 'gluonq-ov' and a != 'ov-nncf' else ''
            print('%s / %s%s: %s -> %s' % (g, a, note, ', '.join(
                '%s bs%d %.2f' % c for c in cells), 'MET' if all(c[2] >= 1.0 for c in cells)
                else 'NOT MET'))
            print('    paired round by round (median of %d rounds): %s' % (
                -(-args.runs // TURN), ', '.join('%s bs%d %.2f' % (
                    model, bs, paired_ratio(speed[(model, g)]['rounds %d' % bs],
                                            speed[(model, a)]['rounds %d' % bs]))
                    for model in args.models for bs in args.batches)))
    print('\n## peak memory (MB, max RSS of a process running only that variant)\n')
    print('| model | ' + ' | '.join(variants) + ' |')
    print('|' + '---|' * (len(variants) + 1))
    for model in args.models:
        print('| %s | %s |' % (model, ' | '.join('%.0f' % memory[(model, var)]
                                                 for var in variants)))
    print('\n## conversion (%d calibration images) and file sizes\n' % args.calib)
    for model in args.models:
        b, g = conv[(model, 'builtin')], conv[(model, 'gluonq')]
        s = g['sizes']
        print('%-16s builtin %.1f s, gluonq %.1f s (%.2fx; + %.1f s lowering at the first '
              'hybridized call); .params MB: fp32 %.1f, fast %.1f, int8w %.1f (%.0f%%), '
              'compact %.1f (%.0f%%)' % (
                  model, b['convert_s'], g['convert_s'], g['convert_s'] / b['convert_s'],
                  g['lower_s'], s['fp32'] / 1e6, s['fast'] / 1e6,
                  s['int8w'] / 1e6, 100.0 * s['int8w'] / s['fp32'], s['compact'] / 1e6,
                  100.0 * s['compact'] / s['fp32']))
        if (model, 'onnx') in conv:
            o = conv[(model, 'onnx')]['sizes']
            print('%-16s .onnx MB: fp32 %.1f, onnxruntime quantize_static %.1f, gluonq %.1f '
                  '(%.0f%%)' % (model, o['ort-fp32'] / 1e6, o['ort-qstatic'] / 1e6,
                                o['gluonq-onnx'] / 1e6,
                                100.0 * o['gluonq-onnx'] / o['ort-fp32']))
        if (model, 'openvino') in conv:
            o = conv[(model, 'openvino')]['sizes']
            print('%-16s OpenVINO MB: gluonq IR (.xml + .bin) %.1f%s' % (
                model, o['gluonq-ov'] / 1e6, '' if 'ov-nncf' not in o else
                ", NNCF's .onnx %.1f" % (o['ov-nncf'] / 1e6)))
    print('\nload average during the runs: min %.2f, median %.2f, max %.2f (%d cores)' % (
        min(loads), _median(loads), max(loads), os.cpu_count()))


if __name__ == '__main__':
    sys.exit(main())
