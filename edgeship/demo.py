"""What ``edgeship demo`` needs on a machine with nothing but edgeship: the model and labelled photos.

The ONNX model zoo's MobileNetV2 (``mobilenetv2-7``, size and sha256 checked, :mod:`edgeship.zoo`)
and a few hundred ImageNet sample photos (:mod:`edgeship.samples`), both cached; the demo then runs
the same deploy as the README's main job on them. Either can be given locally instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeship import samples, zoo
from edgeship._progress import ProgressFn, silent
from edgeship.errors import InputError

#: The model the demo deploys unless told otherwise.
DEMO_MODEL = "mobilenetv2-7"
#: The targets of the main job.
DEMO_TARGETS = ("x86-host", "rpi4-aarch64", "android-arm64-cpu")
#: Calibration images (the rest of the photos are evaluated).
DEMO_NUM_CALIB = 100
PHOTOS_HINT = "offline, give the photos as --images DIR (labelled photos named <wnid>_<name>.jpg)"
OFFLINE_HINT = (
    "to run offline, give local copies: EDGESHIP_MODELS=DIR holding mobilenetv2-7.onnx (or --model FILE.onnx) "
    "and --images DIR (labelled photos named <wnid>_<name>.jpg)"
)


@dataclass(frozen=True)
class DemoInputs:
    """The demo's model file, photo folder and labels file, and where they came from."""

    model: Path
    images: Path
    labels: Path
    source: str


def demo_inputs(model: str = DEMO_MODEL, images: Path | None = None, *, progress: ProgressFn = silent) -> DemoInputs:
    """Resolve (download and check, or find cached) the model and the photos; raise one line if offline."""
    sset = samples.load_manifest()
    labels = samples.write_labels(samples.load_manifest(samples.SHIPPED))
    try:
        model_path = zoo.resolve(model, progress=progress)
    except InputError as exc:
        raise InputError(f"{exc}; {PHOTOS_HINT}") from None
    chosen = sset.spread(samples.DEMO_COUNT)
    try:
        folder = images if images is not None else samples.fetch_samples(chosen, progress=progress)
    except InputError as exc:
        raise InputError(f"{exc}; {OFFLINE_HINT}") from None
    where = f"{images} (given)" if images is not None else f"{len(chosen.photos)} photos from {chosen.base_url}"
    return DemoInputs(model_path, folder, labels, f"{where}; {samples.TERMS}")
