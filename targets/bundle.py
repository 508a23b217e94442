"""``bundle``: everything one target needs to run a model, in one folder.

A bundle holds the model, its ``model_card.json``, the labels, ``requirements.txt``
with the runtime package pinned for the target's architecture, the edgeship wheel
(the runtime part only needs numpy, Pillow and the interpreter), and a README with
the two commands to run it on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgeship._io import atomic_copy, atomic_write_json, atomic_write_text, staged_output
from edgeship.errors import InputError, TargetError
from edgeship.runtime.card import CARD_FILE, ModelCard
from edgeship.targets.profile import Access, Target

README = "README.md"
REQUIREMENTS = "requirements.txt"


@dataclass(frozen=True)
class BundleResult:
    out_dir: Path
    target: str
    files: tuple[str, ...]


def check_fits(card: ModelCard, target: Target) -> None:
    """Raise TargetError when the model is not what the target runs."""
    need = target.model
    if card.precision != need.precision.value:
        raise TargetError(f"target {target.name} runs {need.precision.value} models, this one is {card.precision}; "
                          f"use the {need.precision.value} model")
    if card.input.dtype != need.io_dtype.value or card.output.dtype != need.io_dtype.value:
        raise TargetError(f"target {target.name} needs {need.io_dtype.value} I/O, the model has "
                          f"{card.input.dtype}/{card.output.dtype}: quantize with --io {need.io_dtype.value}")


def bundle(model: str | os.PathLike[str], target: Target, out_dir: str | os.PathLike[str], *,
           force: bool = False, wheel_dir: Path | None = None) -> BundleResult:
    """Write the bundle of ``model`` (a .tflite with its card beside it) for ``target``.

    Args:
        model: The model file; its card is ``<stem>.card.json`` or the folder's ``model_card.json``.
        target: The target profile.
        out_dir: Bundle folder (existing contents only replaced with ``force``).
        wheel_dir: A folder holding a pre-built edgeship wheel (default: build one).
    """
    from edgeship.runtime.classifier import find_card

    model = Path(model)
    if not model.is_file():
        raise InputError(f"model {model} does not exist")
    card = find_card(model)
    if card is None:
        raise InputError(f"no model card beside {model} (expected {model.stem}.card.json or {CARD_FILE})")
    check_fits(card, target)
    names = [model.name, CARD_FILE, README, REQUIREMENTS, "wheels"] + ([card.labels_file] if card.labels_file else [])
    with staged_output(out_dir, names, force=force) as stage:
        atomic_copy(model, stage / model.name)
        atomic_write_json(stage / CARD_FILE, card.with_(model_file=model.name).to_dict())
        if card.labels_file and (model.parent / card.labels_file).is_file():
            atomic_copy(model.parent / card.labels_file, stage / card.labels_file)
        if target.access == Access.ADB:
            atomic_write_text(stage / README, _android_readme(card, target, model.name))
        else:
            wheel = _wheel(stage / "wheels", wheel_dir)
            reqs = [*target.pip_requirements(), f"./wheels/{wheel.name}"]
            atomic_write_text(stage / REQUIREMENTS, "\n".join(reqs) + "\n")
            atomic_write_text(stage / README, _python_readme(card, target, model.name))
    out = Path(out_dir)
    return BundleResult(out, target.name, tuple(sorted(p.name for p in out.iterdir())))


def _wheel(dest: Path, wheel_dir: Path | None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if wheel_dir is not None:
        found = sorted(wheel_dir.glob("edgeship-*.whl"))
        if not found:
            raise InputError(f"no edgeship wheel in {wheel_dir}")
        return atomic_copy(found[-1], dest / found[-1].name)
    from edgeship.targets.ssh import build_edgeship_wheel

    return build_edgeship_wheel(dest)


def _python_readme(card: ModelCard, target: Target, model_file: str) -> str:
    return f"""# {model_file} for {target.name}

{target.description}.

Model: {card.precision}, input {card.input.dtype} {list(card.input.shape)} ({card.input.layout}),
output {card.output.dtype} {list(card.output.shape)}; preprocessing in `model_card.json`.
Runtime: `{target.runtime.package}{target.runtime.versions}` (Python {target.runtime.python}); {target.runtime.note}.

On the device, in this folder:

```bash
python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
.venv/bin/python -m edgeship.runtime . IMAGE.jpg [IMAGE ...] --threads {target.execution.threads}
```

The second command prints the top-5 classes of each image and which interpreter and
delegate ran. Accuracy drift against the float model was checked with `edgeship verify`
on the host for this target (budget: top-1 agreement >= {target.budget.min_top1_agreement}%,
top-1 drop <= {target.budget.max_top1_drop} points, SQNR >= {target.budget.min_sqnr_db} dB).
"""


def _android_readme(card: ModelCard, target: Target, model_file: str) -> str:
    delegate = target.execution.delegate.value
    return f"""# {model_file} for {target.name}

{target.description}.

Model: {card.precision}, input {card.input.dtype} {list(card.input.shape)} ({card.input.layout}),
output {card.output.dtype} {list(card.output.shape)}; preprocessing in `model_card.json`.

Android runs it without Python: in an app with the LiteRT (TensorFlow Lite) runtime and the
{delegate} delegate, or measured with TensorFlow Lite's `benchmark_model`:

```bash
adb push {model_file} /data/local/tmp/ && adb push benchmark_model /data/local/tmp/
adb shell /data/local/tmp/benchmark_model --graph=/data/local/tmp/{model_file} --num_threads={target.execution.threads} --use_{'xnnpack' if delegate == 'xnnpack' else delegate}=true
```

(`edgeship bench {model_file} --target {target.name} --adb SERIAL --benchmark-binary PATH` does the same
and parses the figures.)
"""
