"""Text images made at run time for rapidocr-onnxruntime's three pretrained ONNX models.

The models are the ones the rapidocr-onnxruntime wheel (Apache-2.0) ships: a text-line
classifier (upright vs rotated 180 degrees), a recognizer (CTC over a 6623-character
dictionary) and a DBNet text detector. Text is rendered with PIL and the DejaVu fonts that
matplotlib ships, and preprocessed exactly as rapidocr's own ``ch_ppocr_cls``,
``ch_ppocr_rec`` and ``ch_ppocr_det`` do (``cv2.resize``, scale to [-1, 1], zero padding
on the right). Every function takes a seed and is deterministic.

* ``model_path(kind)``: the ``.onnx`` file of ``'cls'``, ``'rec'`` or ``'det'``, found
  without importing rapidocr (its ``__init__`` imports heavy dependencies);
  ``logits_model(kind)``: cls or rec without its final Softmax.
* ``cls_batch(n, seed)``: ``(images (n, 3, 48, 192) float32, labels)``, label 0 upright, 1
  rotated by 180 degrees (half of each); ``shape=`` another input size.
* ``rec_batch(n, seed, width)``: ``(images (n, 3, 48, width) float32, strings)``.
* ``det_batch(n, seed, h, w)``: ``(pages (n, 3, h, w) float32, text masks (n, h, w) bool)``.
* ``charset()``: the recognizer's classes as rapidocr decodes them ('blank', the
  dictionary from the model's metadata key ``character``, ' ').
* ``ctc_greedy_decode(probs, charset)``: rapidocr's CTC decoding (argmax, merge repeats,
  drop blanks).
* Metrics: ``rec_scores(preds, truths)`` (exact match and character accuracy),
  ``det_scores(det_counts(probs, ref_probs))`` (binarized-map IoU, pixel F1 and box F1 of
  DBNet probability maps against reference maps; boxes from ``det_boxes``).
"""
import importlib.util
import math
import os

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

MODEL_FILES = {
    'cls': 'ch_ppocr_mobile_v2.0_cls_infer.onnx',
    'rec': 'ch_PP-OCRv4_rec_infer.onnx',
    'det': 'ch_PP-OCRv4_det_infer.onnx',
}
#: input shapes of rapidocr's config.yaml (cls_image_shape, rec_img_shape)
CLS_SHAPE = (3, 48, 192)
REC_HEIGHT = 48
FONT_FILES = ('DejaVuSans.ttf', 'DejaVuSans-Bold.ttf', 'DejaVuSerif.ttf',
              'DejaVuSansMono.ttf', 'DejaVuSans-Oblique.ttf')
WORDS = ('invoice', 'total', 'amount', 'date', 'street', 'order', 'number', 'price',
         'quality', 'model', 'station', 'meeting', 'report', 'north', 'river', 'garden',
         'market', 'window', 'summer', 'paper', 'Berlin', 'London', 'Paris', 'Tokyo',
         'OCR', 'text', 'line', 'page', 'data', 'value')

_CACHE = {}


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError('package %s is not installed (pip install gluonq[test])'
                                % name)
    return spec.submodule_search_locations[0]


def model_path(kind):
    """Path of rapidocr's ONNX model ``kind`` ('cls', 'rec' or 'det')."""
    if kind not in MODEL_FILES:
        raise ValueError("model kind must be one of %s, got %r" % (sorted(MODEL_FILES), kind))
    path = os.path.join(_package_dir('rapidocr_onnxruntime'), 'models', MODEL_FILES[kind])
    if not os.path.isfile(path):
        raise FileNotFoundError('rapidocr model %s not found' % path)
    return path


def logits_model(kind):
    """rapidocr's model ``kind`` ('cls' or 'rec') without its final Softmax (and the
    Identity after it), as an ``onnx.ModelProto`` whose output is the logits. The argmax,
    and so top-1 and CTC greedy decoding, is unchanged; the logits' SQNR measures the
    quantization error without the softmax saturating it (a confident prediction's
    probabilities hide most of the error, a flipped one dominates it)."""
    import onnx
    model = onnx.load(model_path(kind))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(graph.output[0].name)
    tail = []
    while node is not None and node.op_type == 'Identity':
        tail.append(node)
        node = producer.get(node.input[0])
    if node is None or node.op_type != 'Softmax':
        raise ValueError('rapidocr model %r does not end in a Softmax (ends in %s)'
                         % (kind, node.op_type if node is not None else 'an input'))
    tail.append(node)
    logits = node.input[0]
    keep = [n for n in graph.node if all(n is not t for t in tail)]
    del graph.node[:]
    graph.node.extend(keep)
    out = onnx.ValueInfoProto()
    out.CopyFrom(graph.output[0])          # a softmax keeps its input's type and shape
    out.name = logits
    del graph.output[:]
    graph.output.append(out)
    return model


def fonts():
    """Paths of the DejaVu fonts matplotlib ships."""
    d = os.path.join(_package_dir('matplotlib'), 'mpl-data', 'fonts', 'ttf')
    return [os.path.join(d, f) for f in FONT_FILES]


def _font(path, size):
    key = ('font', path, size)
    if key not in _CACHE:
        _CACHE[key] = ImageFont.truetype(path, size)
    return _CACHE[key]


def charset():
    """The recognizer's classes in output order: 'blank', the dictionary, ' '."""
    if 'charset' not in _CACHE:
        import onnx
        model = onnx.load(model_path('rec'), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        _CACHE['charset'] = ['blank'] + meta['character'].splitlines() + [' ']
    return _CACHE['charset']


def text_alphabet():
    """Dictionary characters the DejaVu fonts render: printable ASCII without space."""
    return [c for c in charset()[1:-1] if len(c) == 1 and c.isascii() and c.isprintable()
            and not c.isspace()]


# -- rendering ---------------------------------------------------------------------------
def render_line(text, font_path, size, rng):
    """BGR uint8 image of one text line (dark text on a light background, small margins,
    mild noise), as a camera crop of a line would look."""
    font = _font(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    mx, my = int(rng.randint(2, 10)), int(rng.randint(2, 8))
    w, h = right - left + 2 * mx, bottom - top + 2 * my
    bg = int(rng.randint(190, 256))
    fg = int(rng.randint(0, 80))
    img = Image.new('L', (w, h), color=bg)
    ImageDraw.Draw(img).text((mx - left, my - top), text, font=font, fill=fg)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, 4.0, arr.shape)
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    tint = rng.uniform(0.9, 1.0, size=3)
    return np.clip(gray[:, :, None] * tint[None, None, :], 0, 255).astype(np.uint8)


def _random_text(rng, min_words=1, max_words=4):
    k = int(rng.randint(min_words, max_words + 1))
    words = [WORDS[int(i)] for i in rng.randint(0, len(WORDS), size=k)]
    if rng.rand() < 0.5:
        words.append(str(int(rng.randint(0, 10000))))
    return ' '.join(words)


def _random_string(rng, alphabet, min_len, max_len):
    k = int(rng.randint(min_len, max_len + 1))
    return ''.join(alphabet[int(i)] for i in rng.randint(0, len(alphabet), size=k))


# -- rapidocr's preprocessing -------------------------------------------------------------
def cls_preprocess(img, shape=CLS_SHAPE):
    """rapidocr's ``TextClassifier.resize_norm_img``: height 48, width by aspect ratio up
    to 192, [-1, 1], zero padding on the right -> (3, 48, 192) float32."""
    img_c, img_h, img_w = shape
    h, w = img.shape[:2]
    ratio = w / float(h)
    resized_w = img_w if math.ceil(img_h * ratio) > img_w else int(math.ceil(img_h * ratio))
    resized = cv2.resize(img, (resized_w, img_h)).astype('float32')
    resized = resized.transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    out = np.zeros((img_c, img_h, img_w), dtype=np.float32)
    out[:, :, :resized_w] = resized
    return out


def rec_preprocess(img, width):
    """rapidocr's ``TextRecognizer.resize_norm_img`` for a batch padded to ``width``
    (its ``img_width = int(48 * max_wh_ratio)``) -> (3, 48, width) float32."""
    return cls_preprocess(img, (3, REC_HEIGHT, width))


def det_preprocess(img, limit_side_len=736, limit_type='min'):
    """rapidocr's ``DetPreProcess``: resize to multiples of 32 (by ``limit_type``), scale
    to [-1, 1] (mean 0.5, std 0.5) -> (1, 3, H, W) float32."""
    h, w = img.shape[:2]
    if limit_type == 'max':
        ratio = float(limit_side_len) / max(h, w) if max(h, w) > limit_side_len else 1.0
    else:
        ratio = float(limit_side_len) / min(h, w) if min(h, w) < limit_side_len else 1.0
    resize_h = int(round(int(h * ratio) / 32) * 32)
    resize_w = int(round(int(w * ratio) / 32) * 32)
    img = cv2.resize(img, (resize_w, resize_h))
    mean, std = np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 0.5])
    img = (img.astype('float32') * (1 / 255.0) - mean) / std
    return np.expand_dims(img.transpose((2, 0, 1)), axis=0).astype(np.float32)


# -- batches --------------------------------------------------------------------------------
def cls_batch(n, seed, shape=CLS_SHAPE):
    """``n`` preprocessed text lines of ``shape`` (rapidocr's is (3, 48, 192)) and labels
    (0 upright, 1 rotated 180 degrees); the labels alternate, so every batch is balanced."""
    rng = np.random.RandomState(seed)
    paths = fonts()
    images, labels = [], []
    for i in range(n):
        line = render_line(_random_text(rng), paths[int(rng.randint(len(paths)))],
                           int(rng.randint(22, 40)), rng)
        label = i % 2
        if label:
            line = cv2.rotate(line, cv2.ROTATE_180)
        images.append(cls_preprocess(line, shape))
        labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def rec_batch(n, seed, width=320):
    """``n`` preprocessed text lines of known strings (dictionary characters DejaVu
    renders) padded to ``width`` (a multiple of 8), and the strings."""
    rng = np.random.RandomState(seed)
    paths = fonts()
    alphabet = text_alphabet()
    max_chars = max(3, width // 20)
    images, strings = [], []
    for _ in range(n):
        if rng.rand() < 0.5:
            text = _random_text(rng, 1, max(1, max_chars // 8))[:max_chars].strip()
        else:
            text = _random_string(rng, alphabet, 3, max_chars)
        line = render_line(text, paths[int(rng.randint(len(paths)))],
                           int(rng.randint(26, 40)), rng)
        images.append(rec_preprocess(line, width))
        strings.append(text)
    return np.stack(images), strings


def det_batch(n, seed, h, w):
    """``n`` pages of ``h x w`` pixels (multiples of 32) with a few text lines each, as
    rapidocr preprocesses them (its resize is then the identity), and a boolean mask of the
    text lines' boxes."""
    if h % 32 or w % 32:
        raise ValueError('page size must be multiples of 32, got %dx%d' % (h, w))
    rng = np.random.RandomState(seed)
    paths = fonts()
    pages, masks = [], []
    for _ in range(n):
        bg = int(rng.randint(200, 256))
        page = np.full((h, w, 3), bg, dtype=np.uint8)
        mask = np.zeros((h, w), dtype=bool)
        y = int(rng.randint(2, 8))
        while True:
            size = int(rng.randint(12, 20))
            font = _font(paths[int(rng.randint(len(paths)))], size)
            text = _random_text(rng, 1, 3)
            left, top, right, bottom = font.getbbox(text)
            tw, th = right - left, bottom - top
            if y + th + 2 > h:
                break
            while tw > w - 4 and ' ' in text:
                text = text.rsplit(' ', 1)[0]
                left, top, right, bottom = font.getbbox(text)
                tw, th = right - left, bottom - top
            x = int(rng.randint(2, max(3, w - tw - 1)))
            img = Image.fromarray(page)
            ImageDraw.Draw(img).text((x - left, y - top), text, font=font,
                                     fill=(int(rng.randint(0, 80)),) * 3)
            page = np.asarray(img).copy()
            mask[y:y + th, x:min(w, x + tw)] = True
            y += th + int(rng.randint(4, 14))
        noisy = page.astype(np.float32) + rng.normal(0, 3.0, page.shape)
        page = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        pages.append(det_preprocess(page, limit_side_len=max(h, w), limit_type='max')[0])
        masks.append(mask)
    return np.stack(pages), np.stack(masks)


def ctc_greedy_decode(probs, charset):
    """rapidocr's ``CTCLabelDecode``: per row the argmax class per time step, repeats
    merged, blanks (class 0) dropped -> list of strings. ``probs``: (N, T, classes)."""
    probs = np.asarray(probs)
    out = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append(''.join(charset[i] for i in idx[keep]))
    return out


# -- metrics --------------------------------------------------------------------------------
#: rapidocr's DBPostProcess defaults (config.yaml: thresh, box_thresh, min_size)
DB_THRESH, DB_BOX_THRESH, DB_MIN_SIZE = 0.3, 0.5, 3


def edit_distance(a, b):
    """Levenshtein distance between two strings (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def rec_scores(preds, truths):
    """Recognition scores in percent: ``exact`` (strings equal) and ``char`` (character
    accuracy, 1 - total edit distance / total characters of ``truths``, at least 0)."""
    if len(preds) != len(truths) or not truths:
        raise ValueError('need as many predictions as truths (>0), got %d and %d'
                         % (len(preds), len(truths)))
    exact = sum(p == t for p, t in zip(preds, truths))
    edits = sum(edit_distance(p, t) for p, t in zip(preds, truths))
    chars = sum(len(t) for t in truths)
    return {'exact': 100.0 * exact / len(truths),
            'char': 100.0 * max(0.0, 1.0 - edits / max(chars, 1))}


def det_boxes(prob, thresh=DB_THRESH, box_thresh=DB_BOX_THRESH, min_size=DB_MIN_SIZE):
    """Text boxes of one DBNet probability map ``prob`` (H, W), as rapidocr's
    DBPostProcess finds them but axis-aligned and without unclipping (the rendered lines
    are horizontal): the connected regions of ``prob > thresh`` whose shorter side is at
    least ``min_size`` and whose mean probability is at least ``box_thresh``
    -> list of ``(x0, y0, x1, y1)`` (exclusive ends)."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError('det_boxes takes one (H, W) map, got shape %s' % (prob.shape,))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        (prob > thresh).astype(np.uint8), connectivity=8)
    boxes = []
    for k in range(1, count):
        x, y, w, h = (int(v) for v in stats[k, :4])
        if min(w, h) < min_size:
            continue
        if prob[labels == k].mean() < box_thresh:
            continue
        boxes.append((x, y, x + w, y + h))
    return boxes


def box_iou(a, b):
    """IoU of two ``(x0, y0, x1, y1)`` boxes."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def box_matches(boxes, ref_boxes, iou=0.5):
    """Boxes of ``boxes`` matched one to one with ``ref_boxes`` at IoU >= ``iou`` (greedy,
    highest IoU first) -> number of matches."""
    pairs = sorted(((box_iou(b, r), i, j) for i, b in enumerate(boxes)
                    for j, r in enumerate(ref_boxes)), reverse=True)
    used_b, used_r, matched = set(), set(), 0
    for v, i, j in pairs:
        if v < iou:
            break
        if i not in used_b and j not in used_r:
            used_b.add(i)
            used_r.add(j)
            matched += 1
    return matched


def det_counts(probs, ref_probs, thresh=DB_THRESH, iou=0.5):
    """Pixel and box counts of probability maps ``probs`` (N, 1, H, W) against reference
    maps ``ref_probs`` (the fp32 network's, or a text mask), binarized at ``thresh`` as
    DBPostProcess does -> dict of ints, which add up over batches (:func:`det_scores`):
    ``inter``/``union`` of the binarized maps, their pixels ``n_a``/``n_r``, boxes of
    :func:`det_boxes` ``n_boxes``/``n_ref`` and those ``matched`` one to one at IoU >=
    ``iou``."""
    probs, ref_probs = np.asarray(probs), np.asarray(ref_probs)
    if probs.shape != ref_probs.shape:
        raise ValueError('probability maps of shape %s against reference maps of shape %s'
                         % (probs.shape, ref_probs.shape))
    a = probs.reshape((-1,) + probs.shape[-2:])
    r = ref_probs.reshape(a.shape)
    ba, br = a > thresh, r > thresh
    counts = {'inter': int((ba & br).sum()), 'union': int((ba | br).sum()),
              'n_a': int(ba.sum()), 'n_r': int(br.sum()), 'matched': 0, 'n_boxes': 0,
              'n_ref': 0}
    for pa, pr in zip(a, r):
        boxes, ref = det_boxes(pa, thresh), det_boxes(pr, thresh)
        counts['matched'] += box_matches(boxes, ref, iou)
        counts['n_boxes'] += len(boxes)
        counts['n_ref'] += len(ref)
    return counts


def det_scores(counts):
    """Detection scores in percent from (summed) :func:`det_counts`: ``iou`` of the
    binarized maps, ``pixel_f1`` and box ``f1``; identical maps score 100."""
    def f1(hits, n1, n2):
        return 100.0 * 2 * hits / (n1 + n2) if n1 + n2 else 100.0
    return {'iou': 100.0 * counts['inter'] / counts['union'] if counts['union'] else 100.0,
            'pixel_f1': f1(counts['inter'], counts['n_a'], counts['n_r']),
            'f1': f1(counts['matched'], counts['n_boxes'], counts['n_ref'])}
