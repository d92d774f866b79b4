"""int8 accuracy on real pretrained networks: gluonq against onnxruntime and NNCF.

The networks are rapidocr-onnxruntime's three ONNX models (``examples/ocr_data.py``): the
text-line classifier ``cls`` (upright or rotated 180 degrees), the recognizer ``rec`` (CTC)
and the DBNet text detector ``det``, on text rendered at run time (calibration and test
images from different seeds). cls and rec are taken without their final softmax
(``ocr_data.logits_model``: the same argmax, and an SQNR of the logits, which a softmax
would saturate), det as shipped. Every system below quantizes that same float ONNX model
with the same calibration images:

* ``fp32``: the float network of ``gluonq.import_onnx`` (the reference of every score), and
  onnxruntime on the float ONNX file (its largest deviation from the import is printed);
* ``gluonq <mode>`` for every ``calib_mode`` (naive, percentile, entropy, mse), and with
  ``--recipes`` also ``act_scheme='auto'`` (``auto``), ``bias_correction=True`` (``bc``) or
  both (``auto+bc``): ``gluonq.quantize_net`` of the imported network, run ``eager`` (the
  reference chain), ``fast`` (``qnet.hybridize()``: oneDNN's fused int8 kernels) and
  ``onnx`` (``gluonq.export_onnx`` in onnxruntime, default weight type);
* ``ORT quantize_static``: onnxruntime's own quantizer (``quant_pre_process``, QDQ, uint8
  activations, int8 weights) per channel with MinMax, Entropy and Percentile calibration
  (its default options), and per tensor with MinMax (``bench_onnx.ort_quantize_static``).
  Its Entropy and Percentile calibrators keep every intermediate output of every
  calibration image in memory (they ignore ``CalibMaxIntermediateOutputs``): rec with 128
  images of 48x320 was killed at 23 GB on a 24 GB machine. There, pass ``--ort
  'per-channel MinMax,per-tensor MinMax'`` or fewer ``--n-calib``;
* ``nncf.quantize`` (its defaults: MinMax and FastBiasCorrection), if nncf is installed (it
  is not one of gluonq's dependencies).

Metrics, pooled over the test images; SQNR is the output's signal-to-noise ratio against
the fp32 import (logits of cls and rec, det's probability map):

* cls: top-1 against the labels, predictions changed from fp32;
* rec: exact match and character accuracy of the CTC greedy decoding against the rendered
  strings, strings equal to fp32's;
* det: IoU of the binarized probability map (threshold 0.3, as rapidocr's DBPostProcess),
  pixel F1 and box F1 (boxes matched at IoU 0.5) against fp32's; fp32 against the rendered
  text boxes is printed below the table.

Printed: one markdown table per model (conversion time: the quantizer's wall and CPU
seconds on the calibration images, export excluded), the ops each gluonq network kept
float (``qnet.report``, grouped), and a JSON line per variant. A variant that fails is a
table row with its error. Threads: ``--threads`` for onnxruntime; MXNet follows
``OMP_NUM_THREADS``.

    python benchmarks/bench_real_models.py
    python benchmarks/bench_real_models.py --models cls --n-calib 128 --n-test 1000
    python benchmarks/bench_real_models.py --models det --det-size 480x640 --modes naive
    python benchmarks/bench_real_models.py --modes naive,mse --recipes plain,auto,auto+bc
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections import OrderedDict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'examples'))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import mxnet as mx                                   # noqa: E402

import gluonq                                        # noqa: E402
import gluonq.lower                                  # noqa: E402
import ocr_data                                      # noqa: E402
from bench_inference import run_session, session     # noqa: E402
from bench_onnx import ort_quantize_static           # noqa: E402

CALIB_MODES = ('naive', 'percentile', 'entropy', 'mse')
GLUONQ_RUNS = ('eager', 'fast', 'onnx')
#: onnxruntime quantize_static configurations: label -> (per_channel, method)
ORT_CONFIGS = OrderedDict([
    ('per-channel MinMax', (True, 'MinMax')),
    ('per-channel Entropy', (True, 'Entropy')),
    ('per-channel Percentile', (True, 'Percentile')),
    ('per-tensor MinMax', (False, 'MinMax')),
])
CALIB_SEED, TEST_SEED = 1000, 0
#: the reference of every score: the fp32 network of gluonq.import_onnx
REF = ('fp32', '-', 'gluon import')


# ---------------------------------------------------------------------------------------
# the three tasks: data and streaming scores, one small class each
# ---------------------------------------------------------------------------------------
class _Scores:
    """Running SQNR against the reference outputs (signal and noise power summed)."""

    def __init__(self):
        self.signal = self.noise = 0.0

    def add(self, out, ref, truth):
        ref = np.asarray(ref, np.float64)
        err = np.asarray(out, np.float64) - ref
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(err * err))

    def result(self):
        if self.noise == 0.0:
            sq = float('inf')
        else:
            sq = 10.0 * np.log10(self.signal / self.noise) if self.signal else float('-inf')
        return {'sqnr_db': sq}


class _ClsScores(_Scores):
    def __init__(self):
        super().__init__()
        self.right = self.changed = self.n = 0

    def add(self, out, ref, truth):
        super().add(out, ref, truth)
        pred = np.asarray(out).argmax(1)
        self.right += int((pred == truth).sum())
        self.changed += int((pred != np.asarray(ref).argmax(1)).sum())
        self.n += len(truth)

    def result(self):
        r = super().result()
        r.update(top1=100.0 * self.right / self.n, changed=self.changed)
        return r


class _RecScores(_Scores):
    def __init__(self):
        super().__init__()
        self.preds, self.truths, self.same = [], [], 0

    def add(self, out, ref, truth):
        super().add(out, ref, truth)
        charset = ocr_data.charset()
        preds = ocr_data.ctc_greedy_decode(out, charset)
        refs = ocr_data.ctc_greedy_decode(ref, charset)
        self.same += sum(p == r for p, r in zip(preds, refs))
        self.preds += preds
        self.truths += list(truth)

    def result(self):
        r = super().result()
        s = ocr_data.rec_scores(self.preds, self.truths)
        r.update(exact=s['exact'], char=s['char'],
                 same_as_fp32=100.0 * self.same / len(self.truths))
        return r


class _DetScores(_Scores):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def add(self, out, ref, truth):
        super().add(out, ref, truth)
        for k, v in ocr_data.det_counts(out, ref).items():
            self.counts[k] = self.counts.get(k, 0) + v

    def result(self):
        r = super().result()
        r.update(ocr_data.det_scores(self.counts))
        r.update(boxes=self.counts['n_boxes'], ref_boxes=self.counts['n_ref'])
        return r


def _save_logits_model(kind, workdir):
    import onnx
    path = os.path.join(workdir, '%s-logits.onnx' % kind)
    onnx.save(ocr_data.logits_model(kind), path)
    return path


class ClsTask:
    """The text-line classifier without its softmax: logits, top-1 against the labels."""
    kind, scores, batch, output = 'cls', _ClsScores, 64, 'logit'
    #: options of onnxruntime's quant_pre_process: its symbolic shape inference fails on
    #: rec and det without auto_merge (free spatial sizes) and on cls in any case (an
    #: assertion on a Concat of axis -1), so cls skips it (ONNX's own shape inference runs)
    ort_pre_process = {'skip_symbolic_shape': True}
    columns = (('top-1', 'top1', '%.2f'), ('changed vs fp32', 'changed', '%d'))

    def __init__(self, args):
        self.shape = ocr_data.CLS_SHAPE

    def float_model(self, workdir):
        return _save_logits_model(self.kind, workdir)

    def data(self, n, seed):
        return ocr_data.cls_batch(n, seed, self.shape)


class RecTask:
    """The recognizer without its softmax: logits, CTC greedy decoding of their argmax."""
    kind, scores, batch, output = 'rec', _RecScores, 16, 'logit'
    ort_pre_process = {'auto_merge': True}
    columns = (('exact match', 'exact', '%.2f'), ('char acc', 'char', '%.2f'),
               ('same string as fp32', 'same_as_fp32', '%.2f'))

    def __init__(self, args):
        self.shape = (3, ocr_data.REC_HEIGHT, args.rec_width)

    def float_model(self, workdir):
        return _save_logits_model(self.kind, workdir)

    def data(self, n, seed):
        return ocr_data.rec_batch(n, seed, self.shape[2])


class DetTask:
    """The detector as shipped: its probability map, binarized as DBPostProcess does."""
    kind, scores, batch, output = 'det', _DetScores, 4, 'map'
    ort_pre_process = {'auto_merge': True}
    columns = (('map IoU vs fp32', 'iou', '%.2f'), ('pixel F1 vs fp32', 'pixel_f1', '%.2f'),
               ('box F1 vs fp32', 'f1', '%.2f'))

    def __init__(self, args):
        h, w = (int(v) for v in args.det_size.split('x'))
        self.shape = (3, h, w)

    def float_model(self, workdir):
        return ocr_data.model_path(self.kind)

    def data(self, n, seed):
        return ocr_data.det_batch(n, seed, self.shape[1], self.shape[2])


TASKS = {'cls': ClsTask, 'rec': RecTask, 'det': DetTask}


# ---------------------------------------------------------------------------------------
# the variants: each a function numpy batch -> numpy output
# ---------------------------------------------------------------------------------------
class _Timer:
    """Wall and CPU (process) seconds of a block: the machine may be shared, and CPU time
    is less affected by other jobs."""

    def __enter__(self):
        self.wall, self.cpu = time.time(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.time() - self.wall, time.process_time() - self.cpu

    @property
    def seconds(self):
        return (self.wall, self.cpu)


def _mx_runner(fn):
    return lambda x: fn(mx.nd.array(x)).asnumpy()


#: --recipes: gluonq's settings beyond calib_mode, each measured with every --modes
RECIPES = OrderedDict([
    ('plain', {}),
    ('auto', {'act_scheme': 'auto'}),
    ('bc', {'bias_correction': True}),
    ('auto+bc', {'act_scheme': 'auto', 'bias_correction': True}),
])


def gluonq_variants(net, calib, mode, shape, path, threads, **options):
    """``gluonq <mode>`` (with ``quantize_net`` ``options``) run eager, fast and from its
    ONNX export (written to ``path``) -> ({run: fn or the exception of its export},
    conversion seconds, report)."""
    with _Timer() as t:
        qnet = gluonq.quantize_net(net, calib, calib_mode=mode, progress=False, **options)
    out_key = qnet.spec['outputs'][0]
    runs = OrderedDict()
    # the reference chain stays eager after hybridize(): its steps are not hybridized
    runs['eager'] = _mx_runner(lambda x: qnet.forward_all(x)[out_key])
    qnet.hybridize()
    runs['fast'] = _mx_runner(qnet)
    try:
        gluonq.export_onnx(qnet, path, input_shape=(1,) + tuple(shape), overwrite=True,
                           calib_data=calib)
        sess = session(path, threads)
        runs['onnx'] = lambda x: run_session(sess, x)
    except Exception as err:                                     # noqa: BLE001
        runs['onnx'] = err
    return runs, t.seconds, qnet.report


def ort_variant(src, calib, per_channel, method, pre_process, path, threads):
    with _Timer() as t:
        ort_quantize_static(src, path, calib, per_channel=per_channel, method=method,
                            pre_process_options=pre_process)
    sess = session(path, threads)
    return (lambda x: run_session(sess, x)), t.seconds


def nncf_variant(src, calib, path, threads):
    import nncf
    import onnx
    model = onnx.load(src)
    name = model.graph.input[0].name
    data = nncf.Dataset([{name: calib[i:i + 1]} for i in range(len(calib))])
    with _Timer() as t:
        q = nncf.quantize(model, data, subset_size=len(calib))
    onnx.save(q, path)
    sess = session(path, threads)
    return (lambda x: run_session(sess, x)), t.seconds


def float_ops(report):
    """The report's float ops grouped by op and reason, with tensor names in the reason
    (words with an underscore and a digit) replaced by ``<name>`` -> [(reason, count,
    first node names)]."""
    groups = OrderedDict()
    for r in report:
        if r['kind'] == 'float':
            reason = re.sub(r'\b(?=\w*_)(?=\w*\d)\w+\b', '<name>', r['reason'])
            groups.setdefault('%s: %s' % (r['op'], reason), []).append(r['node'])
    return [(reason, len(nodes), nodes[:4]) for reason, nodes in groups.items()]


# ---------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------
def build_variants(task, args, src, net, calib, workdir):
    """Every variant of the float model ``src`` (``net``: its import) -> ({(system,
    calibration, run): fn or exception}, {(system, calibration): (wall, cpu) conversion
    seconds}, {mode: qnet.report})."""
    variants, conv, reports = OrderedDict(), {}, {}
    sess = session(src, args.threads)
    variants[REF] = _mx_runner(net)
    variants[('fp32', '-', 'onnxruntime')] = lambda x: run_session(sess, x)
    for mode in args.modes:
        for recipe in args.recipes:
            label = mode if recipe == 'plain' else '%s, %s' % (mode, recipe)
            key = ('gluonq', label)
            try:
                runs, conv[key], reports[label] = gluonq_variants(
                    net, calib, mode, task.shape, os.path.join(workdir, '%s-gluonq-%s-%s.onnx'
                                                               % (task.kind, mode, recipe)),
                    args.threads, **RECIPES[recipe])
            except Exception as err:                             # noqa: BLE001
                traceback.print_exc()
                runs = {r: err for r in GLUONQ_RUNS}
            for r, fn in runs.items():
                variants[key + (r,)] = fn
            print('# %s: gluonq %s converted in %s s' % (task.kind, label,
                                                         _fmt_s(conv.get(key))), flush=True)
    for label in args.ort:
        per_channel, method = ORT_CONFIGS[label]
        key = ('ORT quantize_static', label)
        path = os.path.join(workdir, '%s-ort-%s.onnx' % (task.kind, label.replace(' ', '-')))
        try:
            fn, conv[key] = ort_variant(src, calib, per_channel, method, task.ort_pre_process,
                                        path, args.threads)
        except Exception as err:                                 # noqa: BLE001
            traceback.print_exc()
            fn = err
        variants[key + ('onnxruntime',)] = fn
        print('# %s: ORT %s in %s s' % (task.kind, label, _fmt_s(conv.get(key))), flush=True)
    if not args.no_nncf:
        key = ('nncf.quantize', 'MinMax + FastBiasCorrection')
        path = os.path.join(workdir, task.kind + '-nncf.onnx')
        try:
            variants[key + ('onnxruntime',)], conv[key] = nncf_variant(src, calib, path,
                                                                       args.threads)
        except ImportError as err:
            print('# nncf is not installed (%s): its row is skipped' % err)
        except Exception as err:                                 # noqa: BLE001
            traceback.print_exc()
            variants[key + ('onnxruntime',)] = err
        print('# %s: nncf in %s s' % (task.kind, _fmt_s(conv.get(key))), flush=True)
    return variants, conv, reports


def evaluate(task, variants, x_test, truth):
    """Scores of every variant against the fp32 import, batch by batch (the outputs of one
    batch only are held) -> ({key: result}, {key: exception}, extra)."""
    scores = {k: task.scores() for k, v in variants.items() if not isinstance(v, Exception)}
    errors = {k: v for k, v in variants.items() if isinstance(v, Exception)}
    gt = task.scores() if task.kind == 'det' else None
    max_dev = 0.0
    for i in range(0, len(x_test), task.batch):
        xb, tb = x_test[i:i + task.batch], truth[i:i + task.batch]
        ref = variants[REF](xb)
        if gt is not None:                  # fp32 against the rendered text boxes
            gt.add(ref, tb[:, None].astype(np.float32), None)
        for k in list(scores):
            try:
                out = ref if k == REF else variants[k](xb)
            except Exception as err:                             # noqa: BLE001
                errors[k] = err
                del scores[k]
                continue
            if k == ('fp32', '-', 'onnxruntime'):
                max_dev = max(max_dev, float(np.abs(out - ref).max() / np.abs(ref).max()))
            scores[k].add(out, ref, tb)
    extra = {'ort_fp32_max_rel_dev': max_dev}
    if gt is not None:
        extra['fp32_vs_text_boxes'] = gt.result()
    return {k: v.result() for k, v in scores.items()}, errors, extra


def run_model(task, args, workdir):
    """Build, run and score every variant of one model -> (rows, extra)."""
    src = task.float_model(workdir)
    with _Timer() as t:
        net = gluonq.import_onnx(src, (1,) + tuple(task.shape)).net
        net.hybridize(static_alloc=True)
    print('# %s: import_onnx %.1f s, input %s' % (task.kind, t.wall, (1,) + tuple(task.shape)),
          flush=True)
    with _Timer() as t:
        calib, _ = task.data(args.n_calib, CALIB_SEED)
        x_test, truth = task.data(args.n_test, TEST_SEED)
    print('# %s: rendered %d calibration and %d test images in %.1f s'
          % (task.kind, len(calib), len(x_test), t.wall), flush=True)
    variants, conv, reports = build_variants(task, args, src, net, calib, workdir)
    with _Timer() as t:
        results, errors, extra = evaluate(task, variants, x_test, truth)
    print('# %s: evaluated in %.1f s' % (task.kind, t.wall), flush=True)
    rows = []
    for k in variants:
        row = {'model': task.kind, 'system': k[0], 'calibration': k[1], 'run': k[2],
               'conversion_s': conv.get(k[:2])}
        if k in errors:
            row['error'] = '%s: %s' % (type(errors[k]).__name__, str(errors[k])[:300])
        else:
            row.update(results[k])
        rows.append(row)
        print(json.dumps(row), flush=True)
    extra.update(n_calib=len(calib), n_test=len(x_test),
                 float_ops=float_ops(next(iter(reports.values()))) if reports else None)
    return rows, extra


def _fmt_s(v):
    return '-' if v is None else '%.1f (%.1f)' % tuple(v)


def _fmt(fmt, v):
    if v is None:
        return '-'
    if isinstance(v, float) and not np.isfinite(v):
        return 'inf' if v > 0 else '-inf'
    return fmt % v


def print_table(task, rows, extra):
    fp32 = next(r for r in rows if r['run'] == 'gluon import')
    main_key = task.columns[0][1]
    print('\n### %s (%s, %d calibration images, %d test images)\n'
          % (task.kind, 'x'.join(str(s) for s in task.shape), extra['n_calib'],
             extra['n_test']))
    head = ['system', 'calibration', 'runs on'] + [c[0] for c in task.columns]
    head += ['drop vs fp32', '%s SQNR dB' % task.output, 'conversion s: wall (CPU)']
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    for r in rows:
        cells = [r['system'], r['calibration'], r['run']]
        if 'error' in r:
            cells += ['**%s**' % r['error'].replace('|', '/').replace('\n', ' ')]
            cells += [''] * (len(head) - len(cells) - 1)
        else:
            cells += [_fmt(fmt, r.get(key)) for _, key, fmt in task.columns]
            drop = fp32[main_key] - r[main_key]
            cells += ['%+.2f' % drop if r is not fp32 else '-',
                      _fmt('%.1f', r['sqnr_db']) if r is not fp32 else '-']
        cells.append(_fmt_s(r['conversion_s']))
        print('| ' + ' | '.join(cells) + ' |')
    print('\nonnxruntime fp32 against the gluon import: max |diff| / max |ref| = %.2e'
          % extra['ort_fp32_max_rel_dev'])
    if 'fp32_vs_text_boxes' in extra:
        g = extra['fp32_vs_text_boxes']
        print('fp32 against the rendered text boxes: map IoU %.2f, pixel F1 %.2f, box F1 '
              '%.2f (%d boxes found, %d lines)' % (g['iou'], g['pixel_f1'], g['f1'],
                                                  g['boxes'], g['ref_boxes']))
    if extra['float_ops'] is not None:
        n = sum(c for _, c, _ in extra['float_ops'])
        print('\ngluonq kept %d ops float:' % n)
        for reason, count, nodes in extra['float_ops']:
            print('- %d x %s (e.g. %s)' % (count, reason, ', '.join(nodes)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', default='cls,rec,det')
    p.add_argument('--modes', default=','.join(CALIB_MODES),
                   help='gluonq calib_modes, comma-separated')
    p.add_argument('--recipes', default='plain',
                   help='gluonq settings per mode, comma-separated, of: %s (auto: '
                   "act_scheme='auto'; bc: bias_correction=True)" % ', '.join(RECIPES))
    p.add_argument('--ort', default=','.join(ORT_CONFIGS),
                   help='onnxruntime configurations, comma-separated, of: %s'
                   % ', '.join(ORT_CONFIGS))
    p.add_argument('--no-nncf', action='store_true', help='leave nncf out')
    p.add_argument('--n-calib', type=int, default=None,
                   help='calibration images (default: 128 for cls and rec, 32 for det)')
    p.add_argument('--n-test', type=int, default=None,
                   help='test images (default: 1000 for cls, 200 for rec, 32 for det)')
    p.add_argument('--rec-width', type=int, default=320)
    p.add_argument('--det-size', default='320x320', help='HxW, multiples of 32')
    p.add_argument('--threads', type=int, default=2, help='onnxruntime intra-op threads')
    p.add_argument('--workdir', default=None)
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(',') if m]
    args.ort = [c for c in args.ort.split(',') if c]
    args.recipes = [r for r in args.recipes.split(',') if r]
    if set(args.recipes) - set(RECIPES):
        p.error('--recipes: unknown %s; known: %s' % (sorted(set(args.recipes) -
                                                            set(RECIPES)), list(RECIPES)))
    unknown = [c for c in args.ort if c not in ORT_CONFIGS]
    if unknown:
        p.error('--ort: unknown configuration(s) %s; known: %s' % (unknown, list(ORT_CONFIGS)))
    workdir = args.workdir or tempfile.mkdtemp(prefix='gluonq_bench_real_')
    os.makedirs(workdir, exist_ok=True)
    print('# load average at start: %.2f %.2f %.2f on %d cpus; int8 kernels exact: %s'
          % (os.getloadavg() + (os.cpu_count(), gluonq.lower.int8_kernels_exact())))
    t0 = time.time()
    tables = []
    for kind in args.models.split(','):
        task = TASKS[kind](args)
        n_calib, n_test = args.n_calib, args.n_test
        args.n_calib = n_calib or (32 if kind == 'det' else 128)
        args.n_test = n_test or {'cls': 1000, 'rec': 200, 'det': 32}[kind]
        rows, extra = run_model(task, args, workdir)
        args.n_calib, args.n_test = n_calib, n_test
        tables.append((task, rows, extra))
    for task, rows, extra in tables:
        print_table(task, rows, extra)
    print('\n# total %.0f s; load average at end: %.2f %.2f %.2f'
          % ((time.time() - t0,) + os.getloadavg()))


if __name__ == '__main__':
    main()
