"""The result of ``quantize``: the model, its card and report, saved and loaded as one set of files."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeship._io import atomic_write_bytes, atomic_write_json, check_outputs_free, staged_output
from edgeship._paths import check_apart
from edgeship.convert.result import ConvertResult, sha256
from edgeship.errors import AccuracyDriftError, InputError
from edgeship.quantize.interface import with_io_dtype
from edgeship.quantize.options import QuantizeOptions
from edgeship.quantize.report import Interface, QuantizeReport
from edgeship.quantize.search_report import MixedPrecision
from edgeship.quantize.tflite_quant import op_names
from edgeship.runtime.card import IODtype, ModelCard, TensorSpec
from edgeship.runtime.delegation import of_interpreter
from edgeship.runtime.interpreter import TFLiteModel
from edgeship.runtime.metrics import DriftFigures

INT8_FILE = "model_int8.tflite"
INT8_CARD = "model_int8.card.json"
OVER_BUDGET_FILE = "model_int8_OVER_BUDGET.tflite"
OVER_BUDGET_CARD = "model_int8_OVER_BUDGET.card.json"
#: Written beside the output when that is not faster than float32 and the all-int8 model is.
FAST_FILE = "model_int8_FAST.tflite"
FAST_CARD = "model_int8_FAST.card.json"
REPORT_FILE = "quant_report.json"
LAYER_PLOT = "layer_errors.png"


@dataclass(frozen=True)
class QuantizeResult:
    """A quantized model, in memory: nothing is written until :meth:`save`.

    Attributes:
        model: The int8 (or mixed) TFLite flatbuffer.
        card: Its model card.
        figures: Drift against the float model on the evaluation images.
        report: Quantization report (ranges, delegation, per-layer errors, budget, timings).
        within_budget: False when a budget was given (``max_drop``, ``min_sqnr_db``) and
            not met; the model is then the best one found.
        source: The conversion it was made from.
        layer_plot: PNG of the worst tensors' errors.
        folder: Where the result was saved (None: only in memory).
    """

    model: bytes = field(repr=False)
    card: ModelCard
    figures: DriftFigures
    report: QuantizeReport = field(repr=False)
    within_budget: bool = True
    source: ConvertResult | None = field(default=None, repr=False)
    layer_plot: bytes | None = field(default=None, repr=False)
    folder: Path | None = None
    #: The all-int8 model, when the written one is under ``options.min_speedup`` x float32 at 1 thread and
    #: this one is faster (saved as ``model_int8_FAST.tflite``); the report's ``speed`` says why.
    faster: bytes | None = field(default=None, repr=False)

    @property
    def model_file(self) -> str:
        return INT8_FILE if self.within_budget else OVER_BUDGET_FILE

    @property
    def model_path(self) -> Path | None:
        """The saved model (None until saved)."""
        return self.folder / self.model_file if self.folder else None

    @property
    def layer_plot_path(self) -> Path | None:
        """Where the per-layer error plot was saved (None: not saved, or no plot)."""
        return self.folder / LAYER_PLOT if self.folder is not None and self.layer_plot else None

    def save(self, out_dir: str | os.PathLike[str], *, force: bool = False) -> QuantizeResult:
        """Write the model, its card, the report and the layer plot into ``out_dir`` as one set.

        An over-budget model is written as ``model_int8_OVER_BUDGET.tflite``. With ``force``,
        the other outcome's files from an earlier run are removed so they cannot be mistaken.
        """
        out = Path(out_dir)
        images = {"the calibration folder": self.report.calibration.folder}  # a save there feeds the next calibration
        check_apart(out, {**images, "the evaluation folder": self.report.evaluation.folder}, "save folder")
        card_file = INT8_CARD if self.within_budget else OVER_BUDGET_CARD
        other: tuple[str, ...] = (OVER_BUDGET_FILE, OVER_BUDGET_CARD) if self.within_budget else (INT8_FILE, INT8_CARD)
        fast = (FAST_FILE, FAST_CARD)
        other += () if self.faster is not None else fast
        labels = self.source.labels if self.source and self.card.labels_file else None
        labels_file = [self.card.labels_file] if labels and self.card.labels_file else []
        names = [self.model_file, card_file, REPORT_FILE, LAYER_PLOT, *labels_file]
        names += list(fast) if self.faster is not None else []
        same_labels = labels is not None and _holds(out / str(self.card.labels_file), labels)
        check_outputs_free(out, [*names, *other], force=force)  # the other outcome's files count as outputs too
        with staged_output(
            out, [n for n in names if not (same_labels and n == self.card.labels_file)], force=force
        ) as stage:
            atomic_write_bytes(stage / self.model_file, self.model)
            atomic_write_json(stage / card_file, self.card.to_dict())
            atomic_write_json(stage / REPORT_FILE, self.report.to_dict())
            if self.layer_plot:
                atomic_write_bytes(stage / LAYER_PLOT, self.layer_plot)
            if self.faster is not None:
                atomic_write_bytes(stage / FAST_FILE, self.faster)
                atomic_write_json(stage / FAST_CARD, int8_card(self.faster, FAST_FILE, self.card).to_dict())
            if labels is not None and not same_labels:
                atomic_write_bytes(stage / str(self.card.labels_file), labels)
        for stale in other:  # only reached with force when they existed: they cannot be mistaken for this run's
            (out / stale).unlink(missing_ok=True)
        return replace(self, folder=out)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, source: ConvertResult | None = None) -> QuantizeResult:
        """A saved result (what :meth:`save` wrote), either outcome; ``source``: the conversion it was made from.

        Raises:
            InputError: The folder holds no saved quantize result, or its files do not match each other.
        """
        out = Path(folder)
        try:
            report = QuantizeReport.from_dict(json.loads((out / REPORT_FILE).read_text()))
            name = report.output
            model = (out / name).read_bytes()
            card = ModelCard.load(out / (INT8_CARD if name == INT8_FILE else OVER_BUDGET_CARD))
            faster = (out / FAST_FILE).read_bytes() if (out / FAST_FILE).is_file() else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{out} holds no saved quantize result ({exc}); run quantize into it first") from exc
        plot = out / LAYER_PLOT
        return cls(
            model,
            card,
            report.figures,
            report,
            name == INT8_FILE,
            source,
            plot.read_bytes() if plot.is_file() else None,
            out,
            faster,
        )

    def with_io(self, io_dtype: str) -> QuantizeResult:
        """The same quantized model with ``io_dtype`` (``int8``/``uint8``) input and output, rewritten exactly.

        QUANTIZE ops at both ends (:mod:`edgeship.quantize.interface`), no second calibration: the
        figures hold as they are. The report's ``interface`` names the rewrite; ``speed`` stays the
        measurement of the model it was made from.
        """
        if io_dtype == self.card.input.dtype:
            return self
        model = with_io_dtype(self.model, io_dtype)
        faster = with_io_dtype(self.faster, io_dtype) if self.faster is not None else None
        m = TFLiteModel(model)
        card = self.card.with_(input=TensorSpec.of(m.input, self.card.input.layout), output=TensorSpec.of(m.output))
        report = replace(
            self.report,
            options=replace(self.report.options, io=IODtype(io_dtype)),
            interface=Interface(self.card.input.dtype, io_dtype),
            runs_on=replace(self.report.runs_on, delegation=of_interpreter(m.interpreter)),
            sizes=replace(self.report.sizes, int8=len(model)),
            ops=op_histogram(model),
        )
        return replace(self, model=model, card=card, report=report, faster=faster, folder=None)

    def save_with_source(self, out_dir: str | os.PathLike[str], *, force: bool = False) -> QuantizeResult:
        """:meth:`save`, and the conversion it was made from when that was never saved (an ONNX input)."""
        if self.source is not None and self.source.folder is None:
            self.source.save(out_dir, force=force)
        return self.save(out_dir, force=force)

    def raise_for_budget(self) -> None:
        """Raise :class:`AccuracyDriftError` when the model is over its budget (after :meth:`save`, say)."""
        if self.within_budget:
            return
        where = f"; best model kept as {self.model_path}" if self.model_path else ""
        where += f"; {self.report.speed.verdict}" if self.report.speed.verdict else ""
        options, figs = self.report.options, self.figures
        if options.min_sqnr_db is not None and figs.sqnr_db < options.min_sqnr_db:
            mixed = self.report.mixed_precision
            how = (
                f"after keeping {mixed.float_ops if mixed else 0} op(s) float"
                if options.float_islands
                else "as a full-integer model (the target allows no float ops)"
            )
            raise AccuracyDriftError(
                f"int8 model under the SQNR budget of {options.min_sqnr_db} dB {how}: "
                f"SQNR {figs.sqnr_db:.2f} dB{where}{_shortfall_note(mixed, options)}",
                [f"sqnr_db {figs.sqnr_db:.2f}"],
            )
        kept = self.report.accuracy_aware.kept_in_float
        if figs.top1_drop is not None:
            what = (
                f"top-1 against labels {100 * (figs.cand_top1 or 0):.2f}% "
                f"(float {100 * (figs.ref_top1 or 0):.2f}%, {figs.top1_drop:.2f} points lost)"
            )
        else:
            what = f"top-1 agreement {100 * figs.top1_agreement:.2f}%"
        raise AccuracyDriftError(
            f"int8 model still over the --max-drop budget of {options.max_drop} points after keeping "
            f"{len(kept)} layer(s) in float: {what}{where}",
            [what],
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything but the bytes, which are named by their sha256."""
        return {
            "card": self.card.to_dict(),
            "figures": self.figures.to_dict(),
            "report": self.report.to_dict(),
            "within_budget": self.within_budget,
            "model_sha256": sha256(self.model),
            "source": self.source.to_dict() if self.source else None,
            "folder": str(self.folder) if self.folder else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, model: bytes) -> QuantizeResult:
        """The inverse of :meth:`to_dict` (without the source's bytes), given the model bytes it names."""
        if sha256(model) != d["model_sha256"]:
            raise InputError("model bytes do not match the sha256 the result names")
        return cls(
            model=model,
            card=ModelCard.from_dict(d["card"]),
            figures=DriftFigures.from_dict(d["figures"]),
            report=QuantizeReport.from_dict(d["report"]),
            within_budget=bool(d["within_budget"]),
            folder=Path(d["folder"]) if d.get("folder") else None,
        )


def _shortfall_note(mixed: MixedPrecision | None, options: QuantizeOptions) -> str:
    """Why a budget search fell short: the integer output's grid, else int8 convolutions alone, under the budget.

    The ceiling was measured on the calibration images, so it is held to what the search aimed at there.
    """
    if mixed is None or options.min_sqnr_db is None:
        return ""
    limit = mixed.int8_output_limit_db
    if limit is not None and limit < options.min_sqnr_db:
        return (
            f"; the float model's scores rounded to this int8 output's grid hold only {limit:.1f} dB on the "
            f"evaluation images, so no model whose scores come out of that grid meets this budget"
        )
    ceiling = mixed.int8_matrix_ceiling_db
    aimed = mixed.target_sqnr_db if mixed.target_sqnr_db is not None else options.min_sqnr_db
    if ceiling is None or ceiling >= aimed:
        return ""
    lower = "--min-speedup or the budget" if options.min_speedup else "the budget"
    return (
        f"; with every op but its large convolutions and matrix multiplies float it reaches {ceiling:.1f} dB on "
        f"the calibration images, so this budget needs convolutions float (slower: lower {lower})"
    )


def _holds(path: Path, data: bytes) -> bool:
    return path.is_file() and path.read_bytes() == data


def output_names() -> list[str]:
    return [INT8_FILE, INT8_CARD, REPORT_FILE, LAYER_PLOT, OVER_BUDGET_FILE, OVER_BUDGET_CARD, FAST_FILE, FAST_CARD]


def int8_card(quant: bytes, file_name: str, float_card: ModelCard) -> ModelCard:
    m = TFLiteModel(quant, use_xnnpack=False)
    return float_card.with_(
        model_file=file_name,
        precision="int8",
        input=TensorSpec.of(m.input, float_card.input.layout),
        output=TensorSpec.of(m.output),
    )


def op_histogram(model: bytes) -> dict[str, int]:
    """Builtin op name -> count, most frequent first."""
    return dict(Counter(op_names(model)).most_common())
