"""A small Vision Transformer for MNIST, its training recipe, and its int8 conversion.

The network (``ViT``) is what the transformer tests quantize: a patch convolution, learned
position embeddings, pre-norm encoder blocks of multi-head self-attention (one ``Dense``
for q, k and v, split into heads with ``reshape``/``transpose``/``split``, the two products
as ``batch_dot``) and a GELU MLP (``LeakyReLU(act_type='gelu')``), ``LayerNorm``, a mean
over the tokens and a ``Dense`` classifier.

    python examples/vit_mnist.py                 # train (RECIPE) and write data/models/vit.params
    python examples/vit_mnist.py --out /tmp/vit.params --quantize

``--quantize`` converts the trained network with ``gluonq.quantize_net`` (512 calibration
images) and prints fp32 and int8 top-1 on the 10k test images and the logit SQNR.
"""
import argparse
import hashlib
import os
import sys
import time

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist_models as M  # noqa: E402

#: architecture and training recipe of the shipped checkpoint data/models/vit.params
#: (Adam, warmup + cosine, seed 0; fp32 top-1 in data/models/README.md)
ARCH = dict(dim=64, depth=2, heads=4, mlp=128, patch=8)
RECIPE = dict(epochs=3, batch_size=128, lr=4e-3, wd=1e-4, optimizer='adam', max_steps=1000,
              warmup_frac=0.1)
CHECKPOINT = os.path.join(M.MODELS_DIR, 'vit.params')


class Attention(nn.HybridBlock):
    """Multi-head self-attention on ``(N, S, dim)``: ``softmax(q k^T / sqrt(d)) v``."""

    def __init__(self, dim, heads, **kw):
        super().__init__(**kw)
        self._heads, self._scale = heads, float(1.0 / np.sqrt(dim // heads))
        with self.name_scope():
            self.qkv = nn.Dense(3 * dim, flatten=False, in_units=dim)
            self.proj = nn.Dense(dim, flatten=False, in_units=dim)

    def hybrid_forward(self, F, x):
        h = self._heads
        qkv = F.reshape(self.qkv(x), (0, 0, 3 * h, -1))             # N S 3h d
        qkv = F.transpose(qkv, (0, 2, 1, 3))                        # N 3h S d
        q, k, v = F.split(qkv, num_outputs=3, axis=1)               # N h S d each
        q, k, v = (F.reshape(t, (-3, 0, 0)) for t in (q, k, v))     # Nh S d
        att = F.softmax(F.batch_dot(q, k, transpose_b=True) * self._scale, axis=-1)
        y = F.reshape(F.batch_dot(att, v), (-4, -1, h, 0, 0))       # N h S d
        return self.proj(F.reshape(F.transpose(y, (0, 2, 1, 3)), (0, 0, -1)))


class EncoderBlock(nn.HybridBlock):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim, heads, mlp, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.ln1 = nn.LayerNorm(in_channels=dim)
            self.attn = Attention(dim, heads)
            self.ln2 = nn.LayerNorm(in_channels=dim)
            self.fc1 = nn.Dense(mlp, flatten=False, in_units=dim)
            self.fc2 = nn.Dense(dim, flatten=False, in_units=mlp)

    def hybrid_forward(self, F, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.LeakyReLU(self.fc1(self.ln2(x)), act_type='gelu'))


class ViT(nn.HybridBlock):
    """Vision Transformer for ``(N, 1, size, size)`` images (MNIST padded to 32x32).

    Inputs:
        - **data**: float32 `(N, 1, size, size)`.

    Outputs:
        - **logits**: float32 `(N, classes)`.
    """

    def __init__(self, dim=64, depth=2, heads=4, mlp=128, patch=4, size=32, classes=10,
                 **kw):
        super().__init__(**kw)
        tokens = (size // patch) ** 2
        with self.name_scope():
            self.patch = nn.Conv2D(dim, patch, strides=patch, in_channels=1)
            self.pos = self.params.get('pos', shape=(1, tokens, dim),
                                       init=mx.init.Normal(0.02))
            self.blocks = nn.HybridSequential()
            for _ in range(depth):
                self.blocks.add(EncoderBlock(dim, heads, mlp))
            self.ln = nn.LayerNorm(in_channels=dim)
            self.head = nn.Dense(classes, in_units=dim)

    def hybrid_forward(self, F, x, pos):
        t = F.transpose(F.reshape(self.patch(x), (0, 0, -1)), (0, 2, 1))   # N S dim
        t = self.blocks(F.broadcast_add(t, pos))
        return self.head(F.mean(self.ln(t), axis=1))


def build(**kw):
    return ViT(**dict(ARCH, **kw))


def pretrained(path=CHECKPOINT):
    """The shipped float ViT (trained with RECIPE), hybridized, on the CPU."""
    if not os.path.exists(path):
        raise FileNotFoundError('%s: no ViT checkpoint; train it with python '
                                'examples/vit_mnist.py' % path)
    net = build()
    net.load_parameters(path, ctx=mx.cpu())
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=CHECKPOINT, help='checkpoint to write')
    p.add_argument('--overwrite', action='store_true', help='replace an existing checkpoint')
    p.add_argument('--quantize', action='store_true', help='also convert to int8 and score')
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        p.error('refusing to overwrite %s (pass --overwrite)' % args.out)
    net = build()
    t = time.time()
    M.train(net, eval_test=False, verbose=False, **RECIPE)
    seconds = time.time() - t
    xt, yt = M.test_set()
    acc, logits = M.evaluate(net, xt, yt)
    tmp = args.out + '.tmp'
    net.save_parameters(tmp)
    os.replace(tmp, args.out)
    with open(args.out, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print('vit fp32 top-1 %.2f%%  trained in %.0f s  %s  sha256 %s'
          % (acc, seconds, os.path.relpath(args.out), digest), flush=True)
    if args.quantize:
        import gluonq
        calib, _ = M.load('train', 512)
        qnet = gluonq.quantize_net(net, calib, progress=False)
        qnet.hybridize()
        qacc, qlogits = M.evaluate(qnet, xt, yt)
        err = ((qlogits.astype(np.float64) - logits) ** 2).sum()
        print('vit int8 top-1 %.2f%% (fp32 %.2f%%), logit SQNR %.1f dB'
              % (qacc, acc, 10 * np.log10((logits.astype(np.float64) ** 2).sum() / err)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
