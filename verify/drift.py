"""Host-side drift check: the deployed model on its target against the float ONNX model.

The reference runs through onnxruntime here; the candidate runs where the target says
(this machine, an ssh device, qemu-emulated aarch64: :mod:`edgeship.targets.devices`)
through the on-device runtime; the target's :class:`~edgeship.targets.profile.Budget`
judges the figures. For MediaPipe targets, the app's own client is run too.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from edgeship._io import atomic_write_bytes, atomic_write_json
from edgeship._progress import Progress
from edgeship.convert.onnx_model import inspect_model, load_model
from edgeship.errors import (
    AccuracyDriftError,
    ArgumentTypeError,
    DelegateNotAppliedError,
    InputError,
    VerificationError,
)
from edgeship.reference import OrtRunner
from edgeship.runtime.bench_report import RuntimeInfo
from edgeship.runtime.card import CARD_FILE, ModelCard, Preprocessing
from edgeship.runtime.classifier import Classifier, find_card
from edgeship.runtime.images import ImageSet, Labels, iter_pixels, list_images, normalize
from edgeship.runtime.metrics import DriftFigures, compare
from edgeship.runtime.model_check import check_model_file
from edgeship.targets.bundle import check_fits
from edgeship.targets.devices import Device, DeviceSpec, LocalDevice, make_device
from edgeship.targets.mediapipe_check import ClientDrift, ClientScores, client_drift, client_problems, mediapipe_scores
from edgeship.targets.profile import BudgetCheck, Target, load_target
from edgeship.verify.report import DriftCandidate, DriftImages, DriftReference, DriftReport, DriftTarget

REPORT_FILE = "drift_report.json"
OUTPUTS_FILE = "outputs.npz"
#: File names of the model and labels shipped to a device for a drift check (chosen here, never the user's).
STAGED_MODEL = "model.tflite"
#: The staged name of an ONNX model (an int8 QDQ model for onnxruntime targets).
STAGED_ONNX = "model.onnx"
STAGED_LABELS = "labels.txt"
#: A candidate: a saved .tflite or .onnx (card beside it), a bundle folder, or a stage result in memory.
Candidate = Union[str, os.PathLike, Any]


@dataclass(frozen=True)
class DriftResult:
    """The report of one drift check, with both models' outputs and the image files (kept for reports)."""

    report: DriftReport
    reference: np.ndarray | None = field(default=None, repr=False)
    candidate: np.ndarray | None = field(default=None, repr=False)
    files: tuple[Path, ...] = field(default=(), repr=False)

    @property
    def passed(self) -> bool:
        """The verdict: every budget line met and no I/O or client-path problem."""
        return self.report.passed

    @property
    def figures(self) -> DriftFigures:
        return self.report.figures

    @property
    def checks(self) -> tuple[BudgetCheck, ...]:
        return self.report.budget

    @property
    def client_check(self) -> ClientDrift | None:
        """The app's own client path (MediaPipe Tasks), for targets whose client reads metadata."""
        return self.report.client_check

    @property
    def failures(self) -> list[str]:
        """Every budget line missed and every I/O problem, one string each."""
        lines = [
            f"{c.metric} {c.value:.3f} (limit {c.limit})" for c in self.checks if not c.passed and c.value is not None
        ]
        return lines + list(self.report.io_problems)

    def raise_for_budget(self) -> None:
        """Raise :class:`AccuracyDriftError` (exit 3) when the check did not pass."""
        if not self.passed:
            failing = [c.metric for c in self.checks if not c.passed] + list(self.report.io_problems)
            raise AccuracyDriftError(
                f"over the drift budget of target {self.report.target.name}: " + "; ".join(self.failures), failing
            )

    def to_dict(self) -> dict[str, Any]:
        """The report (figures, budget lines, where it ran); the outputs are kept by :meth:`save`."""
        return self.report.to_dict()

    @classmethod
    def from_dict(
        cls,
        d: dict[str, Any],
        *,
        reference: np.ndarray | None = None,
        candidate: np.ndarray | None = None,
        files: Sequence[Path] = (),
    ) -> DriftResult:
        return cls(DriftReport.from_dict(d), reference, candidate, tuple(Path(f) for f in files))

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """``drift_report.json`` and ``outputs.npz`` (reference and candidate outputs) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / REPORT_FILE, self.report.to_dict())
        if self.reference is not None and self.candidate is not None:
            buf = io.BytesIO()
            np.savez(
                buf, reference=self.reference, candidate=self.candidate, files=np.array([str(f) for f in self.files])
            )
            atomic_write_bytes(folder / OUTPUTS_FILE, buf.getvalue())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> DriftResult:
        """A saved drift check (what :meth:`save` wrote)."""
        folder = Path(folder)
        report = json.loads((folder / REPORT_FILE).read_text())
        if not (folder / OUTPUTS_FILE).is_file():
            return cls.from_dict(report)
        with np.load(folder / OUTPUTS_FILE) as data:
            return cls.from_dict(
                report,
                reference=data["reference"],
                candidate=data["candidate"],
                files=[Path(str(f)) for f in data["files"]],
            )


def verify(
    reference_onnx: str | os.PathLike[str],
    candidate: Candidate,
    images: str | os.PathLike[str] | ImageSet,
    *,
    target: str | Target = "x86-host",
    device: Device | DeviceSpec | None = None,
    max_images: int | None = None,
    reference: np.ndarray | Callable[[], np.ndarray] | None = None,
    progress: Progress | None = None,
) -> DriftResult:
    """Run ``candidate`` the way ``target`` will and compare it with the ONNX reference.

    Args:
        reference_onnx: The source float ONNX model (run with onnxruntime on this machine).
        candidate: A :class:`~edgeship.quantize.QuantizeResult` or
            :class:`~edgeship.convert.ConvertResult`, a ``.tflite`` (card beside it), or a bundle folder.
        images: Folder of real images (labels from ImageNet wnid names, subfolders or labels.txt),
            or an :class:`~edgeship.runtime.images.ImageSet`.
        target: Target name, profile path or :class:`~edgeship.targets.Target`.
        device: Where the candidate runs: a :class:`~edgeship.targets.devices.Device`, a
            :class:`~edgeship.targets.devices.DeviceSpec`, or None (this machine).
        max_images: Use at most this many images.
        reference: Reference outputs already computed for these images (skips onnxruntime), or a
            callable returning them, called once the candidate has run.
        progress: Progress hook.

    Returns:
        A :class:`DriftResult`; ``raise_for_budget()`` fails loudly.
    """
    if device is not None and not isinstance(device, DeviceSpec) and not callable(getattr(device, "collect", None)):
        raise ArgumentTypeError(
            f"verify's device must be None (this machine), a DeviceSpec or a Device, got {device!r} "
            '(e.g. DeviceSpec(kind="ssh", host="pi@raspberrypi"))'
        )
    target = target if isinstance(target, Target) else load_target(target)
    if max_images is not None and max_images < 1:
        raise InputError(f"--max-images must be >= 1, got {max_images}")
    notes: list[str] = []
    if device is None or isinstance(device, DeviceSpec):
        device, note = make_device(device, target)
        notes += [note] if note else []
    with tempfile.TemporaryDirectory(prefix="edgeship-verify-") as tmp:
        bundle, card, labels, name = stage_candidate(candidate, Path(tmp) / "bundle")
        check_fits(card, target)  # a float model for an int8 target is a mismatch, not drift: say so before running
        image_set = _image_set(images, max_images)
        if target.execution.delegate.value in ("gpu", "nnapi") and isinstance(device, LocalDevice):
            notes.append(
                f"{target.execution.delegate.value} delegate is not available on this host: "
                "the candidate ran on the CPU"
            )
        with ThreadPoolExecutor(1, thread_name_prefix="edgeship-client") as pool:
            # The app's own path (MediaPipe Tasks' ImageClassifier) runs beside the candidate and the reference.
            client_scores = (
                pool.submit(mediapipe_scores, bundle / STAGED_MODEL, list(image_set.files), card.num_classes, card=card)
                if target.runtime.client.reads_metadata
                else None
            )
            ran = device.collect(
                bundle,
                list(image_set.files),
                threads=target.execution.threads,
                use_xnnpack=target.execution.use_xnnpack,
                progress=progress,
            )
            if not isinstance(device, LocalDevice):
                check_delegate(ran.runtime, target, ran.where)
            ref = _reference(reference, reference_onnx, image_set, card, progress)
            if ref.shape != ran.logits.shape:
                raise InputError(
                    f"reference and candidate do not answer alike: {ref.shape[1]} vs {ran.logits.shape[1]} "
                    f"outputs per image; is {Path(str(reference_onnx)).name} the source of {name}?"
                )
            client: ClientDrift | None = None
            if client_scores is not None:  # MediaPipe targets: a .tflite model, compared kernel for kernel
                same_kernels = _on_xnnpack(ran.logits, bundle, image_set.files, target, device)
                client = _client_drift(client_scores, ref, same_kernels, progress)
        truth = image_set.labels_for(labels)
        fig = compare(ref, ran.logits, truth)
        checks = tuple(target.budget.check(fig))
        problems = io_problems(ran.runtime, target) + (client_problems(client) if client else [])
        report = DriftReport(
            target=DriftTarget.of(target),
            reference=DriftReference(str(reference_onnx)),
            candidate=DriftCandidate(name, card.precision, ran.runtime, ran.where),
            images=DriftImages(
                str(image_set.root), len(image_set), len(image_set.skipped), sum(t is not None for t in truth)
            ),
            figures=fig,
            budget=checks,
            io_problems=tuple(problems),
            notes=tuple(notes),
            passed=all(c.passed for c in checks) and not problems,
            client_check=client,
        )
    return DriftResult(report, ref, ran.logits, tuple(image_set.files))


def _reference(
    given: np.ndarray | Callable[[], np.ndarray] | None,
    reference_onnx: str | os.PathLike[str],
    image_set: ImageSet,
    card: ModelCard,
    progress: Progress | None,
) -> np.ndarray:
    """The float reference outputs: given, given later (a callable), or computed here with onnxruntime."""
    if given is None:
        return reference_outputs(reference_onnx, list(image_set.files), card, progress)
    return given() if callable(given) else given


def _on_xnnpack(logits: np.ndarray, bundle: Path, files: Sequence[Path], target: Target, device: Any) -> np.ndarray:
    """edgeship's runtime outputs on XNNPACK, this machine: what MediaPipe's answers are compared with.

    MediaPipe's CPU path runs XNNPACK. A target run on other kernels (NNAPI's stand-in, LiteRT's reference
    kernels, or a device's) rounds differently in the last bits of an int8 output, which can swap two
    near-tied classes; that is the kernels, not the client path this check is about. The drift figures
    stay those of the target's own run."""
    if isinstance(device, LocalDevice) and target.execution.use_xnnpack:
        return logits
    return Classifier.load(bundle / STAGED_MODEL, use_xnnpack=True).logits_many(list(files))


def _client_drift(
    scores: Future[ClientScores] | None, ref: np.ndarray, runtime_outputs: np.ndarray, progress: Progress | None
) -> ClientDrift | None:
    if scores is None:
        return None
    if progress and not scores.done():
        progress("run MediaPipe ImageClassifier", None, None)
    return client_drift(scores.result(), ref, runtime_outputs)


def stage_candidate(candidate: Candidate, dest: Path) -> tuple[Path, ModelCard, Labels | None, str]:
    """A minimal bundle (model, card, labels) under fixed file names, from a result or from files.

    The user's file names never reach a device: nothing there (a remote shell, scp's legacy
    protocol) can read them as anything but data. Returns (bundle folder, card, labels, name).
    """
    model, card, labels_bytes, name = _candidate_parts(candidate)
    staged = stage_bundle(dest, model, card, labels_bytes)
    labels = Labels.from_bytes(labels_bytes) if labels_bytes is not None else None
    return dest, staged, labels, name


def stage_bundle(dest: Path, model: bytes, card: ModelCard, labels: bytes | None) -> ModelCard:
    """Write model, card and labels into ``dest`` under fixed names; return the card written."""
    dest.mkdir(parents=True)
    name = staged_model_name(card)
    atomic_write_bytes(dest / name, model)
    if labels is not None:
        atomic_write_bytes(dest / STAGED_LABELS, labels)
    staged = card.with_(model_file=name, labels_file=STAGED_LABELS if labels is not None else None)
    atomic_write_json(dest / CARD_FILE, staged.to_dict())
    return staged


def staged_model_name(card: ModelCard) -> str:
    """The fixed name a model is staged under: ``model.onnx`` for an ONNX model, else ``model.tflite``."""
    return STAGED_ONNX if card.model_file.lower().endswith(".onnx") else STAGED_MODEL


def _candidate_parts(candidate: Candidate) -> tuple[bytes, ModelCard, bytes | None, str]:
    """(model bytes, card, labels bytes, name for reports) of any kind of candidate."""
    if hasattr(candidate, "model") and hasattr(candidate, "card"):  # a convert or quantize result
        source = getattr(candidate, "source", candidate)
        labels = getattr(source, "labels", None) if candidate.card.labels_file else None
        path = getattr(candidate, "model_path", None)
        name = str(path) if path else f"(in memory) {candidate.card.model_file}"
        return candidate.model, candidate.card, labels, name
    model_path, card, folder = resolve_candidate(candidate)
    labels_path = card.file(folder, "labels_file")
    labels = labels_path.read_bytes() if labels_path and labels_path.is_file() else None
    return model_path.read_bytes(), card, labels, str(model_path)


def resolve_candidate(candidate: str | os.PathLike[str]) -> tuple[Path, ModelCard, Path]:
    """(model file, card, folder) for a .tflite or .onnx path or a bundle folder; a TFLite file is checked (an
    ONNX one is checked by onnxruntime as it loads)."""
    path = Path(candidate)
    if not path.exists():
        raise InputError(f"candidate {path} does not exist (a .tflite or .onnx file, or a bundle folder)")
    if path.is_dir():
        card = ModelCard.load(path)
        model, folder = card.model_path(path), path
    else:
        found = find_card(path)
        if found is None:
            raise InputError(
                f"no model card beside {path} ({path.stem}.card.json or {CARD_FILE}): the "
                "preprocessing it was built with is unknown; pass the convert/quantize folder's model "
                "with its card, or a bundle folder"
            )
        card, model, folder = found, path, path.parent
    if model.suffix.lower() != ".onnx":
        check_model_file(model)
    return model, card, folder


def reference_outputs(
    reference_onnx: str | os.PathLike[str], files: Sequence[Path], card: ModelCard, progress: Progress | None = None
) -> np.ndarray:
    """onnxruntime outputs of the source model on the images (the candidate's image path, so the same pixels)."""
    prep = card.reference_preprocessing
    model = load_model(reference_onnx)
    info = inspect_model(model, str(reference_onnx))
    hw = tuple(info.input_shape[2:])
    if all(isinstance(d, int) for d in hw) and hw != tuple(prep.crop):
        raise InputError(
            f"reference {reference_onnx} takes {hw[0]}x{hw[1]} images but the candidate's card crops "
            f"{prep.crop[0]}x{prep.crop[1]}; is it the candidate's source model?"
        )
    return onnx_outputs(reference_onnx, files, prep, progress, loaded=model)


def onnx_outputs(
    reference_onnx: str | os.PathLike[str],
    files: Sequence[Path],
    prep: Preprocessing,
    progress: Progress | None = None,
    *,
    loaded: Any = None,
) -> np.ndarray:
    """onnxruntime outputs of an ONNX model on the images under ``prep`` (``loaded``: its ``ModelProto``)."""
    runner = OrtRunner(loaded if loaded is not None else load_model(reference_onnx))
    rows = []
    for i, pixels in enumerate(iter_pixels(files, prep)):
        x = normalize(pixels, prep).transpose(2, 0, 1)[None]
        try:
            rows.append(runner.run(x).reshape(-1))
        except Exception as exc:  # onnxruntime raises its own types
            raise VerificationError(
                f"onnxruntime could not run {reference_onnx}: {str(exc).splitlines()[0][:200]}"
            ) from exc
        if progress:
            progress("run reference (onnxruntime)", i + 1, len(files))
    return np.stack(rows)


def check_delegate(runtime: RuntimeInfo, target: Target, where: str) -> None:
    """Raise :class:`DelegateNotAppliedError` when the target asks for XNNPACK and the device applied none."""
    if not target.execution.use_xnnpack:
        return
    delegation = runtime.xnnpack
    if delegation is not None and delegation.partitions > 0:
        return
    ops = f"all {delegation.ops} ops" if delegation is not None and delegation.ops else "every op"
    raise DelegateNotAppliedError(
        f"{target.name} runs XNNPACK, but {runtime.interpreter or '?'} {runtime.interpreter_version or ''} "
        f"on {where} applied 0 XNNPACK partitions ({ops} on the builtin kernels): not the target's delegate, so no "
        "drift figure; install the interpreter version the bundle pins, and check the device's /sys is readable"
    )


def io_problems(runtime: RuntimeInfo, target: Target) -> list[str]:
    """What about the model's I/O does not suit the target (``runtime``: the tensor specs the runtime reported)."""
    got_in, got_out = runtime.details["input"]["dtype"], runtime.details["output"]["dtype"]
    if not target.model.fits_io(got_in, got_out):
        return [f"model I/O is {got_in}/{got_out} but target {target.name} needs {target.model.io_dtype.value}"]
    return []


#: Fewer images give no verdict: on one image the top-1 agreement can only be 0 or 100 %.
MIN_VERIFY_IMAGES = 2


def _image_set(images: str | os.PathLike[str] | ImageSet, max_images: int | None) -> ImageSet:
    found = images if isinstance(images, ImageSet) else list_images(images, minimum=1)
    found = found.sample(max_images) if max_images else found
    if len(found) < MIN_VERIFY_IMAGES:
        raise InputError(
            f"a drift check on {len(found)} image cannot give a verdict (its top-1 agreement can only be 0 or "
            f"100 %): use at least {MIN_VERIFY_IMAGES} images, and expect few images to leave the verdict within "
            "noise of the budget"
        )
    return found


__all__ = ["DriftResult", "verify", "reference_outputs", "resolve_candidate", "stage_candidate", "REPORT_FILE"]
