"""int8 parameters: initialization, save/load, export to stock MXNet, and clear errors."""
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest

import gluonq
from gluonq import nn as qnn
from param_values import value


def _mixed_net():
    """Float first conv, int8 conv and dense after it (a hand-quantized network)."""
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Conv2D(8, 3, padding=1, in_channels=1, activation='relu'),
            qnn.QuantizedConv2D(16, 3, padding=1, in_channels=8, activation='relu',
                                in_range=(0, 4.0), out_range=(0, 8.0)),
            qnn.QuantizedMaxPool2D(),
            qnn.QuantizedFlatten(),
            qnn.QuantizedDense(10, in_units=16 * 4 * 4, in_range=(0, 8.0)))
    return net


def test_initialize_defaults_and_global_xavier():
    layer = qnn.QuantizedConv2D(4, 3, in_channels=2)
    layer.initialize()                                  # no arguments
    assert layer.weight.data().dtype == np.int8
    assert not value(layer.weight).any()
    net = _mixed_net()
    net.initialize(mx.init.Xavier())                    # float sampler for float params only
    y = net(mx.nd.ones((2, 1, 8, 8)))
    assert y.shape == (2, 10) and np.all(np.isfinite(y.asnumpy()))
    assert value(net[0].weight).std() > 0     # the float conv did get Xavier
    dense = qnn.QuantizedDense(3)                       # deferred in_units
    dense.initialize(mx.init.Xavier())
    assert dense(mx.nd.ones((2, 5))).shape == (2, 3)
    assert dense.weight.shape == (3, 5) and dense.weight.data().dtype == np.int8


def test_int_initializers():
    layer = qnn.QuantizedDense(6, in_units=5)
    layer.initialize()
    layer.weight.initialize(gluonq.init.IntUniform(-5, 5), force_reinit=True)
    w = value(layer.weight)
    assert w.dtype == np.int8 and w.min() >= -5 and w.max() <= 5 and w.std() > 0
    with pytest.raises(ValueError, match='random samplers are float-only'):
        layer.weight.initialize(mx.init.Xavier(), force_reinit=True)
    layer.weight.initialize(mx.init.Constant(3), force_reinit=True)
    assert (value(layer.weight) == 3).all()


def test_set_float_params_quantizes_weights():
    dense = mx.gluon.nn.Dense(4, in_units=3)
    dense.initialize(mx.init.Xavier())
    q = qnn.QuantizedDense(4, in_units=3, in_range=(0, 1))
    q.initialize()
    q.set_float_params(dense.weight.data(), mx.nd.array([0.1, -0.2, 0.3, 0.0]))
    w, s = value(q.weight), value(q.weight_scale)
    assert w.dtype == np.int8 and np.abs(w).max() == 127 and np.all(np.abs(w) <= 127)
    np.testing.assert_allclose(w * s[:, None], value(dense.weight),
                               atol=float(s.max()) / 2 * 1.0001)
    assert q.bias.data().dtype == np.int32
    with pytest.raises(ValueError, match='weight of shape'):
        q.set_float_params(np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r'bias of shape \(5,\) given, expected \(4,\)'):
        q.set_float_params(np.zeros((4, 3)), np.zeros(5))


def test_save_load_roundtrip_keeps_int8(tmp_path):
    net = _mixed_net()
    net.initialize(mx.init.Xavier())
    net[1].weight.set_data(mx.nd.array(np.random.randint(-127, 128, (16, 8, 3, 3)), dtype='int8'))
    x = mx.nd.array(np.random.rand(2, 1, 8, 8))
    y = net(x).asnumpy()
    path = str(tmp_path / 'net.params')
    net.save_parameters(path)
    loaded = mx.nd.load(path)
    assert loaded['1.weight'].dtype == np.int8 and loaded['1.bias'].dtype == np.int32
    net2 = _mixed_net()
    net2.load_parameters(path)
    for (k, a), (_, b) in zip(sorted(net.collect_params().items()),
                              sorted(net2.collect_params().items())):
        assert a.data().dtype == b.data().dtype
        np.testing.assert_array_equal(value(a), value(b))
    np.testing.assert_array_equal(net2(x).asnumpy(), y)


def test_float_checkpoint_into_quantized_block_is_refused(tmp_path):
    dense = mx.gluon.nn.Dense(4, in_units=3)
    dense.initialize()
    path = str(tmp_path / 'float.params')
    dense.save_parameters(path)
    q = qnn.QuantizedDense(4, in_units=3)
    with pytest.raises(AssertionError, match="weight_scale' is missing"):
        q.load_parameters(path)
    with pytest.raises(ValueError, match='float checkpoint'):
        q.load_parameters(path, allow_missing=True)
    with pytest.raises(ValueError, match='float checkpoint'):
        q.load_parameters(path, allow_missing=True, cast_dtype=True)


def test_bad_inputs_name_the_block():
    q = qnn.QuantizedConv2D(4, 3, in_channels=2, in_range=(0, 1), prefix='myconv_')
    q.initialize()
    with pytest.raises(TypeError, match="QuantizedConv2D 'myconv'.*float32 input"):
        q(mx.nd.ones((1, 2, 5, 5), dtype='float16'))
    quant8 = qnn.Quantize(in_range=(-1, 1))
    quant8.initialize()
    with pytest.raises(TypeError, match="expected a uint8 input tensor, got int8"):
        q(quant8(mx.nd.ones((1, 2, 5, 5))))
    other = qnn.Quantize(in_range=(0, 2), out_dtype='uint8')
    other.initialize()
    with pytest.raises(ValueError, match=r'range \[0, 2\] but the layer was calibrated for '
                                         r'\[0, 1\]'):
        q(other(mx.nd.ones((1, 2, 5, 5))))
    with pytest.raises(ValueError, match="'myconv'.*NCHW input with 2 channels, got shape"):
        q(mx.nd.ones((1, 3, 5, 5)))                     # wrong channel count
    d = qnn.QuantizedDense(4, in_units=6, prefix='fc_')
    d.initialize()
    with pytest.raises(ValueError, match="'fc'.*has 5 features, the layer takes in_units=6"):
        d(mx.nd.ones((2, 5)))
    with pytest.raises(ValueError, match='uint8 needs a range with min >= 0'):
        qnn.QuantizedDense(3, in_range=(-1, 1), in_dtype='uint8')
    with pytest.raises(ValueError, match='min <= max'):
        qnn.Quantize(in_range=(2, 1))
    with pytest.raises(TypeError, match='expected a QTensor'):
        qnn.QuantizedMaxPool2D()(mx.nd.ones((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="only 'relu' is fused"):
        qnn.QuantizedDense(3, activation='tanh', out_dtype='int8')


def test_export_loads_in_stock_mxnet_without_gluonq(tmp_path):
    net = _mixed_net()
    net.initialize(mx.init.Xavier())
    net[1].weight.set_data(mx.nd.array(np.random.randint(-127, 128, (16, 8, 3, 3)), dtype='int8'))
    net[4].weight.set_data(mx.nd.array(np.random.randint(-127, 128, (10, 256)), dtype='int8'))
    x = np.random.rand(3, 1, 8, 8).astype(np.float32)
    net.hybridize()
    y = net(mx.nd.array(x)).asnumpy()
    prefix = str(tmp_path / 'qnet')
    net.export(prefix)
    saved = mx.nd.load(prefix + '-0000.params')
    assert any(v.dtype == np.int8 for v in saved.values())
    np.save(str(tmp_path / 'x.npy'), x)
    script = textwrap.dedent('''
        import sys
        sys.modules['gluonq'] = None            # importing gluonq would now fail
        import numpy as np, mxnet as mx
        x = np.load(sys.argv[2])
        net = mx.gluon.SymbolBlock.imports(sys.argv[1] + '-symbol.json', ['data'],
                                           sys.argv[1] + '-0000.params')
        a = net(mx.nd.array(x)).asnumpy()
        sym, args, aux = mx.model.load_checkpoint(sys.argv[1], 0)
        mod = mx.mod.Module(sym, data_names=['data'], label_names=None)
        mod.bind(data_shapes=[('data', x.shape)], for_training=False)
        mod.set_params(args, aux)
        mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
        b = mod.get_outputs()[0].asnumpy()
        np.save(sys.argv[3], np.stack([a, b]))
    ''')
    out = str(tmp_path / 'y.npy')
    subprocess.run([sys.executable, '-c', script, prefix, str(tmp_path / 'x.npy'), out],
                   check=True, cwd=str(tmp_path))
    got = np.load(out)
    np.testing.assert_array_equal(got[0], y)
    np.testing.assert_array_equal(got[1], y)


@pytest.mark.parametrize('make_float,make_q', [
    (lambda: mx.gluon.nn.Dense(256, in_units=512),
     lambda f: qnn.QuantizedDense.from_float(f, in_range=(0, 1))),
    (lambda: mx.gluon.nn.Conv2D(64, 3, in_channels=64),
     lambda f: qnn.QuantizedConv2D.from_float(f, in_range=(0, 1), out_range=(-1, 1))),
])
def test_params_file_at_most_30_percent_of_float_twin(tmp_path, make_float, make_q):
    f = make_float()
    f.initialize(mx.init.Xavier())
    q = make_q(f)
    f.save_parameters(str(tmp_path / 'f.params'))
    q.save_parameters(str(tmp_path / 'q.params'))
    ratio = os.path.getsize(str(tmp_path / 'q.params')) / os.path.getsize(
        str(tmp_path / 'f.params'))
    assert ratio <= 0.30, ratio


def test_depthwise_weights_are_a_quarter_of_float(tmp_path):
    """A depthwise layer has 9 weights per channel against 8 bytes of per-channel scale and
    int32 bias, so its whole file cannot reach 30% (measured 0.437); its weights do shrink
    4x: the int8 file is the float file less 3 bytes per weight, plus the 4-byte scales and
    the headers of the arrays the float layer lacks (weight_scale, input_min, input_max:
    measured 158 bytes with their 8 bytes of range values)."""
    f = mx.gluon.nn.Conv2D(512, 3, in_channels=512, groups=512)
    f.initialize(mx.init.Xavier())
    q = qnn.QuantizedConv2D.from_float(f, in_range=(0, 1))
    f.save_parameters(str(tmp_path / 'f.params'))
    q.save_parameters(str(tmp_path / 'q.params'))
    size_f, size_q = (os.path.getsize(str(tmp_path / n)) for n in ('f.params', 'q.params'))
    n_w, n_c = 512 * 9, 512
    extra = size_q - (size_f - 3 * n_w + 4 * n_c)
    assert 0 < extra <= 3 * 64, (size_f, size_q)
    assert size_q <= 0.45 * size_f, (size_f, size_q)
