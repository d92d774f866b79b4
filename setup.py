"""gluonq: real int8 inference for MXNet Gluon networks."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, 'gluonq', '__init__.py')) as f:
    VERSION = re.search(r"^__version__ = '([^']+)'", f.read(), re.M).group(1)

# mxnet 1.9.1 (the last 1.x release) imports only with numpy<1.24; gluoncv's own
# dependencies must be held back so that pip never resolves numpy 2.
INSTALL_REQUIRES = [
    'mxnet==1.9.1',
    'numpy==1.23.5',
    'gluoncv==0.10.5.post0',
    'opencv-python<4.9',
    'matplotlib<3.9',
    'pandas<2.2',
    'scipy<1.12',
    'tqdm>=4.60',
]
ONNX_REQUIRES = [
    'onnx==1.18.0',          # the last onnx that mx.onnx.export_model works with
    'onnxruntime>=1.17',
    'ml_dtypes',             # onnxruntime.quantization needs these two
    'sympy',
]
OPENVINO_REQUIRES = ['openvino>=2024.6']
TEST_REQUIRES = [
    'pytest>=7',
    'pytest-xdist>=3.5',     # ./run.sh test runs one worker per core
    'hypothesis>=6.100',
    # three real pretrained ONNX models (text classifier, recognizer, detector) for the
    # real-model tests and the demo; Apache-2.0
    'rapidocr-onnxruntime==1.4.4',
]

setup(
    name='gluonq',
    version=VERSION,
    description='Real int8 quantization for MXNet Gluon networks: int8 blocks, a calibrating '
                'converter, and MXNet / ONNX deployment',
    long_description=open(os.path.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['gluonq', 'gluonq.*']),
    python_requires='>=3.8,<3.12',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'onnx': ONNX_REQUIRES,
        'openvino': ONNX_REQUIRES + OPENVINO_REQUIRES,
        'nncf': ONNX_REQUIRES + OPENVINO_REQUIRES + ['nncf'],   # benchmarks' anchor only
        'test': ONNX_REQUIRES + OPENVINO_REQUIRES + TEST_REQUIRES,
    },
    entry_points={'console_scripts': ['gluonq-convert=gluonq.cli:main']},
    license='Apache-2.0',
)
