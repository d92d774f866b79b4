"""The main job, end to end: a trained float MNIST ResNet-20 checkpoint -> int8, then a real
pretrained network imported from ONNX -> int8 -> OpenVINO.

1. The float model: gluoncv's cifar_resnet20_v1 trained on MNIST, shipped as
   data/models/resnet20.params (``--train`` trains it here instead: one epoch, a few
   minutes on 2 cores).
2. Convert it with the ``gluonq-convert`` script: 512 calibration images, per-channel
   weights, an int8 checkpoint plus deployment exports.
3. Load the int8 checkpoint with ``gluonq.load_quantized`` and report fp32 vs int8 top-1 on
   the 10k test images, file sizes and speed.
4. A real pretrained network: the text-line classifier (0 or 180 degrees; PaddleOCR's
   mobile v2.0 cls) that the rapidocr-onnxruntime wheel ships as ONNX. ``gluonq.import_onnx``
   makes it a Gluon SymbolBlock, ``quantize_net`` calibrates it on 128 text lines rendered
   here, and it is scored on 1000 other lines (fp32 vs int8), exported for OpenVINO and
   onnxruntime, and timed in OpenVINO (fp32 vs gluonq's int8 IR) and in MXNet.

    python examples/demo.py [--out out/demo] [--calib-mode naive] [--train]
"""
import argparse
import os
import sys
import time

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mnist_models as M  # noqa: E402

import gluonq  # noqa: E402
from gluonq import cli, quant  # noqa: E402


def median_ms(fn, runs=7, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description='gluonq demo: MNIST ResNet-20 fp32 -> int8')
    p.add_argument('--out', default=os.path.join(M.ROOT, 'out', 'demo'))
    p.add_argument('--calib-mode', default='naive')
    p.add_argument('--train', action='store_true',
                   help='train the float model here instead of using the shipped one')
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    if args.train:
        print('== 1. float model: gluoncv cifar_resnet20_v1, trained on MNIST here (1 epoch)')
        float_params = os.path.join(args.out, 'resnet20-float.params')
        net = M.build('resnet20')
        t = time.time()
        M.train(net, eval_test=False, log_every=100, **M.RECIPES['resnet20'][1])
        print('   trained in %.0f s' % (time.time() - t))
        net.save_parameters(float_params + '.tmp')
        os.replace(float_params + '.tmp', float_params)
    else:
        float_params = M.checkpoint('resnet20')
        print('== 1. float model: gluoncv cifar_resnet20_v1 trained on MNIST, shipped as %s'
              % os.path.relpath(float_params))

    print('\n== 2. gluonq-convert (calibration: %s, 512 images)' % args.calib_mode)
    data = os.path.join(M.ROOT, 'data', 'mnist.npz')
    prefix = os.path.join(args.out, 'resnet20-int8')
    argv = ['--model', 'cifar_resnet20_v1', '--classes', '10', '--params', float_params,
            '--calib', data, '--calib-key', 'x_train', '--transform',
            'mnist_models:preprocess', '--num-calib-examples', '512',
            '--calib-mode', args.calib_mode, '--out', prefix,
            '--overwrite', '--quiet']
    argv += ['--export-fast', prefix + '-fast']
    print('   gluonq-convert ' + ' '.join(argv))
    if cli.main(argv) != 0:
        return 1

    print('\n== 3. load the int8 checkpoint and compare with fp32')
    net = M.build('resnet20')
    net.load_parameters(float_params)
    net.hybridize(static_alloc=True, static_shape=True)
    qnet = gluonq.load_quantized(prefix)
    qnet.hybridize(static_alloc=True, static_shape=True)
    xt, yt = M.test_set()
    acc_f, lf = M.evaluate(net, xt, yt)
    acc_q, lq = M.evaluate(qnet, xt, yt)
    print('   top-1 on 10000 test images: fp32 %.2f%%, int8 %.2f%% (drop %.2f points); '
          'logit SQNR %.1f dB' % (acc_f, acc_q, acc_f - acc_q, quant.sqnr_db(lf, lq)))
    sizes = [('fp32 checkpoint', float_params), ('int8 checkpoint', prefix + '.params')]
    for name in ('fast',):
        path = '%s-%s-0000.params' % (prefix, name)
        if os.path.exists(path):
            sizes.append(('%s export' % name, path))
    f_size = os.path.getsize(float_params)
    for label, path in sizes:
        size = os.path.getsize(path)
        print('   %-16s %9d bytes  (%.0f%% of fp32)' % (label, size, 100.0 * size / f_size))
    for bs in (1, 64):
        x = mx.nd.array(xt[:bs])
        t_f = median_ms(lambda: net(x).wait_to_read())
        t_q = median_ms(lambda: qnet(x).wait_to_read())
        print('   batch %-3d fp32 %7.2f ms, int8 %7.2f ms: %.2fx (median of 7)' % (
            bs, t_f, t_q, t_f / t_q))
    return real_model(args.out)


def real_model(out):
    """Step 4: rapidocr's pretrained text-line classifier, ONNX -> Gluon -> int8 -> OpenVINO."""
    import ocr_data as O
    print('\n== 4. a real pretrained network: %s (rapidocr-onnxruntime)'
          % os.path.basename(O.model_path('cls')))
    t = time.time()
    net = gluonq.import_onnx(O.model_path('cls'), (1,) + O.CLS_SHAPE).net
    net.hybridize(static_alloc=True, static_shape=True)
    xc, _ = O.cls_batch(128, seed=1)
    xt, yt = O.cls_batch(1000, seed=2)
    # zero-point (affine) inputs where the range is lopsided: its hardswish outputs
    qnet = gluonq.quantize_net(net, xc, act_scheme='auto', progress=False)
    print('   imported and converted in %.1f s (128 rendered calibration lines, '
          "act_scheme='auto')"
          % (time.time() - t))
    qnet.hybridize(static_alloc=True, static_shape=True)
    lf = np.concatenate([net(mx.nd.array(xt[i:i + 100])).asnumpy()
                         for i in range(0, len(xt), 100)])
    lq = np.concatenate([qnet(mx.nd.array(xt[i:i + 100])).asnumpy()
                         for i in range(0, len(xt), 100)])
    acc_f, acc_q = 100 * np.mean(lf.argmax(1) == yt), 100 * np.mean(lq.argmax(1) == yt)
    n_int8 = sum(1 for r in qnet.report if r['kind'].startswith('int8'))
    print('   top-1 on 1000 rendered lines: fp32 %.1f%%, int8 %.1f%%; output SQNR %.1f dB; '
          '%d ops int8, %d float' % (acc_f, acc_q, quant.sqnr_db(lf, lq), n_int8,
                                    sum(1 for r in qnet.report if r['kind'] == 'float')))
    prefix = os.path.join(out, 'cls-int8')
    written = [gluonq.save_quantized(qnet, prefix, overwrite=True)[0],
               qnet.export(prefix + '-mxnet', overwrite=True)[1],
               gluonq.export_onnx(qnet, prefix + '.onnx', overwrite=True),
               gluonq.export_openvino(qnet, prefix + '.xml', overwrite=True)[1]]
    f_size = os.path.getsize(O.model_path('cls'))
    for path in written:
        print('   wrote %-22s %8d bytes (%.0f%% of the fp32 ONNX file)'
              % (os.path.basename(path), os.path.getsize(path),
                 100.0 * os.path.getsize(path) / f_size))
    import openvino as ov
    core = ov.Core()
    cfg = {'INFERENCE_NUM_THREADS': os.cpu_count() or 1}
    ov_fp32 = core.compile_model(O.model_path('cls'), 'CPU', cfg)
    ov_int8 = core.compile_model(prefix + '.xml', 'CPU', cfg)
    lo = ov_int8({ov_int8.inputs[0]: xt[:100]})[ov_int8.outputs[0]]
    print('   OpenVINO int8 agrees with gluonq on %.1f%% of 100 lines'
          % (100 * np.mean(lo.argmax(1) == lq[:100].argmax(1))))
    x = xt[:8]
    xn = mx.nd.array(x)
    times = {
        'OpenVINO fp32': median_ms(lambda: ov_fp32({ov_fp32.inputs[0]: x})),
        'OpenVINO int8 (gluonq IR)': median_ms(lambda: ov_int8({ov_int8.inputs[0]: x})),
        'MXNet fp32': median_ms(lambda: net(xn).wait_to_read()),
        'MXNet int8 (gluonq)': median_ms(lambda: qnet(xn).wait_to_read()),
    }
    for name, ms in times.items():
        print('   batch 8 %-26s %7.2f ms (median of 7)' % (name, ms))
    return 0


if __name__ == '__main__':
    sys.exit(main())
