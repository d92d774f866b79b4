"""A table of one handler per step kind, filled by a decorator (as onnxruntime's
quantization/registry.py and mx2onnx's ``_op_translations``): the lowering and the ONNX
export each keep one."""
from __future__ import annotations

__all__ = ['Registry']


class Registry(dict):
    """step kind (the block class a step names) -> handler function."""

    def handles(self, *kinds):
        """Register the decorated function as the handler of the steps of ``kinds``."""
        def register(fn):
            for kind in kinds:
                self[kind] = fn
            return fn
        return register
