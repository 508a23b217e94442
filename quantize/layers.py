"""Per-layer error of a quantized model against its float twin.

Both models are run with every intermediate tensor preserved; tensors are matched by
name and the quantized ones dequantized. The figures are end-to-end (errors accumulate
along the network), which is what tells where accuracy moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship._deps import require
from edgeship._io import atomic_write_bytes
from edgeship.runtime.interpreter import debug_interpreter


@dataclass(frozen=True)
class LayerError:
    """Error of one quantized tensor against the float model."""

    name: str
    op: str
    scale: float
    rmse: float
    rmse_per_scale: float
    sqnr_db: float
    input_sqnr_db: float | None = None

    @property
    def added_error_db(self) -> float:
        """How many dB of SQNR this op loses against its (quantized) inputs: its own harm."""
        return 0.0 if self.input_sqnr_db is None else self.input_sqnr_db - self.sqnr_db

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "added_error_db": self.added_error_db}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerError:
        """The inverse of :meth:`to_dict` (``added_error_db`` is recomputed)."""
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _producers(interp: Any) -> dict[int, str]:
    return {out: op["op_name"] for op in interp._get_ops_details() for out in op["outputs"]}  # noqa: SLF001


def _op_inputs(interp: Any) -> dict[int, list[int]]:
    return {out: [int(i) for i in op["inputs"] if i >= 0] for op in interp._get_ops_details() for out in op["outputs"]}  # noqa: SLF001


def layer_errors(
    float_model: bytes, quant_model: bytes, float_inputs: np.ndarray, quant_inputs: np.ndarray
) -> list[LayerError]:
    """Per-tensor error, worst SQNR first.

    ``float_inputs`` ``[N, ...]`` feed the float model and ``quant_inputs`` (the same images
    as the quantized model's typed input, made the way deployment makes them) the other.
    """
    f_int, q_int = debug_interpreter(float_model), debug_interpreter(quant_model)
    f_by_name = {d["name"]: d["index"] for d in f_int.get_tensor_details()}
    q_ops = _producers(q_int)
    pairs = []
    for d in q_int.get_tensor_details():
        scale, zp = d["quantization"]
        if d["index"] in q_ops and d["dtype"] in (np.int8, np.uint8) and scale > 0 and d["name"] in f_by_name:
            pairs.append((d["name"], q_ops[d["index"]], d["index"], f_by_name[d["name"]], scale, zp))
    sig = {p[0]: 0.0 for p in pairs}
    noise = {p[0]: 0.0 for p in pairs}
    count = {p[0]: 0 for p in pairs}
    q_in = q_int.get_input_details()[0]
    f_in = f_int.get_input_details()[0]["index"]
    for x, xq in zip(float_inputs, quant_inputs):
        f_int.set_tensor(f_in, x[None].astype(np.float32))
        f_int.invoke()
        q_int.set_tensor(q_in["index"], xq[None])
        q_int.invoke()
        for name, _, qi, fi, scale, zp in pairs:
            ref = f_int.get_tensor(fi).astype(np.float64)
            got = (q_int.get_tensor(qi).astype(np.float64) - zp) * scale
            if ref.shape != got.shape:
                continue
            sig[name] += float(np.sum(ref**2))
            noise[name] += float(np.sum((ref - got) ** 2))
            count[name] += ref.size
    sqnr_of: dict[int, float] = {}
    for name, _, qi, _, _, _ in pairs:
        if count[name]:
            sqnr_of[qi] = (
                float("inf") if noise[name] == 0 else float(10 * np.log10(max(sig[name], 1e-30) / noise[name]))
            )
    inputs = _op_inputs(q_int)
    out = []
    for name, op, qi, _, scale, _ in pairs:
        if not count[name]:
            continue
        rmse = float(np.sqrt(noise[name] / count[name]))
        upstream = [sqnr_of[i] for i in inputs.get(qi, []) if i in sqnr_of]
        out.append(
            LayerError(name, op, float(scale), rmse, rmse / scale, sqnr_of[qi], min(upstream) if upstream else None)
        )
    return sorted(out, key=lambda e: e.sqnr_db)


#: Ops that only move data: they add no quantization error of their own.
DATA_MOVEMENT = ("RESHAPE", "STRIDED_SLICE", "SQUEEZE", "TRANSPOSE", "QUANTIZE", "DEQUANTIZE", "CONCATENATION")


def most_harmful(errors: list[LayerError]) -> list[LayerError]:
    """Layers ordered by the error they add themselves (not the error they inherit)."""
    own = [e for e in errors if e.op not in DATA_MOVEMENT]
    return sorted(own, key=lambda e: (-e.added_error_db, e.sqnr_db))


def plot_worst(errors: list[LayerError], path: Path, *, count: int = 10, title: str = "") -> Path:
    """Horizontal bar chart of the ``count`` worst tensors by SQNR (PNG, written atomically)."""
    require("matplotlib", purpose="plot per-layer errors")
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = errors[:count]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(worst) + 1.5))
    labels = [f"{e.op}: {_short(e.name)}" for e in worst]
    ax.barh(range(len(worst)), [e.sqnr_db for e in worst], color="#c0504d")
    ax.set_yticks(range(len(worst)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR vs float (dB, higher is better)")
    ax.set_title(title or f"{len(worst)} tensors with the largest quantization error")
    for i, e in enumerate(worst):
        ax.text(e.sqnr_db, i, f" {e.sqnr_db:.1f} dB, rmse/scale {e.rmse_per_scale:.2f}", va="center", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _short(name: str, width: int = 48) -> str:
    name = name.split(";")[0]
    return name if len(name) <= width else "…" + name[-width + 1 :]
