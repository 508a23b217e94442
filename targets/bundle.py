"""``bundle``: everything one target needs to run a model, in one folder.

A bundle holds the model, its ``model_card.json``, the labels, ``requirements.txt``
with the runtime package pinned for the target's architecture, the edgeship wheel
(the runtime part only needs numpy, Pillow and the interpreter), and a README with
the two commands to run it on the device.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgeship._io import atomic_copy, atomic_write_bytes, atomic_write_json, atomic_write_text, staged_output
from edgeship._lock import LOCK_FILE
from edgeship.errors import InputError, ModelTargetMismatchError, TargetError
from edgeship.runtime.card import CARD_FILE, ModelCard
from edgeship.runtime.classifier import find_card
from edgeship.runtime.images import Labels
from edgeship.runtime.model_check import check_model_file
from edgeship.runtime.ort_model import check_onnx_file
from edgeship.targets.install import (
    CHECK_SCRIPT,
    apt_command,
    bundle_install_command,
    check_script,
    device_requirements,
    requirements_text,
)
from edgeship.targets.metadata import METADATA_JSON, SCORES, client_normalization, embed_metadata, pixels_feed_exactly
from edgeship.targets.profile import ONNX_QDQ, Access, Release, Target
from edgeship.wheel import build_edgeship_wheel

README = "README.md"
REQUIREMENTS = "requirements.txt"


@dataclass(frozen=True)
class BundleResult:
    out_dir: Path
    target: str
    files: tuple[str, ...]


def check_fits(card: ModelCard, target: Target) -> None:
    """Raise :class:`ModelTargetMismatchError` (exit 4) when the model is not what the target runs."""
    need = target.model
    if card.precision != need.precision.value:
        raise ModelTargetMismatchError(
            f"target {target.name} runs {need.precision.value} models, this one is {card.precision}; "
            f"use the {need.precision.value} model"
        )
    if not need.fits_io(card.input.dtype, card.output.dtype):
        raise ModelTargetMismatchError(
            f"target {target.name} needs {need.io_dtype.value} I/O, the model has "
            f"{card.input.dtype}/{card.output.dtype}: quantize with --io {need.io_dtype.value}"
        )
    if target.runtime.client.reads_metadata:
        check_client_input(card, target)


def check_client_input(card: ModelCard, target: Target) -> None:
    """Raise :class:`ModelTargetMismatchError` when the target's client cannot feed the model's input right.

    MediaPipe Tasks takes one mean/std for all channels and copies pixels into a uint8
    input as they are.
    """

    client_normalization(card.preprocessing)
    if not pixels_feed_exactly(card):
        raise ModelTargetMismatchError(
            f"the model's uint8 input is not raw pixels (scale {card.input.scale}, zero point {card.input.zero_point} "
            f"for mean {list(card.preprocessing.mean)}, std {list(card.preprocessing.std)}), but the "
            f"{target.runtime.client.value} client of {target.name} feeds 0..255 pixels as they are"
        )


def bundle(
    model: str | os.PathLike[str],
    target: Target,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    wheel_dir: Path | None = None,
    interpreter_version: str | None = None,
    python: str | None = None,
) -> BundleResult:
    """Write the bundle of ``model`` (a .tflite with its card beside it) for ``target``.

    Args:
        model: The model file; its card is ``<stem>.card.json`` or the folder's ``model_card.json``.
        target: The target profile.
        out_dir: Bundle folder (existing contents only replaced with ``force``).
        wheel_dir: A folder holding a pre-built edgeship wheel (default: build one).
        interpreter_version: The interpreter version the drift check ran with, pinned with ``==``
            (default: :func:`~edgeship.targets.install.interpreter_pin`'s choice).
        python: The device Python the drift check ran on (e.g. ``3.13.5``): the bundle is for that OS
            release's runtime, and its ``check_device.py`` stops an install on any other Python (default:
            any release the target names).

    Raises:
        TargetError: The target refuses the release of ``python`` (no runtime there carries the model).
    """

    model = Path(model)
    if not model.is_file():
        raise InputError(f"model {model} does not exist")
    card = find_card(model)
    if card is None:
        raise InputError(f"no model card beside {model} (expected {model.stem}.card.json or {CARD_FILE})")
    check_fits(card, target)
    model_format = format_of(model)
    if model_format == ONNX_QDQ:
        check_onnx_file(model)  # onnxruntime checks the rest as it loads it
    else:
        check_model_file(model)  # never ship a model that crashes the device's interpreter
    labels = card.file(model.parent, "labels_file")  # never a file outside the model's folder
    release = target.release_for(None, python) if python else None
    runs = target.on_release(release)
    if release is not None and release.model_format != model_format:
        raise ModelTargetMismatchError(
            f"target {target.name} runs {release.model_format} models on {release.name}, this one is {model_format}"
        )
    names = [model.name, CARD_FILE, README, REQUIREMENTS, CHECK_SCRIPT, "wheels", METADATA_JSON] + (
        [card.labels_file] if card.labels_file else []
    )
    client = target.runtime.client
    with staged_output(out_dir, names, force=force) as stage:
        if client.reads_metadata:
            card = _with_metadata(model, card, labels, stage / model.name, stage / METADATA_JSON)
        else:
            atomic_copy(model, stage / model.name)
        atomic_write_json(stage / CARD_FILE, card.with_(model_file=model.name).to_dict())
        if labels is not None and labels.is_file():
            atomic_copy(labels, stage / labels.name)
        if target.access == Access.ADB:
            atomic_write_text(stage / README, _android_readme(card, target, model.name))
        else:
            wheel = _wheel(stage / "wheels", wheel_dir)
            reqs = device_requirements(runs, interpreter_version)
            atomic_write_text(stage / REQUIREMENTS, requirements_text(reqs, [wheel.name]))
            atomic_write_text(
                stage / CHECK_SCRIPT,
                check_script(target.name, _verified_pythons(target, release, python, model_format)),
            )
            pin = reqs[-1] if runs.runtime.source == "pip" else f"{runs.runtime.package}{runs.runtime.versions} (apt)"
            atomic_write_text(stage / README, _python_readme(card, target, model.name, pin, release, model_format))
    out = Path(out_dir)
    return BundleResult(out, target.name, tuple(sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)))


def _with_metadata(model: Path, card: ModelCard, labels_path: Path | None, dest: Path, meta_json: Path) -> ModelCard:
    """Write ``model`` to ``dest`` with TFLite Metadata embedded; the card records it too."""

    labels = Labels.load(labels_path).names if labels_path is not None and labels_path.is_file() else None
    data, meta = embed_metadata(model.read_bytes(), card, labels)
    atomic_write_bytes(dest, data)
    atomic_write_json(meta_json, meta.to_dict())
    note = (
        f"TFLite Metadata embedded (MediaPipe metadata writer): ImageClassifier, {meta.color_space}, "
        f"normalisation mean {list(meta.norm_mean)} std {list(meta.norm_std)} on 0..255 pixels, "
        f"scores are {meta.score}, labels {meta.labels_file or 'none'}; see {METADATA_JSON}"
    )
    return card.with_(notes=(*card.notes, note))


def _wheel(dest: Path, wheel_dir: Path | None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if wheel_dir is not None:
        found = sorted(wheel_dir.glob("edgeship-*.whl"))
        if not found:
            raise InputError(f"no edgeship wheel in {wheel_dir}")
        return atomic_copy(found[-1], dest / found[-1].name)
    return build_edgeship_wheel(dest)


_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>()#+!|~])")


def md_text(text: str) -> str:
    """Profile text as Markdown text: every character Markdown acts on escaped (no fence, link or HTML)."""
    return _MARKDOWN.sub(r"\\\1", " ".join(text.split()))


def format_of(model: Path) -> str:
    """The model form a file holds, as a release's ``model_format`` names it."""
    return ONNX_QDQ if model.suffix.lower() == ".onnx" else "tflite"


def _verified_pythons(
    target: Target, release: Release | None, python: str | None, model_format: str = "tflite"
) -> dict[str, str]:
    """major.minor -> OS release the bundle may install on: the drift check's, else every release named that
    runs this model form."""
    if python:
        minor = ".".join(python.split(".")[:2])
        return {minor: release.name if release else "the drift check's device"}
    named = {r.python: r.name for r in target.releases if not r.refuse and r.model_format == model_format}
    return named or {f"{v[0]}.{v[1]}": "any" for v in ((3, 9), (3, 10), (3, 11), (3, 12), (3, 13))}


def install_commands(target: Target) -> list[str]:
    """The README's command sequence on the device, for ``target`` as it runs on one release."""
    apt = apt_command(target)
    return [
        *([apt] if apt else []),
        bundle_install_command(target),
        f".venv/bin/python -m edgeship.runtime . IMAGE.jpg [IMAGE ...] --threads {target.execution.threads}",
    ]


def _release_sections(target: Target, release: Release | None, model_format: str = "tflite") -> str:
    """One section per OS release the target names: this bundle's commands, or why not this bundle."""
    parts = []
    for r in target.releases:
        head = f"### Raspberry Pi OS {r.name} (Python {r.python})"
        if r.refuse:
            parts.append(f"{head}\n\n{target.name} does not run there: {md_text(r.refuse)}.\n")
        elif r.model_format != model_format:
            parts.append(
                f"{head}\n\nNot this bundle: {target.name} runs the {_FORMATS[r.model_format]} there "
                f"({r.runtime(target.runtime).package} from {r.source}), and this bundle holds the "
                f"{_FORMATS[model_format]}. Deploy again with `--host` on a {r.name} device.\n"
            )
        elif release is not None and r.name != release.name:
            parts.append(
                f"{head}\n\nNot this bundle: it was verified on {release.name}, and `{CHECK_SCRIPT}` stops its "
                f"install on Python {r.python} in one line. Deploy again with `--host` on a {r.name} device.\n"
            )
        else:
            commands = "\n".join(install_commands(target.on_release(r)))
            parts.append(f"{head}\n\nOn the device, in this folder:\n\n```bash\n{commands}\n```\n")
    return "\n".join(parts)


#: How a README names each model form.
_FORMATS = {"tflite": "int8 TFLite model", ONNX_QDQ: "int8 ONNX QDQ model"}


def _python_readme(
    card: ModelCard,
    target: Target,
    model_file: str,
    runtime_pin: str,
    release: Release | None = None,
    model_format: str = "tflite",
) -> str:
    runs = target.on_release(release)
    apt = apt_command(runs)
    os_line = (
        f"numpy and Pillow come from the OS ({', '.join(runs.runtime.system_packages)}): PyPI has no "
        "wheels of them for this CPU, and the venv sees them (`--system-site-packages`); no compiler is "
        "needed.\n"
        if apt
        else "Everything installs from PyPI wheels; no compiler is needed.\n"
    )
    if target.releases:
        install = _release_sections(target, release, model_format)
    else:
        commands = "\n".join(install_commands(runs))
        install = f"On the device, in this folder:\n\n```bash\n{commands}\n```\n"
    verified = f" on Python {release.python} (Raspberry Pi OS {release.name})" if release else ""
    return f"""# {model_file} for {target.name}

{md_text(target.description)}.

Model: {card.precision}, input {card.input.dtype} {list(card.input.shape)} ({card.input.layout}),
output {card.output.dtype} {list(card.output.shape)}; preprocessing in `model_card.json`.
Runtime: `{runtime_pin}`, the interpreter version the accuracy check ran with{verified};
{md_text(target.runtime.note)}.
{os_line}
`{CHECK_SCRIPT}` runs first and stops the install in one line on a Python this bundle was not verified for.

{install}
The last command prints the top-5 classes of each image and which interpreter and
delegate ran. Accuracy drift against the float model was checked with `edgeship verify`
on the host for this target (budget: top-1 agreement >= {target.budget.min_top1_agreement}%,
top-1 drop <= {target.budget.max_top1_drop} points, SQNR >= {target.budget.min_sqnr_db} dB).
"""


def _android_readme(card: ModelCard, target: Target, model_file: str) -> str:
    delegate = target.execution.delegate.value
    return f"""# {model_file} for {target.name}

{md_text(target.description)}.

Model: {card.precision}, input {card.input.dtype} {list(card.input.shape)} ({card.input.layout}),
output {card.output.dtype} {list(card.output.shape)}; preprocessing in `model_card.json`.
{_metadata_line(card, target)}
Android runs it without Python: in an app with MediaPipe Tasks or the LiteRT (TensorFlow Lite)
runtime and the {delegate} delegate, or measured with TensorFlow Lite's `benchmark_model`:

```bash
adb push {model_file} /data/local/tmp/ && adb push benchmark_model /data/local/tmp/
adb shell /data/local/tmp/benchmark_model --graph=/data/local/tmp/{model_file} --num_threads={target.execution.threads} --use_{"xnnpack" if delegate == "xnnpack" else delegate}=true
```

(`edgeship bench {model_file} --target {target.name} --adb SERIAL --benchmark-binary PATH` does the same
and parses the figures.)
{_kotlin(card, target, model_file)}"""


def _metadata_line(card: ModelCard, target: Target) -> str:
    if not target.runtime.client.reads_metadata:
        return ""
    return (
        "\nThe model carries TFLite Metadata (written with MediaPipe's metadata writer; also in "
        f"`{METADATA_JSON}` and the card's notes): normalisation, RGB, the labels file, what the scores are.\n"
    )


def _kotlin(card: ModelCard, target: Target, model_file: str) -> str:
    """Kotlin for MediaPipe Tasks and for the plain LiteRT Interpreter with this model's exact values."""

    prep, inp, out = card.preprocessing, card.input, card.output
    try:
        mean, std = client_normalization(prep)
    except TargetError:
        return (
            "\nThis model's normalisation differs per channel: MediaPipe Tasks cannot express it "
            "(convert with `--pixels-in-graph`).\n"
        )
    h, w = prep.crop
    resize = prep.resize_shorter or max(h, w)
    score = SCORES[card.postprocessing]
    delegate = target.execution.delegate.value
    mp_delegate = ".setDelegate(Delegate.GPU)" if delegate == "gpu" else ".setDelegate(Delegate.CPU)"
    if inp.dtype == "uint8":
        put = "buf.put(((p shr 16) and 0xFF).toByte()); buf.put(((p shr 8) and 0xFF).toByte()); buf.put((p and 0xFF).toByte())"
        alloc = f"ByteBuffer.allocateDirect({h} * {w} * 3)"
        feed = "uint8 pixels as they are (the input quantization is the normalisation)"
    else:
        put = f"for (c in intArrayOf(16, 8, 0)) buf.putFloat((((p shr c) and 0xFF) - {mean:g}f) / {std:g}f)"
        alloc = f"ByteBuffer.allocateDirect({h} * {w} * 3 * 4)"
        feed = f"float32 (pixel - {mean:g}) / {std:g}"
    if out.dtype == "uint8":
        out_decl = f"Array(1) {{ ByteArray({card.num_classes}) }}"
        out_read = (
            f"val scores = FloatArray({card.num_classes}) {{ i -> ((out[0][i].toInt() and 0xFF) - "
            f"{out.zero_point}) * {out.scale!r}f }}"
        )
    else:
        out_decl = f"Array(1) {{ FloatArray({card.num_classes}) }}"
        out_read = "val scores = out[0]"
    labels = card.labels_file or "labels.txt"
    options = {
        "xnnpack": f"Interpreter.Options().setNumThreads({target.execution.threads})",
        "gpu": "Interpreter.Options().addDelegate(GpuDelegate())",
        "nnapi": "Interpreter.Options().addDelegate(NnApiDelegate())",
    }.get(delegate, "Interpreter.Options()")
    extra_import = {
        "gpu": "\nimport org.tensorflow.lite.gpu.GpuDelegate  // com.google.ai.edge.litert:litert-gpu",
        "nnapi": "\nimport org.tensorflow.lite.nnapi.NnApiDelegate",
    }.get(delegate, "")
    return f"""
## In an app (Kotlin)

Not compiled here (no Android SDK on the build machine): written against MediaPipe Tasks Vision
(`com.google.mediapipe:tasks-vision`) and LiteRT (`com.google.ai.edge.litert:litert`, the
`org.tensorflow.lite.Interpreter` API); check the API of the versions you use.
Put `{model_file}` in `src/main/assets/`. Scores are {score}.

What MediaPipe's ImageClassifier does with an image: it stretches the whole image (or the region of
interest you pass) to {w}x{h} with bilinear sampling (OpenCV `INTER_LINEAR`, no antialiasing), with no
center crop and without keeping the aspect ratio, then feeds {feed}. The model was trained and
checked on a different crop: shorter side resized to {resize}, center {w}x{h}. Pass that crop as the
region of interest. MediaPipe resamples without smoothing, so give it a bitmap already scaled to the
card's size (shorter side {resize}, filtered: `Bitmap.createScaledBitmap(bitmap, sw, sh, true)`), or the
{w}x{h} crop itself (as `input()` below makes it: MediaPipe's resize is then the identity and it answers
like edgeship's runtime on the same pixels):

```kotlin
import android.graphics.RectF
import com.google.mediapipe.framework.image.BitmapImageBuilder
import com.google.mediapipe.tasks.core.BaseOptions
import com.google.mediapipe.tasks.core.Delegate
import com.google.mediapipe.tasks.vision.core.ImageProcessingOptions
import com.google.mediapipe.tasks.vision.core.RunningMode
import com.google.mediapipe.tasks.vision.imageclassifier.ImageClassifier
import kotlin.math.roundToInt

val classifier = ImageClassifier.createFromOptions(context,
    ImageClassifier.ImageClassifierOptions.builder()
        .setBaseOptions(BaseOptions.builder().setModelAssetPath("{model_file}"){mp_delegate}.build())
        .setRunningMode(RunningMode.IMAGE)
        .setMaxResults(5)
        .build())

// The model's own crop, normalized to 0..1: the card resizes the shorter side to {resize} and
// crops the centre {w}x{h} at whole pixels of the resized image.
fun modelCrop(width: Int, height: Int): RectF {{
    val s = {resize}f / minOf(width, height)
    val sw = maxOf({w}, (width * s).roundToInt())
    val sh = maxOf({h}, (height * s).roundToInt())
    val left = ((sw - {w}) / 2).toFloat() / sw
    val top = ((sh - {h}) / 2).toFloat() / sh
    return RectF(left, top, left + {w}f / sw, top + {h}f / sh)
}}

val roi = ImageProcessingOptions.builder().setRegionOfInterest(modelCrop(bitmap.width, bitmap.height)).build()
val result = classifier.classify(BitmapImageBuilder(bitmap).build(), roi)
val best = result.classificationResult().classifications()[0].categories()[0]
// best.categoryName() comes from the labels packed in the model; best.score() is {score}.
```

With the plain LiteRT `Interpreter` the app does all of the preprocessing itself, exactly as the
model card says (shorter side to {resize} with bilinear filtering, center crop {w}x{h}, RGB, {feed}):

```kotlin
import android.content.Context
import android.graphics.Bitmap
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.MappedByteBuffer
import java.nio.channels.FileChannel
import kotlin.math.roundToInt
import org.tensorflow.lite.Interpreter{extra_import}

// The asset must be stored uncompressed to be memory-mapped: androidResources {{ noCompress += "tflite" }}
fun loadModelFile(context: Context, name: String): MappedByteBuffer =
    context.assets.openFd(name).use {{ fd ->
        FileInputStream(fd.fileDescriptor).channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
    }}

val interpreter = Interpreter(loadModelFile(context, "{model_file}"), {options})

fun input(bitmap: Bitmap): ByteBuffer {{
    val s = {resize}f / minOf(bitmap.width, bitmap.height)
    val scaled = Bitmap.createScaledBitmap(bitmap, (bitmap.width * s).roundToInt(), (bitmap.height * s).roundToInt(), true)
    val crop = Bitmap.createBitmap(scaled, (scaled.width - {w}) / 2, (scaled.height - {h}) / 2, {w}, {h})
    val px = IntArray({w} * {h}).also {{ crop.getPixels(it, 0, {w}, 0, 0, {w}, {h}) }}
    val buf = {alloc}.order(ByteOrder.nativeOrder())
    for (p in px) {{ {put} }}
    return buf.rewind() as ByteBuffer
}}

val out = {out_decl}
interpreter.run(input(bitmap), out)
{out_read}  // {score}
val top1 = scores.indices.maxByOrNull {{ scores[it] }}!!  // line top1 of {labels}
```

(edgeship's checks resize with Pillow's bilinear filter, which smooths when shrinking; Android's bitmap
scaling is not bit-identical to it, so answers near a tie can differ.)
"""
