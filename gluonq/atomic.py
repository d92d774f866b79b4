"""Atomic writing of output files, shared by every gluonq writer.

:func:`atomic_outputs` refuses to replace an existing file unless ``overwrite=True``, hands
out temporary files in the target folders and renames them into place together, so a
failure leaves nothing half-written.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ['atomic_outputs']


@contextlib.contextmanager
def atomic_outputs(paths, overwrite=False):
    """Yield temporary paths for ``paths``; on success move them into place together.

    Refuses existing targets unless ``overwrite``; on any error removes every temporary
    file and leaves the targets untouched.
    """
    paths = [os.path.abspath(p) for p in paths]
    if not overwrite:
        existing = [p for p in paths if os.path.exists(p)]
        if existing:
            raise FileExistsError('refusing to overwrite %s (pass overwrite=True / --overwrite)'
                                  % ', '.join(existing))
    temps = []
    try:
        for p in paths:
            folder = os.path.dirname(p) or '.'
            if not os.path.isdir(folder):
                raise FileNotFoundError('output folder %s does not exist' % folder)
            fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(p) + '.', suffix='.tmp',
                                       dir=folder)
            os.close(fd)
            temps.append(tmp)
        yield temps
        for tmp, p in zip(temps, paths):
            os.replace(tmp, p)
        temps = []
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
