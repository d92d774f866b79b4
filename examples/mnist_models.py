"""MNIST models and a small deterministic trainer, shared by the demo, the examples, the
benchmarks and the tests.

* ``load(split)``: MNIST from the shipped ``data/mnist.npz``, zero-padded to 32x32 and
  normalized, as (N, 1, 32, 32) float32, labels float32.
* ``build(name)``: ``resnet20`` (gluoncv ``cifar_resnet20_v1``), ``mobilenet0.25`` and
  ``mobilenetv2_0.25`` (gluoncv, stem stride 1 for 32x32 input), ``incres`` (a hand-written
  network with concat branches and residual adds, written with ``F.relu``, ``+``,
  ``F.concat``, ``F.Pooling`` and ``F.flatten``) and ``tiny`` (for fast tests).
* ``train(net, ...)``: SGD with Nesterov momentum, warmup + cosine, hybridized, seeded.
* ``pretrained(name)``: the float checkpoints shipped in ``data/models/`` (``RECIPES``).
"""
import math
import os
import random
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'data', 'mnist.npz')
#: the float checkpoints gluonq ships (trained with RECIPES by examples/train_mnist.py)
MODELS_DIR = os.path.join(ROOT, 'data', 'models')
#: model -> (build kwargs, train kwargs) of the shipped checkpoints: SGD + Nesterov, warmup
#: + cosine, seed 0 (fp32 top-1 in data/models/README.md)
RECIPES = {
    'resnet20': ({}, dict(epochs=1, batch_size=128, lr=0.2, wd=5e-4)),
    'mobilenet0.25': ({}, dict(epochs=2, batch_size=128, lr=0.2, wd=5e-4)),
    'mobilenetv2_0.25': ({}, dict(epochs=2, batch_size=128, lr=0.1, wd=1e-4)),
    'incres': ({'width': 32}, dict(epochs=1, batch_size=128, lr=0.2, wd=5e-4)),
}
# statistics of MNIST zero-padded to 32x32 with pixels in [0, 1]
MEAN = 0.10004
STD = 0.27522

_CACHE = {}


def _raw():
    if 'raw' not in _CACHE:
        d = np.load(DATA)
        _CACHE['raw'] = {k: d[k] for k in ('x_train', 'y_train', 'x_test', 'y_test')}
    return _CACHE['raw']


def preprocess(x_uint8):
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) float32, zero-padded and normalized."""
    x = np.pad(x_uint8, ((0, 0), (2, 2), (2, 2))).astype(np.float32)
    return ((x / 255.0 - MEAN) / STD)[:, None, :, :]


def load(split, n=None):
    """``(x, y)`` of the 'train' or 'test' split (first ``n`` examples)."""
    r = _raw()
    x, y = r['x_' + split], r['y_' + split]
    if n is not None:
        x, y = x[:n], y[:n]
    return preprocess(x), y.astype(np.float32)


def train_set():
    return load('train')


def test_set():
    return load('test')


class ConvBN(nn.HybridBlock):
    """Conv2D (no bias) + BatchNorm; the activation is applied by the caller."""

    def __init__(self, channels, kernel, stride=1, pad=None, groups=1, **kw):
        super().__init__(**kw)
        if pad is None:
            pad = kernel // 2
        with self.name_scope():
            self.conv = nn.Conv2D(channels, kernel, stride, pad, groups=groups, use_bias=False)
            self.bn = nn.BatchNorm()

    def hybrid_forward(self, F, x):
        return self.bn(self.conv(x))


def _relu(F, act):
    """act='relu': F.relu (the requested style; NOT fused by MXNet's oneDNN quantize pass).
    act='Activation': F.Activation(act_type='relu') (fused into _sg_mkldnn_conv).
    Both are parameter-free, so the same .params load into either variant."""
    if act == 'relu':
        return F.relu
    return lambda z: F.Activation(z, act_type='relu')


class IncResBlock(nn.HybridBlock):
    """Inception-like block with residual add:
        a = relu(bn(conv1x1(x)))
        b = relu(bn(conv3x3(relu(bn(conv1x1(x))))))
        c = relu(bn(conv1x1(maxpool3x3/s1(x))))
        y = bn(conv1x1(concat(a, b, c)))
        out = relu(x + y)
    """

    def __init__(self, channels, act='relu', **kw):
        super().__init__(**kw)
        self._act = act
        with self.name_scope():
            self.b1 = ConvBN(channels // 2, 1)
            self.b2a = ConvBN(channels // 4, 1)
            self.b2b = ConvBN(channels // 2, 3)
            self.b3 = ConvBN(channels // 4, 1)
            self.proj = ConvBN(channels, 1)

    def hybrid_forward(self, F, x):
        relu = _relu(F, self._act)
        a = relu(self.b1(x))
        b = relu(self.b2b(relu(self.b2a(x))))
        c = F.Pooling(x, kernel=(3, 3), stride=(1, 1), pad=(1, 1), pool_type='max')
        c = relu(self.b3(c))
        y = self.proj(F.concat(a, b, c, dim=1))
        return relu(x + y)


class IncResNet(nn.HybridBlock):
    """Hand-written concat + residual network for 1x32x32 input.

    stem conv3x3(w) -> IncRes(w) -> maxpool2 -> conv3x3(2w) -> IncRes(2w) -> maxpool2
    -> conv3x3(4w) -> IncRes(4w) -> global avg pool -> flatten -> Dense(classes)."""

    def __init__(self, width=32, classes=10, act='relu', **kw):
        super().__init__(**kw)
        self._act = act
        with self.name_scope():
            self.stem = ConvBN(width, 3)
            self.blk1 = IncResBlock(width, act)
            self.up2 = ConvBN(2 * width, 3)
            self.blk2 = IncResBlock(2 * width, act)
            self.up3 = ConvBN(4 * width, 3)
            self.blk3 = IncResBlock(4 * width, act)
            self.fc = nn.Dense(classes)

    def hybrid_forward(self, F, x):
        relu = _relu(F, self._act)
        x = relu(self.stem(x))
        x = self.blk1(x)
        x = F.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type='max')
        x = relu(self.up2(x))
        x = self.blk2(x)
        x = F.Pooling(x, kernel=(2, 2), stride=(2, 2), pool_type='max')
        x = relu(self.up3(x))
        x = self.blk3(x)
        x = F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type='avg')
        return self.fc(F.flatten(x))


class TinyNet(nn.HybridBlock):
    """Very small conv net for unit tests: conv(c)-bn-relu-pool, conv(2c)-bn-relu-pool,
    conv(2c)-bn-relu, flatten (or global avg pool with head='gap'), dense. With the flatten
    head 150 steps of batch 64 reach about 97%."""

    def __init__(self, width=8, classes=10, act='relu', head='flatten', **kw):
        super().__init__(**kw)
        self._act = act
        self._head = head
        with self.name_scope():
            self.c1 = ConvBN(width, 3)
            self.c2 = ConvBN(2 * width, 3)
            self.c3 = ConvBN(2 * width, 3)
            self.fc = nn.Dense(classes)

    def hybrid_forward(self, F, x):
        relu = _relu(F, self._act)
        x = F.Pooling(relu(self.c1(x)), kernel=(2, 2), stride=(2, 2), pool_type='max')
        x = F.Pooling(relu(self.c2(x)), kernel=(2, 2), stride=(2, 2), pool_type='max')
        x = relu(self.c3(x))
        if self._head == 'gap':
            x = F.Pooling(x, kernel=(1, 1), global_pool=True, pool_type='avg')
        return self.fc(F.flatten(x))


def _set_stride(conv, stride):
    """Change the stride of a (not yet hybridized) gluon Conv2D in place."""
    assert isinstance(conv, nn.Conv2D), conv
    conv._kwargs['stride'] = (stride, stride)


def build(name, **kw):
    """A fresh (uninitialized) model by name; see the module docstring."""
    from gluoncv.model_zoo import get_model
    if name == 'resnet20':
        return get_model('cifar_resnet20_v1', classes=10, pretrained=False)
    if name in ('mobilenetv2_0.25', 'mobilenet0.25'):
        # stem_stride=1: the first (stem) conv of the ImageNet model gets stride 1, so a
        # 32x32 input ends in a 2x2 map instead of 1x1 (total downsampling 16x).
        stem_stride = kw.get('stem_stride', 1)
        net = get_model(name, classes=10, pretrained=False)
        if stem_stride != 2:
            _set_stride(net.features[0], stem_stride)
        return net
    if name == 'incres':
        return IncResNet(width=kw.get('width', 32), act=kw.get('act', 'relu'))
    if name == 'tiny':
        return TinyNet(width=kw.get('width', 8), act=kw.get('act', 'relu'),
                       head=kw.get('head', 'flatten'))
    raise ValueError(name)


# ----------------------------------------------------------------------------
# Training / evaluation
# ----------------------------------------------------------------------------
def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def evaluate(net, x, y, batch_size=500):
    """Top-1 accuracy (%) and (N, classes) float32 logits."""
    outs = []
    for i in range(0, len(x), batch_size):
        outs.append(net(nd.array(x[i:i + batch_size])).asnumpy())
    logits = np.concatenate(outs)
    acc = 100.0 * float((logits.argmax(1) == y).mean())
    return acc, logits


def lr_at(step, total, lr, warmup_frac):
    """Linear warmup for warmup_frac of the steps, then cosine decay to 0."""
    w = max(1, int(round(warmup_frac * total)))
    if step < w:
        return lr * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return lr * 0.5 * (1.0 + math.cos(math.pi * p))


def train(net, epochs=1, batch_size=128, lr=0.1, wd=5e-4, momentum=0.9, seed=0,
          warmup_frac=0.1, n_train=None, max_steps=None, optimizer='nag',
          init=None, label_smoothing=0.0, log_every=100, eval_test=True, verbose=True):
    """Train `net` in place on MNIST (padded to 32x32, normalized), hybridized, CPU.

    Schedule: SGD with Nesterov momentum (optimizer='nag') or 'adam'; linear warmup over
    `warmup_frac` of all steps to `lr`, then cosine to 0 per step. wd is applied to all
    parameters (gluon default). Data order: np.random.RandomState(seed).permutation per
    epoch over the first `n_train` training images. `max_steps` caps total steps (the
    schedule is laid out over the capped count). Returns a dict of statistics."""
    seed_all(seed)
    ctx = mx.cpu()
    xtr, ytr = train_set()
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    n = len(xtr)
    steps_per_epoch = n // batch_size          # drop last partial batch
    total = steps_per_epoch * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    net.initialize(init or mx.init.Xavier(rnd_type='gaussian', factor_type='in', magnitude=2),
                   ctx=ctx)
    net.hybridize(static_alloc=True, static_shape=True)
    opt_kw = {'learning_rate': lr, 'wd': wd}
    if optimizer in ('nag', 'sgd'):
        opt_kw['momentum'] = momentum
    trainer = gluon.Trainer(net.collect_params(), optimizer, opt_kw)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=label_smoothing == 0.0)
    rs = np.random.RandomState(seed)
    step = 0
    t0 = time.time()
    c0 = time.process_time()
    epoch_times = []
    run_loss = None
    done = False
    for ep in range(epochs):
        te = time.time()
        perm = rs.permutation(n)
        for b in range(steps_per_epoch):
            if step >= total:
                done = True
                break
            idx = perm[b * batch_size:(b + 1) * batch_size]
            data = nd.array(xtr[idx])
            lab = ytr[idx]
            if label_smoothing:
                oh = np.full((len(idx), 10), label_smoothing / 10, np.float32)
                oh[np.arange(len(idx)), lab.astype(int)] += 1.0 - label_smoothing
                label = nd.array(oh)
            else:
                label = nd.array(lab)
            trainer.set_learning_rate(lr_at(step, total, lr, warmup_frac))
            with autograd.record():
                loss = loss_fn(net(data), label)
            loss.backward()
            trainer.step(batch_size)
            step += 1
            if log_every and step % log_every == 0:
                lv = float(loss.mean().asscalar())
                run_loss = lv if run_loss is None else 0.9 * run_loss + 0.1 * lv
                if verbose:
                    print('  step %d/%d loss %.4f (ema %.4f) %.1fs' % (
                        step, total, lv, run_loss, time.time() - t0), flush=True)
        nd.waitall()
        epoch_times.append(time.time() - te)
        if done:
            break
    train_time = time.time() - t0
    stats = {'steps': step, 'images_seen': step * batch_size, 'train_time_s': train_time,
             'train_cpu_s': time.process_time() - c0, 'epoch_times_s': epoch_times,
             'loadavg_end': os.getloadavg()[0]}
    if eval_test:
        te = time.time()
        acc, _ = evaluate(net, *test_set())
        stats['test_top1'] = acc
        stats['eval_time_s'] = time.time() - te
    if verbose:
        print('  done: %s' % {k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in stats.items()}, flush=True)
    return stats


def checkpoint(name):
    """Path of the shipped float checkpoint of ``name`` (a key of :data:`RECIPES`)."""
    return os.path.join(MODELS_DIR, '%s.params' % name)


def pretrained(name):
    """The shipped float model ``name`` trained on MNIST (hybridized, on the CPU)."""
    path = checkpoint(name)
    if not os.path.exists(path):
        raise FileNotFoundError('%s: no shipped checkpoint for %r; train it with '
                                'python examples/train_mnist.py --models %s'
                                % (path, name, name))
    net = build(name, **RECIPES[name][0])
    net.load_parameters(path, ctx=mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def n_params(net):
    return int(sum(np.prod(p.shape) for p in net.collect_params().values()
                   if p.grad_req != 'null'))
