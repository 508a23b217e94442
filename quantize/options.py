"""Typed options of the quantize stage."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

from edgeship.errors import InputError
from edgeship.quantize.data import Split
from edgeship.runtime.card import IODtype, known_keys
from edgeship.runtime.delegation import host_arch

#: A target profile (:class:`edgeship.targets.Target`); quantize reads its fields and never imports targets.
Target = Any


class CalibrationMethod(str, Enum):
    """How activation ranges are chosen from the calibration data."""

    MINMAX = "minmax"  # TensorFlow's calibrator: the observed min and max
    PERCENTILE = "percentile"  # clip the tails of each activation's distribution
    MSE = "mse"  # the clipping range that minimises the expected quantization MSE
    ENTROPY = "entropy"  # the clipping range that minimises the KL divergence (TensorRT's entropy calibration)
    #: Measured choice per model among percentile 99.9999 / 99.99, min-max and min-max with a 10 %
    #: margin: the one whose ranges, fitted on half of the calibration images, give the best int8
    #: model on the other half (both ways); see ``edgeship.quantize.ranges.CROSS_FIT_CANDIDATES``.
    AUTO = "auto"


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of :func:`edgeship.quantize.quantize`.

    Attributes:
        num_calib: Calibration images to use (all when fewer are available).
        seed: Seeded random choice of calibration images (None: a deterministic choice spread over the
            data: round-robin over classes when labels are known, else evenly spaced).
        method: Activation range method. ``auto`` (default) chooses per model among
            percentile 99.9999 and 99.99, min-max, and min-max with a 10 % margin by
            cross-fitted SQNR on the calibration images (8 extra quantizations, each run on
            half of them); docs/quantization.md explains the choice.
        percentile: Kept mass for ``percentile`` (99.999 clips 0.0005 % off each tail);
            ``auto`` measures its own candidates.
        bias_correction: Empirical bias correction, layer by layer, on the calibration images
            (Nagel et al. 2019). None (default): the depthwise convolutions of per-channel models
            (where a few weights per channel make the mean shift), every conv of per-tensor ones;
            True: every conv; False: off.
        io: Input/output dtype of the quantized model.
        per_tensor: Per-tensor weights (for accelerators that need them) instead of per-channel.
        equalize: Equalize the weights' channel ranges before quantizing (:mod:`edgeship.quantize.equalize`:
            channels that never fire on the calibration images zeroed, each producer's widest output
            channels shrunk into its consumer's headroom, ReLU6 kept exact). None (default): with
            per-tensor weights only; True / False: always / never.
        float_islands: Keep the ops that XNNPACK has no int8 kernel for (HARD_SWISH, GELU,
            ...) and every normalisation (LayerNorm's elementwise pieces, the way
            onnxruntime's QDQ computes them) in float, where XNNPACK runs them inside the
            same partition between QUANTIZE/DEQUANTIZE, instead of letting each one split
            the graph and run on TFLite's slow kernels. False: full-integer (NNAPI, DSPs).
        float_logits: With ``float_islands``, the layer producing the scores reads its int8 input
            and weights through DEQUANTIZE and writes float scores (:mod:`edgeship.quantize.logits`):
            no int8 output grid to tie or swap close classes; the model's output is float32.
        eval_split: When no evaluation images are given and there are no more images than
            ``num_calib``, calibrate on the first ``1 - eval_split`` and evaluate on the rest.
        max_eval: Evaluate on at most this many images.
        max_drop: Top-1 agreement drop budget (points) for accuracy-aware mode; None: off.
        max_float_layers: At most this many layers kept in float by accuracy-aware mode.
        min_sqnr_db: SQNR budget (dB, int8 logits against the float model). With
            ``float_islands`` (mixed models allowed) the budget search keeps the cheapest
            set of op groups float that meets it (:mod:`edgeship.quantize.mixed`); a
            full-integer model over budget is written as ``model_int8_OVER_BUDGET.tflite``.
            None: off.
        min_speedup: The speed floor of mixed models: the budget search keeps no op group
            float that makes the model slower than this many times float32's speed (1
            thread, XNNPACK, measured interleaved), and the speed check names a written
            model under it and offers the faster one. 0: no floor in the search (the check
            then speaks up only when the model is slower than float32).
        timed_placement: With ``float_islands``, time the model with its large depthwise
            convolutions float against all-int8 (1 thread, XNNPACK, here) and keep them
            float when that is 5 % faster or more (XNNPACK's int8 kernel for large depthwise
            windows can be slower than its float one). Measured where quantize's ``timing`` says
            (this machine, or the target's ssh device), so :meth:`for_target` turns it on only for
            XNNPACK targets of this machine's architecture or timed on their device (and with no
            target, the model is taken to run here).
        search_images: Calibration images the
            budget search measure on (the evaluation images are never used for choosing).
        min_calib: Fewer usable calibration images than this is an error.
    """

    num_calib: int = 200
    seed: int | None = None
    method: CalibrationMethod = CalibrationMethod.AUTO
    percentile: float = 99.999
    bias_correction: bool | None = None
    io: IODtype = IODtype.INT8
    per_tensor: bool = False
    equalize: bool | None = None
    float_islands: bool = True
    float_logits: bool = True
    eval_split: float = 0.2
    max_eval: int | None = None
    max_drop: float | None = None
    max_float_layers: int = 8
    min_sqnr_db: float | None = None
    min_speedup: float = 1.3
    timed_placement: bool = True
    search_images: int = 48
    min_calib: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", CalibrationMethod(self.method))
        object.__setattr__(self, "io", IODtype(self.io))
        if self.num_calib < 1:
            raise InputError(f"num_calib must be >= 1, got {self.num_calib}")
        if not 50.0 < self.percentile <= 100.0:
            raise InputError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 < self.eval_split < 1.0:
            raise InputError(f"eval_split must be in (0, 1), got {self.eval_split}")
        for key in ("max_drop", "min_sqnr_db", "min_speedup"):  # NaN passes every comparison below
            value = getattr(self, key)
            if value is not None and not math.isfinite(value):
                raise InputError(f"{key} must be a finite number, got {value}")
        if self.max_drop is not None and self.max_drop < 0:
            raise InputError(f"max_drop must be >= 0 points, got {self.max_drop}")
        if self.max_eval is not None and self.max_eval < 1:
            raise InputError(f"max_eval must be >= 1, got {self.max_eval}")
        if self.max_float_layers < 1:
            raise InputError(f"max_float_layers must be >= 1, got {self.max_float_layers}")
        if self.min_speedup < 0:
            raise InputError(f"min_speedup must be >= 0, got {self.min_speedup}")
        if self.search_images < 1:
            raise InputError(f"search_images must be >= 1, got {self.search_images}")
        if self.min_calib < 1:
            raise InputError(f"min_calib must be >= 1, got {self.min_calib}")

    @property
    def bias_correction_ops(self) -> tuple[str, ...]:
        """The convolutions bias correction corrects (empty: off)."""
        if self.bias_correction is False:
            return ()
        every = self.per_tensor or self.bias_correction is True
        return ("CONV_2D", "DEPTHWISE_CONV_2D") if every else ("DEPTHWISE_CONV_2D",)

    @property
    def use_equalize(self) -> bool:
        """Whether the weights are equalized before quantizing (default: with per-tensor weights)."""
        return self.per_tensor if self.equalize is None else self.equalize

    @property
    def use_float_logits(self) -> bool:
        return self.float_logits and self.float_islands

    @property
    def split(self) -> Split:
        return Split(self.num_calib, self.seed, self.eval_split, self.max_eval, self.min_calib)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"] = self.method.value
        d["io"] = self.io.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizeOptions:
        return cls(**known_keys(cls, d, "quantize option"))

    @classmethod
    def for_target(cls, target: Target, *, on_device: bool = False, **given: Any) -> QuantizeOptions:
        """The options a target needs (see :meth:`fitted`) under what was given explicitly (None: not given)."""
        chosen = {k: v for k, v in given.items() if v is not None}
        return cls(**chosen).fitted(target, keep=chosen, on_device=on_device)

    def fitted(self, target: Target, keep: Iterable[str] = (), *, on_device: bool = False) -> QuantizeOptions:
        """These options made fit for ``target``: the one place these rules live.

        Per-tensor weights when it needs them, mixed models only where it allows them; its I/O
        dtype, SQNR budget and speed floor, and timed placement only for XNNPACK targets of this
        machine's architecture or timed on the target's own device (``on_device``), except for the
        fields named in ``keep``.
        """
        needs = target.model
        fit: dict[str, Any] = {
            "io": needs.io_dtype,
            "min_sqnr_db": target.budget.min_sqnr_db,
            "min_speedup": target.budget.min_speedup,
            "timed_placement": target.execution.use_xnnpack and (on_device or target.arch.value == host_arch()),
        }
        fit = {k: v for k, v in fit.items() if k not in set(keep)}
        return replace(
            self,
            per_tensor=self.per_tensor or needs.per_tensor,
            float_islands=self.float_islands and needs.float_islands,
            **fit,
        )
