"""``gluonq-convert`` (also ``python -m gluonq.convert``): float checkpoint -> int8 checkpoint.

Example::

    gluonq-convert --model cifar_resnet20_v1 --classes 10 --params float.params \\
        --calib calib.npz --num-calib-examples 512 --out int8/resnet20 \\
        --eval test.npz --export-fast deploy/resnet20 --onnx deploy/resnet20.onnx
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

import numpy as np

__all__ = ['main', 'build_network', 'load_float_params', 'load_array_data']

IMAGE_EXT = ('.jpg', '.jpeg', '.png', '.bmp')


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _parser():
    p = argparse.ArgumentParser(
        prog='gluonq-convert',
        description='Calibrate a float MXNet Gluon checkpoint and write an int8 checkpoint '
                    '(.params with int8 weights + .json sidecar), optionally exported for '
                    'deployment.')
    arch = p.add_argument_group('architecture (one of)')
    arch.add_argument('--model', help='gluoncv model zoo name, e.g. cifar_resnet20_v1')
    arch.add_argument('--classes', type=int, help='number of classes (gluoncv models)')
    arch.add_argument('--model-kwargs', default='{}', help='JSON keyword arguments for the '
                      'model constructor')
    arch.add_argument('--factory', help='package.module:callable returning the network')
    arch.add_argument('--symbol', help='exported symbol JSON (prefix-symbol.json)')
    arch.add_argument('--input-name', default='data', help='input name of --symbol graphs')
    arch.add_argument('--onnx-model', metavar='PATH', help='float ONNX model (imported with '
                      'gluonq.import_onnx for the calibration data\'s input shape; it carries '
                      'its weights, so no --params)')
    p.add_argument('--params', help='float checkpoint (.params); required except with '
                   '--onnx-model')
    cal = p.add_argument_group('calibration')
    cal.add_argument('--calib', required=True, help='.npz/.npy array file, image folder or '
                     'RecordIO .rec file')
    cal.add_argument('--calib-key', help='array name inside an .npz (default: the first)')
    cal.add_argument('--transform', help='package.module:function applied to loaded arrays '
                     '(e.g. to pad and normalize raw images)')
    cal.add_argument('--image-size', type=int, nargs=2, metavar=('H', 'W'),
                     help='resize images from folders / .rec to H W')
    cal.add_argument('--mean', type=float, nargs='+', default=[0.0], help='per-channel mean '
                     'subtracted from images in [0, 1]')
    cal.add_argument('--std', type=float, nargs='+', default=[1.0], help='per-channel std')
    cal.add_argument('--num-calib-examples', type=int, default=512)
    cal.add_argument('--calib-mode', default='naive',
                     choices=['naive', 'percentile', 'entropy', 'mse', 'moving_average'])
    cal.add_argument('--percentile', type=float, help='percentile for --calib-mode percentile')
    cal.add_argument('--per-tensor', action='store_true', help='one weight scale per tensor '
                     '(default: per output channel)')
    cal.add_argument('--act-dtype', default='auto', choices=['auto', 'int8', 'uint8'])
    cal.add_argument('--act-scheme', default='symmetric',
                     choices=['symmetric', 'auto', 'affine'],
                     help="uint8 with a zero point for lopsided tensors that only conv/dense "
                          "layers read ('auto': where it makes the step 1.25x finer)")
    cal.add_argument('--exclude', nargs='+', default=[], metavar='PATTERN',
                     help='layer names or glob patterns that stay float')
    cal.add_argument('--batch-size', type=int, default=32)
    cal.add_argument('--bias-correction', action='store_true',
                     help="remove each layer's mean int8 error per output channel on the "
                     'calibration data from its int32 bias (see README, "Calibration")')
    cal.add_argument('--weight-rounding', default='nearest', choices=['nearest', 'adaround'],
                     help="'adaround': learn each weight's rounding direction per layer on "
                     'the calibration data (slower; see gluonq.convert.adaround)')
    ev = p.add_argument_group('evaluation (optional)')
    ev.add_argument('--eval', help='.npz with inputs and labels for fp32 vs int8 accuracy')
    ev.add_argument('--eval-key', help='input array name in --eval (default: first)')
    ev.add_argument('--eval-label-key', help='label array name in --eval (default: second)')
    ev.add_argument('--max-drop', type=float, metavar='POINTS',
                    help='with --eval: put the most sensitive int8 layers back to float until '
                    'int8 top-1 is at most POINTS below fp32 (e.g. 0.1)')
    out = p.add_argument_group('output')
    out.add_argument('--out', required=True, help='output prefix: writes PREFIX.params and '
                     'PREFIX.json')
    out.add_argument('--export-fast', metavar='PREFIX', help='also write a deployment export '
                     'for stock MXNet using oneDNN fused int8 kernels')
    out.add_argument('--export-compact', metavar='PREFIX', help='deprecated: also write '
                     "gluonq's unfused reference chain for stock MXNet (int8 weights on disk; "
                     'export_fast(qnet, prefix, int8_weights=True, exact=True) runs fused)')
    out.add_argument('--onnx', metavar='PATH', help='also write an ONNX (QDQ) model')
    out.add_argument('--onnx-weights', default='auto', choices=['auto', 'int8', 'uint8'],
                     help="ONNX weight type: int8 (U8S8, onnxruntime's fast path), uint8 "
                     '(U8U8: exact also on CPUs without VNNI, where U8S8 saturates), or '
                     'auto (default): int8 where onnxruntime\'s U8S8 is exact on this CPU, '
                     'else uint8')
    out.add_argument('--onnx-round-float-results', action='store_true',
                     help='round the float results of convolutions (before a float hardswish '
                     'or gate) to 8 bits in the ONNX model, so that onnxruntime runs them as '
                     'QLinearConv: faster, less accurate (export_onnx round_float_results)')
    out.add_argument('--openvino', metavar='PATH.xml', help='also write an OpenVINO IR '
                     '(PATH.xml + PATH.bin, int8 weights; needs gluonq[openvino])')
    out.add_argument('--report-png', metavar='PATH', help='bar chart of per-layer SQNR')
    out.add_argument('--overwrite', action='store_true', help='replace existing outputs')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    return p


def _import(spec, what):
    mod_name, _, attr = spec.partition(':')
    if not attr:
        raise CliError('%s must look like package.module:name, got %r' % (what, spec))
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        raise CliError('%s: cannot import %s: %s' % (what, mod_name, err)) from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise CliError('%s: module %s has no %r' % (what, mod_name, attr)) from None


def build_network(args):
    """The float network from --model / --factory / --symbol (parameters not loaded)."""
    import mxnet as mx
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise CliError('--model-kwargs is not valid JSON: %s' % err) from None
    if not isinstance(kwargs, dict):
        raise CliError('--model-kwargs must be a JSON object ({"name": value}), got %s'
                       % args.model_kwargs)
    if args.model:
        from gluoncv.model_zoo import get_model
        if args.classes is not None:
            kwargs['classes'] = args.classes
        try:
            return get_model(args.model, pretrained=False, **kwargs)
        except ValueError as err:
            raise CliError('--model %s: %s' % (args.model, str(err).splitlines()[0])) from None
    if args.factory:
        factory = _import(args.factory, '--factory')
        try:
            net = factory(**kwargs)
        except TypeError as err:
            raise CliError('--factory %s does not take --model-kwargs %s: %s'
                           % (args.factory, args.model_kwargs, err)) from None
        if not isinstance(net, mx.gluon.HybridBlock):
            raise CliError('--factory %s returned %s: expected a Gluon HybridBlock'
                           % (args.factory, type(net).__name__))
        return net
    if not os.path.exists(args.symbol):
        raise CliError('--symbol file %s not found' % args.symbol)
    try:
        sym = mx.sym.load(args.symbol)
    except mx.base.MXNetError:
        raise CliError('--symbol %s is not an MXNet symbol JSON file (prefix-symbol.json)'
                       % args.symbol) from None
    if args.input_name not in sym.list_arguments():
        raise CliError('--symbol %s has no input %r (--input-name); its arguments begin %s'
                       % (args.symbol, args.input_name, ', '.join(sym.list_arguments()[:5])))
    return mx.gluon.SymbolBlock(sym, [mx.sym.var(args.input_name)])


def load_float_params(net, path):
    """Load a float checkpoint into ``net``; mismatches list missing/unexpected names."""
    import mxnet as mx
    if not os.path.exists(path):
        raise CliError('--params file %s not found' % path)
    try:
        loaded = mx.nd.load(path)
    except mx.base.MXNetError:
        raise CliError('--params %s is not an MXNet .params file' % path) from None
    if not isinstance(loaded, dict) or not loaded:
        raise CliError('--params %s holds no named parameters' % path)
    if all(k.startswith(('arg:', 'aux:')) for k in loaded):
        loaded = {k[4:]: v for k, v in loaded.items()}
        expected = {p.name: p for p in net.collect_params().values()}
    elif any('.' in k for k in loaded):
        expected = net._collect_params_with_prefix()
    else:
        expected = {p.name: p for p in net.collect_params().values()}
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise CliError('architecture and checkpoint %s disagree:\n  missing from the '
                       'checkpoint (%d): %s\n  unexpected in the checkpoint (%d): %s'
                       % (path, len(missing), ', '.join(missing[:20]) or '-',
                          len(unexpected), ', '.join(unexpected[:20]) or '-'))
    for name, param in expected.items():
        value = loaded[name]
        if value.dtype != np.float32:
            raise CliError('parameter %s in %s is %s: expected a float32 checkpoint'
                           % (name, path, np.dtype(value.dtype).name))
        if param.shape is not None and any(s not in (0, t) for s, t in
                                           zip(param.shape, value.shape)) or \
                (param.shape is not None and len(param.shape) != len(value.shape)):
            raise CliError('parameter %s: the architecture expects shape %s, the checkpoint '
                           'has %s' % (name, param.shape, value.shape))
        param.shape = value.shape
        param._load_init(value, mx.cpu())
    return net


def _images_from_folder(folder, args, limit):
    import mxnet as mx
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith(IMAGE_EXT))
    if not files:
        raise CliError('--calib folder %s holds no images (%s)' % (folder, ', '.join(IMAGE_EXT)))
    imgs = []
    for f in files[:limit]:
        with open(f, 'rb') as fh:
            imgs.append(mx.image.imdecode(fh.read()).asnumpy())
    return _prepare_images(imgs, args, folder)


def _images_from_rec(path, args, limit):
    import mxnet as mx
    rec = mx.recordio.MXRecordIO(path, 'r')
    imgs = []
    try:
        while len(imgs) < limit:
            item = rec.read()
            if item is None:
                break
            _, img = mx.recordio.unpack_img(item, iscolor=1)
            imgs.append(img[:, :, ::-1])                        # BGR -> RGB
    finally:
        rec.close()
    if not imgs:
        raise CliError('--calib RecordIO file %s holds no images' % path)
    return _prepare_images(imgs, args, path)


def _prepare_images(imgs, args, source):
    import cv2
    if args.image_size is None:
        sizes = {im.shape[:2] for im in imgs}
        if len(sizes) != 1:
            raise CliError('images in %s have different sizes %s: give --image-size H W'
                           % (source, sorted(sizes)[:3]))
    out = []
    for im in imgs:
        if args.image_size is not None:
            im = cv2.resize(im, (args.image_size[1], args.image_size[0]),
                            interpolation=cv2.INTER_LINEAR)
        out.append(im)
    x = np.stack(out).astype(np.float32) / 255.0                  # N, H, W, C
    mean, std = np.asarray(args.mean, np.float32), np.asarray(args.std, np.float32)
    for flag, v in (('--mean', mean), ('--std', std)):
        if v.size not in (1, x.shape[-1]):
            raise CliError('%s has %d values: give one, or one per channel (the images in %s '
                           'have %d)' % (flag, v.size, source, x.shape[-1]))
    if not np.all(std > 0):
        raise CliError('--std must be positive, got %s' % ' '.join('%g' % v for v in std))
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def load_array_data(path, key=None, label_key=None, want_labels=False):
    """Arrays from an .npy/.npz file: (data, labels or None)."""
    if not os.path.exists(path):
        raise CliError('data file %s not found' % path)
    try:
        d = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise CliError('cannot read %s as .npy/.npz: %s' % (path, err)) from None
    if isinstance(d, np.ndarray):
        return d, None
    names = list(d.keys())
    if not names:
        raise CliError('%s holds no arrays' % path)
    key = key or names[0]
    if key not in names:
        raise CliError('%s has no array %r (it has %s)' % (path, key, ', '.join(names)))
    labels = None
    if want_labels:
        label_key = label_key or next((n for n in names if n != key), None)
        if label_key is None or label_key not in names:
            raise CliError('%s has no label array %r (it has %s)' % (path, label_key,
                                                                     ', '.join(names)))
        labels = d[label_key]
    return d[key], labels


def _calib_data(args):
    path, n = args.calib, args.num_calib_examples
    if os.path.isdir(path):
        x = _images_from_folder(path, args, n)
    elif path.endswith('.rec'):
        x = _images_from_rec(path, args, n)
    else:
        x, _ = load_array_data(path, args.calib_key)
        x = x[:n]
    if args.transform:
        x = _import(args.transform, '--transform')(x)
    return np.asarray(x)


def _accuracy(net, x, y, batch_size=256):
    import mxnet as mx
    outs = [net(mx.nd.array(x[i:i + batch_size])).asnumpy()
            for i in range(0, len(x), batch_size)]
    logits = np.concatenate(outs)
    return 100.0 * float((logits.argmax(1) == y.reshape(-1)).mean()), logits


def _check_args(args):
    """Option values argparse cannot check by itself."""
    chosen = [a for a in ('model', 'factory', 'symbol', 'onnx_model') if getattr(args, a)]
    if len(chosen) != 1:
        raise CliError('give exactly one of --model, --factory, --symbol, --onnx-model (got %s)'
                       % (', '.join('--' + c.replace('_', '-') for c in chosen) or 'none'))
    for flag in ('num_calib_examples', 'batch_size'):
        if getattr(args, flag) < 1:
            raise CliError('--%s must be at least 1, got %d' % (flag.replace('_', '-'),
                                                                getattr(args, flag)))
    if args.image_size is not None and min(args.image_size) < 1:
        raise CliError('--image-size H W must be positive, got %d %d' % tuple(args.image_size))
    if args.onnx_model and args.params:
        raise CliError('--onnx-model %s carries its weights: drop --params %s'
                       % (args.onnx_model, args.params))
    if not args.onnx_model and not args.params:
        raise CliError('--params (the float checkpoint) is required with --model, --factory '
                       'and --symbol')
    if args.openvino and not args.openvino.endswith('.xml'):
        raise CliError('--openvino %s: an OpenVINO IR path ends in .xml (the weights go to '
                       'the .bin beside it)' % args.openvino)
    if args.percentile is not None and args.calib_mode != 'percentile':
        raise CliError('--percentile is used only with --calib-mode percentile (got '
                       '--calib-mode %s)' % args.calib_mode)


def run(args):
    import gluonq
    from gluonq import debug, quant
    from gluonq.calibration.collect import CalibrationDataError
    t0 = time.time()
    _check_args(args)
    if not args.onnx_model:
        net = build_network(args)
        load_float_params(net, args.params)
    try:
        x = _calib_data(args)
    except CalibrationDataError as err:
        raise CliError('--calib %s: %s' % (args.calib, err)) from None
    if args.onnx_model:
        try:
            net = gluonq.import_onnx(args.onnx_model, (1,) + tuple(x.shape[1:])).net
        except gluonq.ONNXImportError as err:
            raise CliError('--onnx-model %s: %s' % (args.onnx_model, err)) from None
    outputs = [args.out + '.params', args.out + '.json'] + \
        [p for p in (args.onnx, args.report_png) if p] + \
        ([args.openvino, args.openvino[:-len('.xml')] + '.bin'] if args.openvino else []) + \
        [q + s for q in (args.export_fast, args.export_compact) if q
         for s in ('-symbol.json', '-0000.params')]
    clash = sorted({o for o in outputs if outputs.count(o) > 1})
    if clash:
        raise CliError('two outputs would be written to %s: give each its own path'
                       % ', '.join(clash))
    if not args.overwrite:
        existing = [o for o in outputs if os.path.exists(o)]
        if existing:
            raise CliError('refusing to overwrite %s (use --overwrite)' % ', '.join(existing))
    if args.eval:
        xe, ye = _eval_data(args, x)
    opts = {'percentile': args.percentile} if args.percentile is not None else None
    fallback = {}
    if args.max_drop is not None:
        if not args.eval:
            raise CliError('--max-drop %g needs --eval (the data the top-1 drop is measured on)'
                           % args.max_drop)

        def top1(n):
            n.hybridize()
            return _accuracy(n, xe, ye)[0]
        fallback = {'eval_fn': top1, 'max_drop': args.max_drop}
    try:
        qnet = gluonq.quantize_net(net, x, calib_mode=args.calib_mode, **fallback,
                                   num_calib_examples=args.num_calib_examples,
                                   per_channel=not args.per_tensor, act_dtype=args.act_dtype,
                                   act_scheme=args.act_scheme,
                                   bias_correction=args.bias_correction,
                                   exclude=args.exclude, batch_size=args.batch_size,
                                   calib_options=opts, progress=not args.quiet,
                                   weight_rounding=args.weight_rounding)
    except CalibrationDataError as err:
        raise CliError('--calib %s: %s' % (args.calib, err)) from None
    except ValueError as err:               # a setting the network rejects (--exclude, ...)
        raise CliError(str(err)) from None
    convert_s = time.time() - t0
    rows = debug.compare(net, qnet, x, num_examples=min(len(x), 128))
    # no timing in the summary: it goes into the sidecar, whose bytes depend only on the inputs
    summary = {'calib_examples': int(min(len(x), args.num_calib_examples))}
    if args.eval:
        net.hybridize()
        acc_f, lf = _accuracy(net, xe, ye)
        qnet.hybridize()
        acc_q, lq = _accuracy(qnet, xe, ye)
        summary.update({'fp32_top1': acc_f, 'int8_top1': acc_q,
                        'logit_sqnr_db': round(quant.sqnr_db(lf, lq), 2)})
    written = _write_outputs(args, qnet, rows, summary)
    _print_summary(qnet, rows, summary, written, convert_s)
    return 0


def _eval_data(args, x):
    """--eval inputs (transformed like the calibration data) and labels, checked against it."""
    xe, ye = load_array_data(args.eval, args.eval_key, args.eval_label_key, True)
    if args.transform:
        xe = np.asarray(_import(args.transform, '--transform')(xe))
    if xe.shape[1:] != x.shape[1:]:
        raise CliError('--eval %s: inputs have example shape %s, the calibration data %s'
                       % (args.eval, xe.shape[1:], x.shape[1:]))
    if len(ye.reshape(-1)) != len(xe):
        raise CliError('--eval %s: %d inputs but %d labels' % (args.eval, len(xe),
                                                               ye.size))
    return xe, ye


def _write_outputs(args, qnet, rows, summary):
    """Write every output under a temporary name in its folder, then move them all into
    place: a failure leaves no new file behind and every existing one as it was (also with
    --overwrite). Returns the paths written."""
    import gluonq
    from gluonq import debug

    def staged(path):
        folder, base = os.path.split(path)
        mark = '.gluonq-tmp-%d-' % os.getpid()
        return os.path.join(folder, mark + base), lambda written: [
            os.path.join(folder, os.path.basename(w)[len(mark):]) for w in written]

    jobs = [(args.out, lambda p: gluonq.save_quantized(qnet, p, extra={'summary': summary}))]
    if args.export_fast:
        jobs.append((args.export_fast, lambda p: gluonq.export_fast(qnet, p)))
    if args.export_compact:
        jobs.append((args.export_compact, lambda p: gluonq.export_compact(qnet, p)))
    if args.onnx:
        jobs.append((args.onnx, lambda p: [gluonq.export_onnx(
            qnet, p, weight_dtype=args.onnx_weights,
            round_float_results=args.onnx_round_float_results)]))
    if args.openvino:
        jobs.append((args.openvino, lambda p: list(gluonq.export_openvino(qnet, p))))
    if args.report_png:
        jobs.append((args.report_png, lambda p: [debug.plot(rows, p)]))
    temps, finals = [], []
    try:
        for path, write in jobs:
            tmp, final = staged(path)
            got = list(write(tmp))
            temps += got
            finals += final(got)
        for tmp, path in zip(temps, finals):
            os.replace(tmp, path)
        temps = []
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return finals


def _print_summary(qnet, rows, summary, written, convert_s):
    report = qnet.report
    int8 = [r for r in report if r['kind'].startswith('int8')]
    floats = [r for r in report if r['kind'] == 'float']
    print('layers: %d int8, %d float, %d folded/fused' % (
        len(int8), len(floats), len(report) - len(int8) - len(floats)))
    for r in floats:
        print('  float  %-40s %-16s %s' % (r['node'], r['op'], r['reason']))
    print()
    from gluonq.debug import format_table
    print(format_table(rows))
    print()
    if 'fp32_top1' in summary:
        print('top-1: fp32 %.2f%%  int8 %.2f%%  (drop %.2f points), logit SQNR %.1f dB' % (
            summary['fp32_top1'], summary['int8_top1'],
            summary['fp32_top1'] - summary['int8_top1'], summary['logit_sqnr_db']))
    warnings = qnet.spec['calibration']['warnings']
    for w in warnings:
        print('calibration warning:', w)
    print('converted in %.1f s; wrote %s' % (convert_s, ', '.join(written)))


def main(argv=None):
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(name)s: %(message)s')
    try:
        return run(args)
    except Exception as err:                        # pylint: disable=broad-except
        from gluonq.deploy.onnx import ONNXExportError
        if not isinstance(err, (CliError, FileExistsError, FileNotFoundError,
                                ONNXExportError)):
            raise
        print('gluonq-convert: error: %s' % err, file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
