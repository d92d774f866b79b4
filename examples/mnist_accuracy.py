"""gluonq vs MXNet's built-in quantizer on MNIST-trained networks, side by side.

For each float model shipped in data/models/ (``examples/train_mnist.py`` trains them), each
calibration mode and weight granularity: fp32 top-1 on the 10k test set, int8 top-1 and
drop, and logit SQNR (int8 logits against fp32, dB) for gluonq and for
``mxnet.contrib.quantization.quantize_net_v2`` with the same 512 calibration images and the
same mode (the built-in has only 'naive' and 'entropy').

    python examples/mnist_accuracy.py                       # every model and mode
    python examples/mnist_accuracy.py --models resnet20 --modes naive entropy
"""
import argparse
import logging
import os
import sys

import mxnet as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist_models as M  # noqa: E402

import gluonq  # noqa: E402
from gluonq import quant  # noqa: E402

MODES = ['naive', 'entropy', 'percentile', 'mse']
BUILTIN_MODES = ('naive', 'entropy')


def builtin(net, xc, yc, mode, per_channel):
    from mxnet.contrib.quantization import quantize_net_v2
    dl = mx.gluon.data.DataLoader(mx.gluon.data.ArrayDataset(mx.nd.array(xc),
                                                             mx.nd.array(yc)), batch_size=64)
    q = quantize_net_v2(net, quantized_dtype='auto', quantize_mode='full',
                        quantize_granularity='channel-wise' if per_channel else 'tensor-wise',
                        calib_mode=mode, calib_data=dl, num_calib_examples=len(xc),
                        ctx=mx.cpu(), logger=logging.getLogger('silent'))
    q.hybridize(static_alloc=True, static_shape=True)
    return q


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', default=list(M.RECIPES), choices=list(M.RECIPES))
    p.add_argument('--modes', nargs='+', default=MODES, choices=MODES)
    p.add_argument('--calib', type=int, default=512, help='calibration images')
    p.add_argument('--no-builtin', action='store_true', help='skip MXNet built-in rows')
    args = p.parse_args(argv)
    logging.getLogger('gluonq').setLevel(logging.ERROR)
    xc, yc = M.load('train', args.calib)
    xt, yt = M.test_set()
    header = ('%-17s %-10s %-7s %6s | %7s %6s %6s | %7s %6s %6s' % (
        'model', 'mode', 'weights', 'fp32', 'gluonq', 'drop', 'dB', 'builtin', 'drop', 'dB'))
    lines = [header, '-' * len(header)]
    print(header, flush=True)
    for name in args.models:
        net = M.pretrained(name)
        acc_f, lf = M.evaluate(net, xt, yt)
        for mode in args.modes:
            for pc in (True, False):
                q = gluonq.quantize_net(net, xc, calib_mode=mode, per_channel=pc,
                                        progress=False)
                q.hybridize()
                acc_q, lq = M.evaluate(q, xt, yt)
                row = '%-17s %-10s %-7s %6.2f | %7.2f %+6.2f %6.1f |' % (
                    name, mode, 'channel' if pc else 'tensor', acc_f, acc_q, acc_f - acc_q,
                    quant.sqnr_db(lf, lq))
                if mode in BUILTIN_MODES and not args.no_builtin:
                    b = builtin(M.pretrained(name), xc, yc, mode, pc)
                    acc_b, lb = M.evaluate(b, xt, yt)
                    row += ' %7.2f %+6.2f %6.1f' % (acc_b, acc_f - acc_b, quant.sqnr_db(lf, lb))
                else:
                    row += ' %7s %6s %6s' % ('n/a', '', '')
                warn = len(q.spec['calibration']['warnings'])
                if warn:
                    row += '   (%d ranges overruled by the guard)' % warn
                print(row, flush=True)
                lines.append(row)
    return lines


if __name__ == '__main__':
    main()
