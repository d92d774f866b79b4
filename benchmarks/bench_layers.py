"""One conv and one dense layer: int8 against fp32 -- speed, error against its bound, size.

For each layer (a ResNet 3x3 conv, 64 -> 64 channels on 56x56, and a 2048 -> 1000 classifier)
on random weights and inputs:

* speed (ms per call, median of ``--runs`` interleaved calls, one process): the fp32 layer
  hybridized; ``QuantizedConv2D`` / ``QuantizedDense`` hybridized (gluonq's reference
  chain: quantize, exact int32 accumulator, requantize/dequantize); the same layer
  converted by ``gluonq.quantize_net`` and run on the fast path (``hybridize()``, oneDNN's
  fused int8 kernel); MXNet's built-in ``quantize_net_v2``. Float in, float out for all;
* error: the largest ``|int8 - fp32|`` of the block over the inputs, and its ratio to the
  bound derived from the scales (``tests/reference.error_bound``: half a step of the input
  times ``sum |w|`` plus half a weight step times ``sum |x|``, plus the bias rounding);
* size: ``save_parameters`` of the quantized block against its float twin.

    python benchmarks/bench_layers.py [--batch 16] [--runs 30]
"""
import argparse
import logging
import os
import sys
import tempfile
import time
import warnings

import mxnet as mx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

import gluonq                                        # noqa: E402
from gluonq import lower, nn as qnn                  # noqa: E402

import reference as ref                              # noqa: E402


def layers(batch):
    """(name, float layer, quantized class, input, kind, geometry)"""
    r = np.random.RandomState(0)
    conv = mx.gluon.nn.Conv2D(64, 3, padding=1, in_channels=64)
    conv.initialize(mx.init.Xavier(magnitude=2))
    dense = mx.gluon.nn.Dense(1000, in_units=2048)
    dense.initialize(mx.init.Xavier(magnitude=2))
    for blk in (conv, dense):
        blk.bias.set_data(mx.nd.array(r.uniform(-0.1, 0.1, blk.bias.shape)))
    xc = r.uniform(0, 3.0, (batch, 64, 56, 56)).astype(np.float32)      # after a ReLU
    xd = r.uniform(0, 3.0, (batch, 2048)).astype(np.float32)
    geo = {'stride': (1, 1), 'pad': (1, 1), 'dilate': (1, 1), 'groups': 1}
    return [('conv3x3 64->64 @56x56', conv, qnn.QuantizedConv2D, xc, 'conv', geo),
            ('dense 2048->1000', dense, qnn.QuantizedDense, xd, 'dense', None)]


def builtin(layer, x):
    from mxnet.contrib.quantization import quantize_net_v2
    net = mx.gluon.nn.HybridSequential()
    net.add(layer)
    net.hybridize()
    dl = mx.gluon.data.DataLoader(mx.gluon.data.ArrayDataset(mx.nd.array(x),
                                                             mx.nd.zeros(len(x))),
                                  batch_size=len(x))
    q = quantize_net_v2(net, quantized_dtype='auto', quantize_mode='full',
                        calib_mode='naive', calib_data=dl, num_calib_examples=len(x),
                        ctx=mx.cpu(), logger=logging.getLogger('quiet'))
    q.hybridize(static_alloc=True, static_shape=True)
    return q


def file_size(block, folder, name):
    path = os.path.join(folder, name + '.params')
    block.save_parameters(path)
    return os.path.getsize(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--runs', type=int, default=30)
    args = p.parse_args(argv)
    warnings.simplefilter('ignore')
    print('int8 kernels exact on this CPU (VNNI): %s; %s threads' % (
        lower.int8_kernels_exact(), os.environ.get('OMP_NUM_THREADS', 'all')))
    with tempfile.TemporaryDirectory(prefix='gluonq-layers-') as tmp:
        for name, flayer, qcls, x, kind, geo in layers(args.batch):
            run_layer(args.batch, args.runs, tmp, name, flayer, qcls, x, kind, geo)
    return 0


def run_layer(batch, runs, tmp, name, flayer, qcls, x, kind, geo):
    """Time one layer's variants, check its error against the bound, compare sizes."""
    lo = 0.0
    hi = float(x.max())
    qblock = qcls.from_float(flayer, in_range=(lo, hi))
    net = mx.gluon.nn.HybridSequential()
    net.add(flayer)
    fast = gluonq.quantize_net(net, x, progress=False)
    fast.hybridize()
    flayer.hybridize(static_alloc=True, static_shape=True)
    bi = builtin(flayer, x)
    qblock.hybridize(static_alloc=True, static_shape=True)
    xn = mx.nd.array(x)
    fns = {'fp32': flayer, 'int8 block': qblock, 'int8 fast path': fast,
           'MXNet built-in int8': bi}
    times = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f(xn).wait_to_read()
    for r in range(runs):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            fns[k](xn).wait_to_read()
            times[k].append(time.perf_counter() - t)
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    yf = flayer(xn).asnumpy()
    yq = qblock(xn).asnumpy()
    bound = ref.error_bound(flayer.weight.data().asnumpy(), x,
                            gluonq.quant.QParams('uint8', lo, hi),
                            qblock.weight_scale.data().asnumpy(), kind, geo,
                            bias_scale=True)
    err = np.abs(yq - yf)
    sizes = (file_size(flayer, tmp, 'f'), file_size(qblock, tmp, 'q'))
    print('\n%s, batch %d' % (name, batch))
    for k, v in ms.items():
        print('  %-20s %8.2f ms  (%.2fx fp32)' % (k, v, ms['fp32'] / v))
    print('  error: max |int8 - fp32| %.4g, mean %.3g; largest ratio to the derived bound '
          '%.3f (mean bound %.3g)' % (err.max(), err.mean(), (err / bound).max(),
                                     bound.mean()))
    print('  .params: fp32 %d bytes, int8 %d bytes (%.1f%%)' % (
        sizes[0], sizes[1], 100.0 * sizes[1] / sizes[0]))


if __name__ == '__main__':
    sys.exit(main())
