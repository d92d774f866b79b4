"""How often reading a network's weights right after a forward copies a wrong tensor.

MXNet's oneDNN convolutions reorder their weight arrays in place the first time they run
for inference (see :mod:`gluonq.arrays`). This script builds a gluoncv model, runs one
forward, and at once copies every parameter to numpy, either with ``asnumpy()`` (MXNet's
read) or with :func:`gluonq.arrays.to_numpy`; it then compares each copy with the value read
once the engine is idle. ``--load K`` starts K busy processes beside it, as on a CI machine
running two test workers on two cores.

    python benchmarks/weight_read_race.py --iterations 150 --load 2
"""
import argparse
import multiprocessing
import time

import mxnet as mx
import numpy as np
from gluoncv.model_zoo import get_model

from gluonq.arrays import to_numpy


def _busy(stop):
    while not stop.is_set():
        pass


def wrong_reads(name, size, read):
    """Names of the parameters whose copy, taken right after a forward, is wrong."""
    mx.random.seed(0)
    net = get_model(name, classes=10, pretrained=False)
    net.initialize(mx.init.MSRAPrelu())
    params = list(net.collect_params().values())
    net(mx.nd.zeros((1, 3, size, size)))              # the forward is still running...
    copies = [read(p.data()) for p in params]         # ...while the weights are read
    mx.nd.waitall()
    return [p.name for p, c in zip(params, copies) if not np.array_equal(c, p.data().asnumpy())]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='resnet18_v2')
    ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--iterations', type=int, default=100)
    ap.add_argument('--load', type=int, default=2, help='busy processes beside this one')
    args = ap.parse_args()
    stop = multiprocessing.Event()
    busy = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True)
            for _ in range(args.load)]
    for b in busy:
        b.start()
    readers = {'asnumpy': lambda a: a.asnumpy(), 'gluonq.arrays.to_numpy': to_numpy}
    counts = {k: [0, 0] for k in readers}               # wrong forwards, wrong tensors
    t0 = time.time()
    try:
        for i in range(args.iterations):
            for k in (sorted(readers) if i % 2 else sorted(readers, reverse=True)):
                bad = wrong_reads(args.model, args.size, readers[k])
                counts[k][0] += bool(bad)
                counts[k][1] += len(bad)
    finally:
        stop.set()
    print('%s %dx%d, %d iterations per reader, %d busy processes, %.0f s'
          % (args.model, args.size, args.size, args.iterations, args.load, time.time() - t0))
    for k, (runs, tensors) in counts.items():
        print('%-24s forwards with a wrong copy: %3d of %d (%d tensors)'
              % (k, runs, args.iterations, tensors))


if __name__ == '__main__':
    main()
