"""``QuantizedNet.export``: Gluon's deployment call writes the fast export, which stock MXNet
loads without gluonq and which gives the gluonq network's outputs."""
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest

import gluonq

import mnist_models as M

_LOADER = textwrap.dedent('''
    import sys
    sys.modules['gluonq'] = None            # importing gluonq would now fail
    import numpy as np, mxnet as mx
    out, xfile, prefix, epoch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    x = mx.nd.array(np.load(xfile))
    net = mx.gluon.SymbolBlock.imports(prefix + '-symbol.json', ['data'],
                                       '%s-%04d.params' % (prefix, epoch))
    net.hybridize(static_alloc=True, static_shape=True)
    a = net(x).asnumpy()
    sym, args, aux = mx.model.load_checkpoint(prefix, epoch)
    mod = mx.mod.Module(sym, data_names=['data'], label_names=None)
    mod.bind(data_shapes=[('data', x.shape)], for_training=False)
    mod.set_params(args, aux)
    mod.forward(mx.io.DataBatch([x]), is_train=False)
    np.save(out, np.stack([a, mod.get_outputs()[0].asnumpy()]))
''')


@pytest.fixture(scope='module')
def converted():
    xc, _ = M.load('train', 64)
    xt, _ = M.load('test', 32)
    return gluonq.quantize_net(M.pretrained('incres'), xc, progress=False), xt


def _load_without_gluonq(tmp_path, prefix, x, epoch=0):
    np.save(str(tmp_path / 'x.npy'), x)
    out = str(tmp_path / 'y.npy')
    subprocess.run([sys.executable, '-c', _LOADER, out, str(tmp_path / 'x.npy'), prefix,
                    str(epoch)], check=True, cwd=str(tmp_path))
    return np.load(out)


def test_export_after_hybridize_and_forward_loads_in_stock_mxnet(converted, tmp_path):
    """The issue's call sequence: hybridize, forward, export."""
    qnet, x = converted
    qnet.hybridize()
    want = qnet(mx.nd.array(x)).asnumpy()
    prefix = str(tmp_path / 'net')
    assert qnet.export(prefix) == (prefix + '-symbol.json', prefix + '-0000.params')
    for got in _load_without_gluonq(tmp_path, prefix, x):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_export_without_hybridize_or_forward_and_with_an_epoch(converted, tmp_path):
    qnet, x = converted
    gluonq.save_quantized(qnet, str(tmp_path / 'ckpt'))
    fresh = gluonq.load_quantized(str(tmp_path / 'ckpt'))   # never hybridized, never called
    prefix = str(tmp_path / 'fresh')
    sym_path, params_path = fresh.export(prefix, epoch=7)
    assert params_path == prefix + '-0007.params' and os.path.exists(params_path)
    fresh.hybridize()
    want = fresh(mx.nd.array(x)).asnumpy()              # the fast path's outputs
    for got in _load_without_gluonq(tmp_path, prefix, x, epoch=7):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_export_never_replaces_a_file_silently(converted, tmp_path):
    qnet, _ = converted
    prefix = str(tmp_path / 'net')
    with open(prefix + '-symbol.json', 'w') as f:
        f.write('a file of the user')
    with pytest.raises(FileExistsError, match='refusing to overwrite .*net-symbol.json'):
        qnet.export(prefix)
    assert open(prefix + '-symbol.json').read() == 'a file of the user'
    assert not os.path.exists(prefix + '-0000.params')
    qnet.export(prefix, overwrite=True)
    assert open(prefix + '-symbol.json').read() != 'a file of the user'


def test_export_compact_still_works_and_warns(converted, tmp_path):
    """The compact export is deprecated (README "Deployment"): it still writes files that
    stock MXNet loads and that give the reference chain's outputs, and its warning names the
    replacement."""
    qnet, x = converted
    prefix = str(tmp_path / 'compact')
    with pytest.warns(DeprecationWarning, match=r'int8_weights=True, exact=True'):
        paths = gluonq.export_compact(qnet, prefix)
    assert paths == (prefix + '-symbol.json', prefix + '-0000.params')
    want = qnet.forward_all(mx.nd.array(x))[qnet.spec['outputs'][0]].asnumpy()
    for got in _load_without_gluonq(tmp_path, prefix, x):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
