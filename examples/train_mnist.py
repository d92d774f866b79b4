"""Train the float MNIST models that gluonq ships in ``data/models/`` (the recipes in
``mnist_models.RECIPES``), and print each one's fp32 top-1 on the 10k test images and the
sha256 of its checkpoint.

The tests, the demo and the accuracy comparison start from these checkpoints, so that every
machine quantizes the same float weights (training results differ slightly from one CPU to
another). A checkpoint is written atomically and never replaces an existing one without
``--overwrite``.

    python examples/train_mnist.py                               # every recipe
    python examples/train_mnist.py --models resnet20 --out /tmp/models
"""
import argparse
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist_models as M  # noqa: E402


def sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--models', nargs='+', default=list(M.RECIPES), choices=list(M.RECIPES))
    p.add_argument('--out', default=M.MODELS_DIR, help='folder of the checkpoints')
    p.add_argument('--overwrite', action='store_true', help='replace existing checkpoints')
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    targets = {name: os.path.join(args.out, '%s.params' % name) for name in args.models}
    existing = [t for t in targets.values() if os.path.exists(t)]
    if existing and not args.overwrite:
        p.error('refusing to overwrite %s (pass --overwrite)' % ', '.join(existing))
    xt, yt = M.test_set()
    for name, path in targets.items():
        build_kw, train_kw = M.RECIPES[name]
        net = M.build(name, **build_kw)
        t = time.time()
        M.train(net, eval_test=False, verbose=False, **train_kw)
        seconds = time.time() - t
        acc, _ = M.evaluate(net, xt, yt)
        tmp = path + '.tmp'
        net.save_parameters(tmp)
        os.replace(tmp, path)
        print('%-17s fp32 top-1 %.2f%%  trained in %4.0f s  %s  sha256 %s'
              % (name, acc, seconds, os.path.relpath(path), sha256(path)), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
