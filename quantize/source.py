"""What ``quantize`` starts from: a conversion in memory, a saved convert folder, or an ONNX file converted now
(or the conversion of exactly that file already saved in the output folder)."""

from __future__ import annotations

import os
from pathlib import Path

from edgeship._io import sha256_file
from edgeship._progress import Progress, silent
from edgeship.convert.converter import convert
from edgeship.convert.result import FLOAT32_FILE, ConvertResult
from edgeship.errors import InputError
from edgeship.runtime.card import CARD_FILE, ModelCard


def float_source(model: ConvertResult | str | os.PathLike[str], progress: Progress = silent) -> ConvertResult:
    """The float model to quantize: a conversion, a saved convert folder, or an ONNX file converted now."""
    if isinstance(model, ConvertResult):
        return model
    path = Path(model)
    if path.is_dir():
        return ConvertResult.load(path)
    if path.is_file():
        return convert(path, progress=progress)
    raise InputError(f"model {path} does not exist")


def conversion_for(model: Path, out: Path, *, force: bool) -> ConvertResult | Path:
    """What ``quantize MODEL -o OUT`` quantizes: a convert folder as it is; for an ONNX file, the
    conversion of exactly that file already saved in OUT (unless ``force``), else the file (converted
    by :func:`quantize`; :meth:`QuantizeResult.save_with_source` writes the conversion into OUT too)."""
    if model.is_file() and not force:
        return reusable_conversion(out, model) or model
    return model


def reusable_conversion(folder: Path, onnx: Path) -> ConvertResult | None:
    """The conversion of exactly this ONNX file saved in ``folder``, if there is one."""
    if not (folder / CARD_FILE).is_file() or not (folder / FLOAT32_FILE).is_file():
        return None
    if ModelCard.load(folder / CARD_FILE).source_sha256 != sha256_file(onnx):
        return None
    return ConvertResult.load(folder)
