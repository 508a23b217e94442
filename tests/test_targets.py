"""Target profiles: every built-in one loads; bad files fail naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.errors import TargetError
from edgeship.targets import list_targets, load_target

REQUIRED = {
    "x86-host",
    "rpi4-aarch64",
    "rpi5-aarch64",
    "rpi-armv7",
    "android-arm64-cpu",
    "android-gpu",
    "android-nnapi",
    "android-nnapi-pertensor",
}
GOOD = (Path(__file__).parents[1] / "targets" / "rpi4-aarch64.toml").read_text()


def test_all_required_targets_exist_and_validate() -> None:
    assert REQUIRED <= set(list_targets())
    for name in list_targets():
        t = load_target(name)
        assert t.name == name and t.budget.min_top1_agreement > 0


def test_facts_that_matter() -> None:
    assert load_target("rpi-armv7").runtime.package == "tflite-runtime"  # no ai-edge-litert armv7l wheel
    assert load_target("rpi4-aarch64").runtime.package == "ai-edge-litert"
    gpu = load_target("android-gpu")
    assert gpu.model.precision.value == "float16" and gpu.execution.delegate.value == "gpu"
    nnapi = load_target("android-nnapi")
    assert nnapi.model.io_dtype.value == "uint8" and nnapi.model.int8_only and nnapi.access.value == "adb"


def test_nnapi_takes_per_channel_weights_and_a_per_tensor_profile_remains() -> None:
    """NNAPI accepts per-channel symmetric weights since Android 10; older drivers get their own profile."""
    from edgeship.quantize import QuantizeOptions

    nnapi, legacy = load_target("android-nnapi"), load_target("android-nnapi-pertensor")
    assert not nnapi.model.per_tensor and legacy.model.per_tensor
    assert (nnapi.execution, nnapi.budget, nnapi.runtime) == (legacy.execution, legacy.budget, legacy.runtime)
    assert not QuantizeOptions.for_target(nnapi).per_tensor and QuantizeOptions.for_target(legacy).per_tensor
    assert not QuantizeOptions.for_target(nnapi).float_islands


def test_float_scores_fit_only_targets_that_allow_mixed_models() -> None:
    """Float logits (an int8 model with float32 scores) suit the XNNPACK CPU targets, never full-integer NNAPI."""
    android, nnapi, pi = (load_target(n).model for n in ("android-arm64-cpu", "android-nnapi", "rpi4-aarch64"))
    assert android.fits_io("uint8", "float32") and android.fits_io("uint8", "uint8")
    assert pi.fits_io("int8", "float32") and not pi.fits_io("float32", "float32") and not pi.fits_io("uint8", "uint8")
    assert nnapi.fits_io("uint8", "uint8") and not nnapi.fits_io("uint8", "float32")


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(TargetError) as exc:
        load_target("rpi9")
    assert "rpi4-aarch64" in str(exc.value) and "x86-host" in str(exc.value)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda s: s.replace("threads = 4", "threads = 4\nturbo = true"), "unknown key 'execution.turbo'"),
        (lambda s: s.replace("threads = 4", 'threads = "four"'), "key 'execution.threads' must be int"),
        (lambda s: s.replace("min_sqnr_db = 18.0\n", ""), "missing key 'budget.min_sqnr_db'"),
        (lambda s: s.replace("[budget]", "[budgets]"), "unknown key 'target.budgets'"),
        (lambda s: s[: s.index("[budget]")], "missing section [budget]"),
        (lambda s: s.replace('delegate = "xnnpack"', 'delegate = "tpu"'), "'tpu' is not a valid Delegate"),
        (lambda s: s.replace('name = "rpi4-aarch64"', 'name = "x"\ncolour = "red"'), "unknown key 'target.colour'"),
        (lambda s: s + "[[[", "not valid TOML"),
    ],
)
def test_invalid_profiles_name_file_and_key(tmp_path: Path, edit, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "mine.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(TargetError) as exc:
        load_target(path)
    assert str(path) in str(exc.value) and expected in str(exc.value)


def test_profile_from_path(tmp_path: Path) -> None:
    path = tmp_path / "lab-pi.toml"
    path.write_text(GOOD.replace('name = "rpi4-aarch64"', 'name = "lab-pi"'))
    assert load_target(path).name == "lab-pi"


def test_cli_json_output(tmp_path: Path) -> None:
    import json

    assert main(["targets", "list", "-q", "--json", str(tmp_path / "t.json")]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["exit_code"] == 0 and {t["name"] for t in doc["targets"]} >= REQUIRED


def test_cli_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REQUIRED)
    assert "android-nnapi-pertensor  aarch64" in out  # the name column fits the longest name
    assert main(["targets", "show", "rpi-armv7"]) == 0
    out = capsys.readouterr().out
    assert "tflite-runtime" in out and "armv7l" in out
    assert main(["targets", "show", "nope"]) == 1
    assert "valid targets" in capsys.readouterr().err
