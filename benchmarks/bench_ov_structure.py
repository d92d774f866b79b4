"""What onnxruntime and OpenVINO run for gluonq's QDQ model and for the anchors' own int8.

For each gluoncv model (random weights as in ``bench_inference.py``, 224x224, the same
calibration images) the QDQ models of the same float network:

* ``gluonq``      ``gluonq.export_onnx`` (int8 weights, ``calib_data`` = the images), laid
                  out for onnxruntime (the default ``target``);
* ``gluonq-ov``   the same with ``target='openvino'`` (what ``gluonq.export_openvino``
                  converts);
* ``ort-qstatic`` onnxruntime's ``quantize_static`` (QDQ, U8S8, per channel, MinMax);
* ``nncf``        ``nncf.quantize`` of the float ONNX (if nncf is installed);

and prints, for each, the op types of onnxruntime's optimized graph
(``SessionOptions.optimized_model_filepath``) and the layer types and precisions of
OpenVINO's runtime model (``gluonq.openvino.runtime_precisions``), with the counts that
show what was left unfused: OpenVINO ``Reorder``, ``Eltwise``, ``FakeQuantize`` and float
``Convolution``; onnxruntime ``QuantizeLinear``/``DequantizeLinear`` and float ``Conv``.
No timing: the structure is the same on a busy machine.

    python benchmarks/bench_ov_structure.py --models resnet50_v1,mobilenetv2_1.0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_inference as B                             # noqa: E402


def ort_ops(path):
    """``{op type: count}`` of the graph onnxruntime runs after its optimizations."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(tmp, 'opt.onnx')
        ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
        return dict(Counter(n.op_type for n in onnx.load(so.optimized_model_filepath)
                            .graph.node))


def ov_layers(path, threads=1):
    """``{'layerType runtimePrecision': count}`` of OpenVINO's runtime model of ``path``
    (an ONNX file or an IR)."""
    import openvino as ov
    from gluonq.openvino import runtime_precisions
    core = ov.Core()
    cm = core.compile_model(path, 'CPU', {'INFERENCE_NUM_THREADS': threads})
    return {'%s %s' % k: v for k, v in sorted(runtime_precisions(cm).items())}


def summary(ort, ov):
    """The counts that show unfused work."""
    def ov_count(kind, float_only=False):
        return sum(v for k, v in ov.items() if k.split()[0] == kind and
                   (not float_only or k.split()[1] not in ('u8', 'i8')))
    return {'ov Reorder': ov_count('Reorder'), 'ov Eltwise': ov_count('Eltwise'),
            'ov FakeQuantize': ov_count('FakeQuantize'),
            'ov float Convolution': ov_count('Convolution', True),
            'ort Q': ort.get('QuantizeLinear', 0), 'ort DQ': ort.get('DequantizeLinear', 0),
            'ort float Conv': ort.get('Conv', 0) + ort.get('FusedConv', 0)}


def build(model, workdir, n_calib):
    """The QDQ ONNX files of ``model``: {variant: path}. The anchors' models and gluonq's
    QuantizedNet already in ``workdir`` are reused; gluonq's ONNX is always written anew
    (from the ``gluonq.onnx`` being measured)."""
    import gluonq
    import bench_onnx
    net = B.build_float(model, workdir)
    x = B.calib_images(n_calib)
    p = lambda v: os.path.join(workdir, '%s-%s.onnx' % (model, v))     # noqa: E731
    shape = (1,) + B.SHAPE
    if not os.path.exists(p('ort-qstatic')):
        bench_onnx.export_fp32(net, shape, p('ort-fp32'))
        bench_onnx.ort_quantize_static(p('ort-fp32'), p('ort-qstatic'), x)
    qpath = os.path.join(workdir, model + '-gluonq')
    if os.path.exists(qpath + '.json'):
        qnet = gluonq.load_quantized(qpath)
    else:
        qnet = gluonq.quantize_net(net, x, calib_mode='naive', progress=False)
        gluonq.save_quantized(qnet, qpath)
    paths = {}
    for variant, target in (('gluonq', 'onnxruntime'), ('gluonq-ov', 'openvino')):
        gluonq.export_onnx(qnet, p(variant), input_shape=shape, overwrite=True, calib_data=x,
                           weight_dtype='int8', target=target)
        paths[variant] = p(variant)
    paths['ort-qstatic'] = p('ort-qstatic')
    if os.path.exists(p('nncf')) or B.nncf_quantize(p('ort-fp32'), p('nncf'), x) is not None:
        paths['nncf'] = p('nncf')
    else:
        print('nncf is not installed (pip install "gluonq[nncf]"): no NNCF model', flush=True)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--models', default='resnet50_v1,mobilenetv2_1.0',
                    help='comma-separated gluoncv model names')
    ap.add_argument('--calib', type=int, default=16, help='calibration images')
    ap.add_argument('--workdir', help='keep the models here (default: temporary)')
    ap.add_argument('--full', action='store_true',
                    help='print every layer type and op type, not only the summary')
    args = ap.parse_args(argv)
    with B.workdir_for(args.workdir, prefix='gluonq-ovs-') as workdir:
        for model in args.models.split(','):
            for variant, path in build(model, workdir, args.calib).items():
                ort, ov = ort_ops(path), ov_layers(path)
                print('%-16s %-12s %s' % (model, variant, json.dumps(summary(ort, ov))),
                      flush=True)
                if args.full:
                    print('    onnxruntime: %s' % json.dumps(ort, sort_keys=True))
                    print('    openvino:    %s' % json.dumps(ov, sort_keys=True), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
