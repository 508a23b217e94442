"""Accuracy-drift checks: the deployed model against its float reference, per target.

The device side (:func:`candidate_outputs`, also ``python -m edgeship.runtime.collect``)
only needs the runtime; the host side (:func:`verify`) runs the ONNX reference with
onnxruntime, compares and applies the target's budget.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgeship.errors import AccuracyDriftError, InputError
from edgeship.runtime.card import ModelCard
from edgeship.runtime.classifier import Classifier
from edgeship.runtime.images import list_images, normalize
from edgeship.runtime.metrics import DriftFigures, compare

log = logging.getLogger(__name__)

REPORT_FILE = "drift_report.json"
#: File names of the model and labels shipped to a device for a drift check (chosen here, never the user's).
STAGED_MODEL = "model.tflite"
STAGED_LABELS = "labels.txt"


def candidate_outputs(model: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]], *,
                      num_threads: int | None = None, use_xnnpack: bool = True,
                      progress: Callable[[str, int | None, int | None], None] | None = None
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """Dequantized outputs of the deployed model on each image, and how it ran."""
    clf = Classifier.load(model, num_threads=num_threads, use_xnnpack=use_xnnpack)
    # Decoded on one thread per core while the interpreter runs; the same image path as predict().
    step = (lambda stage, done, total: progress("run candidate", done, total)) if progress else None
    return clf.logits_many(files, progress=step), clf.describe()


@dataclass(frozen=True)
class BudgetCheck:
    """One budget line: the measured value, the limit, and whether it passed."""

    metric: str
    value: float | None
    limit: float
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_budget(fig: DriftFigures, budget: Any) -> list[BudgetCheck]:
    """Compare figures with a target budget (``min_top1_agreement`` %, ``max_top1_drop`` points, ``min_sqnr_db``)."""
    agreement = fig.agreement_pct
    checks = [
        BudgetCheck("top1_agreement_pct", agreement, budget.min_top1_agreement, agreement >= budget.min_top1_agreement),
        BudgetCheck("sqnr_db", fig.sqnr_db, budget.min_sqnr_db, fig.sqnr_db >= budget.min_sqnr_db),
    ]
    drop = fig.top1_drop
    if drop is None:
        checks.append(BudgetCheck("top1_drop_points", None, budget.max_top1_drop, True, "no labels: not checked"))
    else:
        step = 100.0 / max(fig.count, 1)
        # A drop is counted in whole images: on a small set one image can be most of the budget.
        note = f"{fig.count} images: one image is {step:.2f} pt" if step > budget.max_top1_drop / 2 else ""
        checks.append(BudgetCheck("top1_drop_points", drop, budget.max_top1_drop, drop <= budget.max_top1_drop, note))
    return checks


@dataclass(frozen=True)
class VerifyResult:
    figures: DriftFigures
    checks: tuple[BudgetCheck, ...]
    report: dict[str, Any] = field(repr=False)
    reference: np.ndarray | None = field(default=None, repr=False)
    candidate: np.ndarray | None = field(default=None, repr=False)
    files: tuple[Path, ...] = field(default=(), repr=False)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def failure_message(target: str, checks: Sequence[BudgetCheck], extra: Sequence[str] = ()) -> str:
    parts = [f"{c.metric} {c.value:.3f} (limit {c.limit})" for c in checks if not c.passed and c.value is not None]
    return f"over the drift budget of target {target}: " + "; ".join([*parts, *extra])


def reference_outputs(reference_onnx: str | os.PathLike[str], files: Sequence[Path], card: ModelCard,
                      progress: Callable[[str, int | None, int | None], None] | None = None) -> np.ndarray:
    """onnxruntime outputs of the source model on the images (host only)."""
    from edgeship.convert.onnx_model import load_model
    from edgeship.convert.simplify import OrtRunner

    from edgeship.convert.onnx_model import inspect_model

    prep = card.reference_preprocessing
    model = load_model(reference_onnx)
    info = inspect_model(model, str(reference_onnx))
    hw = tuple(info.input_shape[2:])
    if all(isinstance(d, int) for d in hw) and hw != tuple(prep.crop):
        raise InputError(f"reference {reference_onnx} takes {hw[0]}x{hw[1]} images but the candidate's card crops "
                         f"{prep.crop[0]}x{prep.crop[1]}; is it the candidate's source model?")
    runner = OrtRunner(model)
    rows = []
    from edgeship.runtime.images import iter_pixels

    for i, pixels in enumerate(iter_pixels(files, prep)):  # the candidate's image path, so the same pixels
        x = normalize(pixels, prep).transpose(2, 0, 1)[None]
        try:
            rows.append(runner.run(x).reshape(-1))
        except Exception as exc:  # onnxruntime raises its own types
            raise InputError(f"onnxruntime could not run {reference_onnx}: {str(exc).splitlines()[0][:200]}") from exc
        if progress:
            progress("run reference (onnxruntime)", i + 1, len(files))
    return np.stack(rows)


def io_problems(describe: dict[str, Any], target: Any) -> list[str]:
    """What about the model's I/O does not suit the target."""
    want = target.model.io_dtype.value
    got_in, got_out = describe["input"]["dtype"], describe["output"]["dtype"]
    problems = []
    if got_in != want or got_out != want:
        problems.append(f"model I/O is {got_in}/{got_out} but target {target.name} needs {want}")
    return problems


def load_truth(card: ModelCard, model_dir: Path, images: Any) -> list[int | None]:
    from edgeship.runtime.images import Labels

    if card.labels_file and (model_dir / card.labels_file).is_file():
        return images.labels_for(Labels.load(model_dir / card.labels_file))
    return [None] * len(images)


def resolve_candidate(candidate: str | os.PathLike[str]) -> tuple[Path, ModelCard, Path]:
    """(model file, card, folder) for a .tflite path or a bundle folder; the model file is checked."""
    from edgeship.runtime.card import CARD_FILE
    from edgeship.runtime.classifier import find_card
    from edgeship.runtime.interpreter import check_model_file

    path = Path(candidate)
    if not path.exists():
        raise InputError(f"candidate {path} does not exist (a .tflite file or a bundle folder)")
    if path.is_dir():
        card = ModelCard.load(path)
        model, folder = path / card.model_file, path
    else:
        found = find_card(path)
        if found is None:
            raise InputError(f"no model card beside {path} ({path.stem}.card.json or {CARD_FILE}): the "
                             "preprocessing it was built with is unknown; pass the convert/quantize folder's model "
                             "with its card, or a bundle folder")
        card, model, folder = found, path, path.parent
    check_model_file(model)
    return model, card, folder


def list_eval_images(folder: Any, max_images: int | None) -> Any:
    from edgeship.runtime.images import ImageSet

    images = folder if isinstance(folder, ImageSet) else list_images(folder, minimum=1)
    return images.sample(max_images) if max_images else images


def raise_if_over(result: VerifyResult, target_name: str, extra: Sequence[str] = ()) -> None:
    if not result.passed or extra:
        failing = [c.metric for c in result.checks if not c.passed] + list(extra)
        raise AccuracyDriftError(failure_message(target_name, result.checks, extra), failing)


def verify(reference_onnx: str | os.PathLike[str], candidate: str | os.PathLike[str],
           images: str | os.PathLike[str], target: Any, *, max_images: int | None = None,
           device: Any = None, reference: np.ndarray | None = None,
           progress: Callable[[str, int | None, int | None], None] | None = None) -> VerifyResult:
    """Run the candidate the way ``target`` will and compare it with the ONNX reference.

    Args:
        reference_onnx: The source float ONNX model (run with onnxruntime on the host).
        candidate: Deployed ``.tflite`` (with its card beside it) or a bundle folder.
        images: Folder of real images (labels from ImageNet wnid names, subfolders or labels.txt),
            or an :class:`~edgeship.runtime.images.ImageSet`.
        target: A :class:`edgeship.targets.Target`.
        max_images: Use at most this many images.
        device: Where the candidate runs: None (this machine), or an object with
            ``collect_outputs(model_dir, image_dir, threads=..., use_xnnpack=...)``
            (ssh or emulated device) returning ``(logits, files, runtime)``.
        reference: Reference outputs already computed for these images (skips onnxruntime).
        progress: Progress hook.

    Returns:
        The figures and budget checks; call :func:`raise_if_over` to fail loudly.
    """
    import shutil
    import tempfile

    if max_images is not None and max_images < 1:
        raise InputError(f"--max-images must be >= 1, got {max_images}")
    from edgeship.targets.bundle import check_fits

    model_path, card, folder = resolve_candidate(candidate)
    check_fits(card, target)  # a float model for an int8 target is a mismatch, not drift: say so before running
    image_set = list_eval_images(images, max_images)
    threads = target.execution.threads
    use_xnnpack = target.execution.delegate.value == "xnnpack"
    notes = []
    if target.execution.delegate.value in ("gpu", "nnapi") and device is None:
        notes.append(f"{target.execution.delegate.value} delegate is not available on this host: "
                     "the candidate ran on the CPU")
    if device is None:
        cand, runtime = candidate_outputs(model_path, image_set.files, num_threads=threads, use_xnnpack=use_xnnpack,
                                          progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="edgeship-verify-") as tmp:
            bundle, pics = Path(tmp) / "bundle", Path(tmp) / "images"
            _stage_candidate(model_path, card, folder, bundle)
            pics.mkdir()
            for i, f in enumerate(image_set.files):
                shutil.copyfile(f, pics / f"{i:06d}{f.suffix.lower()}")
            if progress:
                progress(f"run candidate on {type(device).__name__}", None, None)
            cand, names, runtime = device.collect_outputs(bundle, pics, threads=threads, use_xnnpack=use_xnnpack)
            expected = [f"{i:06d}{f.suffix.lower()}" for i, f in enumerate(image_set.files)]
            if list(names) != expected:
                from edgeship.errors import DeviceError

                raise DeviceError(f"the device ran {len(names)} of {len(expected)} images or in another order; "
                                  "its image reader differs from this machine's")
    where = _where(device, runtime)
    ref = reference if reference is not None else reference_outputs(reference_onnx, list(image_set.files), card,
                                                                     progress)
    truth = load_truth(card, folder, image_set)
    if ref.shape != cand.shape:
        raise InputError(f"reference and candidate do not answer alike: {ref.shape[1]} vs {cand.shape[1]} outputs "
                         f"per image; is {Path(str(reference_onnx)).name} the source of {model_path.name}?")
    fig = compare(ref, cand, truth)
    checks = tuple(check_budget(fig, target.budget))
    problems = io_problems(runtime, target)
    report = {
        "edgeship_report": "drift",
        "target": target.to_dict(),
        "reference": {"model": str(reference_onnx), "runtime": "onnxruntime"},
        "candidate": {"model": str(model_path), "precision": card.precision, "runtime": runtime, "ran_on": where},
        "images": {"folder": str(image_set.root), "count": len(image_set), "skipped_files": len(image_set.skipped),
                   "labelled": sum(t is not None for t in truth)},
        "figures": fig.to_dict(),
        "budget": [c.to_dict() for c in checks],
        "io_problems": problems,
        "notes": notes,
        "passed": all(c.passed for c in checks) and not problems,
    }
    return VerifyResult(fig, checks, report, ref, cand, tuple(image_set.files))


def _where(device: Any, runtime: dict[str, Any]) -> str:
    """Where the candidate ran, in words, for reports."""
    import platform

    if device is None:
        return f"this machine ({platform.machine()})"
    if runtime.get("emulator") or type(device).__name__ == "EmulatedDevice":
        return f"qemu-user {runtime.get('machine', 'aarch64')} ({runtime.get('cpu', 'emulated')})"
    dev = getattr(device, "device", device)
    target = getattr(dev, "target", None)
    return f"ssh {getattr(target, 'where', target)} ({runtime.get('machine', '?')})"


def _stage_candidate(model_path: Path, card: ModelCard, folder: Path, dest: Path) -> None:
    """A minimal bundle (model, card, labels) to ship to a device, under fixed file names.

    The user's file names never reach the device: nothing there (a remote shell, scp's
    legacy protocol) can read them as anything but data.
    """
    import json
    import shutil

    dest.mkdir(parents=True)
    shutil.copyfile(model_path, dest / STAGED_MODEL)
    labels = None
    if card.labels_file and (folder / card.labels_file).is_file():
        labels = STAGED_LABELS
        shutil.copyfile(folder / card.labels_file, dest / labels)
    (dest / "model_card.json").write_text(json.dumps(card.with_(model_file=STAGED_MODEL, labels_file=labels).to_dict(),
                                                     indent=2))
