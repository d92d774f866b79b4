"""Speed of a BERT-like encoder in int8: MXNet fp32, gluonq's MXNet fast path, onnxruntime
fp32, onnxruntime on gluonq's QDQ export and (if it imports) OpenVINO on it, in one run.

The encoder has random weights (seeded) and takes float token embeddings of shape
``(batch, seq, hidden)``: post-norm BERT layers of multi-head self-attention (one Dense for
q, k and v, heads split with reshape/transpose/split, ``batch_dot``), LayerNorm and a GELU
feed-forward block. gluonq converts it with 32 random calibration sequences; every Dense
and ``batch_dot`` becomes int8. Variants:

* ``mxnet-fp32``   the float network, hybridized (static_alloc, static_shape);
* ``gluonq``       ``qnet.hybridize()``: gluonq's fast path in MXNet;
* ``ort-fp32``     onnxruntime on the float network (written by gluonq's exporter with every
                   op left float: ``quantize_net(..., exclude=['*'])``, whose float ops go
                   through MXNet's own ONNX converters or gluonq's);
* ``ort-gluonq``   onnxruntime on ``gluonq.export_onnx`` of the int8 network;
* ``ov-gluonq``    OpenVINO on ``gluonq.export_openvino`` of it (skipped without openvino).

Timing: one process, ``--threads`` threads for every runtime (onnxruntime's idle threads do
not spin, MXNet's OpenMP waits passively), the variants in turns (one untimed and three
timed calls each, the order rotated every round) until each has ``--runs`` timed calls;
sequences/s is the median. The bars of issue 11: ort-gluonq >= 1.5x ort-fp32 and gluonq >=
1.0x mxnet-fp32.

    python benchmarks/bench_transformer.py                        # seq 128, batch 8
    python benchmarks/bench_transformer.py --layers 1 --seq 32 --batch 2 --runs 3   # quick
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time


def build_encoder(hidden, layers, heads, ffn):
    from mxnet.gluon import nn

    class Layer(nn.HybridBlock):
        def __init__(self, **kw):
            super().__init__(**kw)
            self._heads = heads
            self._scale = float((hidden // heads) ** -0.5)
            with self.name_scope():
                self.qkv = nn.Dense(3 * hidden, flatten=False, in_units=hidden)
                self.proj = nn.Dense(hidden, flatten=False, in_units=hidden)
                self.ln1 = nn.LayerNorm(in_channels=hidden)
                self.fc1 = nn.Dense(ffn, flatten=False, in_units=hidden)
                self.fc2 = nn.Dense(hidden, flatten=False, in_units=ffn)
                self.ln2 = nn.LayerNorm(in_channels=hidden)

        def hybrid_forward(self, F, x):
            h = self._heads
            qkv = F.transpose(F.reshape(self.qkv(x), (0, 0, 3 * h, -1)), (0, 2, 1, 3))
            q, k, v = (F.reshape(t, (-3, 0, 0)) for t in
                       F.split(qkv, num_outputs=3, axis=1))
            att = F.softmax(F.batch_dot(q, k, transpose_b=True) * self._scale, axis=-1)
            y = F.reshape(F.batch_dot(att, v), (-4, -1, h, 0, 0))
            y = F.reshape(F.transpose(y, (0, 2, 1, 3)), (0, 0, -1))
            x = self.ln1(x + self.proj(y))
            return self.ln2(x + self.fc2(F.LeakyReLU(self.fc1(x), act_type='gelu')))

    net = nn.HybridSequential()
    for _ in range(layers):
        net.add(Layer())
    return net


def ort_session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    sess = ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def ov_model(path, threads):
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(path, 'CPU', {'INFERENCE_NUM_THREADS': threads})
    req = compiled.create_infer_request()
    return lambda x: req.infer([x])[compiled.outputs[0]]


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--hidden', type=int, default=256)
    p.add_argument('--layers', type=int, default=4)
    p.add_argument('--heads', type=int, default=4)
    p.add_argument('--ffn', type=int, default=1024)
    p.add_argument('--seq', type=int, default=128)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--runs', type=int, default=15, help='timed calls per variant')
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', str(args.threads))
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    os.environ.setdefault('MXNET_SUBGRAPH_VERBOSE', '0')
    import mxnet as mx
    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gluonq
    import gluonq.lower
    import gluonq.onnx

    mx.random.seed(0)
    rng = np.random.RandomState(0)
    net = build_encoder(args.hidden, args.layers, args.heads, args.ffn)
    net.initialize(mx.init.Xavier())
    shape = (args.batch, args.seq, args.hidden)
    calib = rng.normal(0, 1, (32,) + shape[1:]).astype(np.float32)
    x = rng.normal(0, 1, shape).astype(np.float32)
    t0 = time.time()
    qnet = gluonq.quantize_net(net, calib, progress=False)
    layers = [r for r in qnet.report if r['op'] in ('FullyConnected', 'batch_dot')]
    n_int8 = sum(r['kind'].startswith('int8') for r in layers)
    print('encoder: %d layers, hidden %d, %d heads, ffn %d; input %s; %d of %d Dense/batch_dot '
          'int8; converted in %.1f s' % (args.layers, args.hidden, args.heads, args.ffn,
                                         shape, n_int8, len(layers), time.time() - t0))
    print('oneDNN int8 exact (VNNI): %s, onnxruntime U8S8 exact: %s'
          % (gluonq.lower.int8_kernels_exact(), gluonq.onnx.ort_u8s8_exact()))
    net.hybridize(static_alloc=True, static_shape=True)
    qnet.hybridize()
    work = tempfile.mkdtemp(prefix='bench_transformer_')
    try:
        run = {'mxnet-fp32': lambda b: net(mx.nd.array(b)).asnumpy(),
               'gluonq': lambda b: qnet(mx.nd.array(b)).asnumpy()}
        fnet = gluonq.quantize_net(net, calib[:2], exclude=['*'], progress=False)
        gluonq.export_onnx(fnet, os.path.join(work, 'fp32.onnx'), input_shape=shape)
        gluonq.export_onnx(qnet, os.path.join(work, 'int8.onnx'), input_shape=shape)
        run['ort-fp32'] = ort_session(os.path.join(work, 'fp32.onnx'), args.threads)
        run['ort-gluonq'] = ort_session(os.path.join(work, 'int8.onnx'), args.threads)
        try:
            import openvino  # noqa: F401
        except ImportError:
            print('openvino not installed: ov-gluonq skipped')
        else:
            xml, _ = gluonq.export_openvino(qnet, os.path.join(work, 'int8.xml'),
                                            input_shape=shape)
            run['ov-gluonq'] = ov_model(xml, args.threads)
        ref = run['mxnet-fp32'](x)
        for k, fn in run.items():
            y = np.asarray(fn(x), np.float64)
            sqnr = 10 * np.log10((ref ** 2).sum() / max(((y - ref) ** 2).sum(), 1e-30))
            print('  %-11s output SQNR against mxnet-fp32: %6.1f dB' % (k, sqnr))
        names = list(run)
        times = {k: [] for k in names}
        rnd = 0
        while min(len(v) for v in times.values()) < args.runs:
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for k in order:
                run[k](x)
                for _ in range(3):
                    t = time.perf_counter()
                    run[k](x)
                    times[k].append(time.perf_counter() - t)
            rnd += 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = {k: args.batch / _median(v) for k, v in times.items()}
    print('\n%-11s %12s %10s' % ('variant', 'seq/s', 'ms/batch'))
    for k in names:
        print('%-11s %12.1f %10.1f' % (k, rate[k], 1000 * args.batch / rate[k]))
    print('\nort-gluonq / ort-fp32:  %.2fx (bar 1.5x)' % (rate['ort-gluonq'] / rate['ort-fp32']))
    print('gluonq / mxnet-fp32:    %.2fx (bar 1.0x)' % (rate['gluonq'] / rate['mxnet-fp32']))
    if 'ov-gluonq' in rate:
        print('ov-gluonq / ort-fp32:   %.2fx' % (rate['ov-gluonq'] / rate['ort-fp32']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
