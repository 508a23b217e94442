"""How much of a model XNNPACK runs: partitions and the ops left to TFLite's own kernels.

Every op outside the delegate runs on TFLite's kernels, with copies at each partition
boundary; a graph that shatters into many partitions can make int8 slower than float.
After the delegate is applied, the interpreter lists each partition as one ``DELEGATE``
node whose inputs and outputs are the partition's boundary tensors. The ops of a
partition are the ones found walking back from its outputs to its inputs; every other
op runs outside.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: ``platform.machine()`` spellings of the targets' architectures (macOS, Windows).
_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def host_arch() -> str:
    """This machine's architecture as target profiles name it (``x86_64``, ``aarch64``, ``armv7l``)."""
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


def op_counts(counts: Mapping[str, int]) -> str:
    """``HARD_SWISH x20, GELU x14``: op types and how many, in the mapping's order (empty: ``""``)."""
    return ", ".join(f"{name} x{n}" for name, n in counts.items())


@dataclass(frozen=True)
class Delegation:
    """XNNPACK's share of a model.

    Attributes:
        partitions: Number of XNNPACK partitions (1 is a whole graph inside the delegate).
        ops: Number of ops in the model.
        outside: Op type -> count of the ops that run outside the delegate.
    """

    partitions: int
    ops: int
    outside: dict[str, int] = field(default_factory=dict)
    #: Output tensor names of the ops outside the delegate, in graph order.
    outside_outputs: tuple[str, ...] = ()

    @property
    def delegated_ops(self) -> int:
        return self.ops - sum(self.outside.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "partitions": self.partitions,
            "ops": self.ops,
            "delegated_ops": self.delegated_ops,
            "outside": dict(self.outside),
            "outside_outputs": list(self.outside_outputs),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Delegation:
        return cls(d["partitions"], d["ops"], dict(d.get("outside", {})), tuple(d.get("outside_outputs", ())))

    def summary(self) -> str:
        outside = op_counts(self.outside) or "none"
        return f"{self.partitions} XNNPACK partition(s), {self.delegated_ops}/{self.ops} ops inside; outside: {outside}"


def of_interpreter(interpreter: Any) -> Delegation:
    """Delegation figures of an allocated interpreter (one made with the XNNPACK delegate)."""
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    return delegation(interpreter._get_ops_details(), names)  # noqa: SLF001 - the only view of the nodes


#: Name prefix of TensorFlow Select ops: custom ops that only TensorFlow's Flex delegate runs (never XNNPACK,
#: and no on-device interpreter).
FLEX_PREFIX = "Flex"


def flex_refusal(ops: Mapping[str, int]) -> str | None:
    """Why a model with these ops (name -> count) cannot run on a device: it holds TensorFlow Select ops.

    ``needs TensorFlow Select ops the on-device runtime does not have: FlexErf x2``; None without any.
    The one rule for convert's check of the file and the interpreter's refusal to load it.
    """
    flex = Counter({name: n for name, n in ops.items() if name.startswith(FLEX_PREFIX)})
    if not flex:
        return None
    return f"needs TensorFlow Select ops the on-device runtime does not have: {op_counts(dict(flex.most_common()))}"


def delegation(ops: list[dict[str, Any]], names: dict[int, str] | None = None) -> Delegation:
    """Delegation figures from an XNNPACK interpreter's ``_get_ops_details()`` (and tensor names).

    In a process that has TensorFlow loaded, the interpreter also applies TensorFlow's
    Flex delegate to Select TF ops (``FlexErf``...), one ``DELEGATE`` node each. Those
    are not XNNPACK partitions: their ops count as outside and they are not counted.
    """
    original = [op for op in ops if op["op_name"] != "DELEGATE"]
    producer = {int(t): i for i, op in enumerate(original) for t in op["outputs"]}
    inside: set[int] = set()
    partitions = 0
    for part in (op for op in ops if op["op_name"] == "DELEGATE"):
        members = _members(part, original, producer)
        if any(original[i]["op_name"].startswith(FLEX_PREFIX) for i in members):
            continue
        partitions += 1
        inside |= members
    left = [op for i, op in enumerate(original) if i not in inside]
    outside = Counter(op["op_name"] for op in left)
    outputs = tuple(
        (names or {}).get(int(op["outputs"][0]), str(op["outputs"][0])) for op in left if len(op["outputs"])
    )
    return Delegation(partitions, len(original), dict(outside.most_common()), outputs)


def _members(part: dict[str, Any], original: list[dict[str, Any]], producer: dict[int, int]) -> set[int]:
    """Indices of the ops a ``DELEGATE`` node replaced: walking back from its outputs to its inputs."""
    stop = {int(t) for t in part["inputs"]}
    todo = [int(t) for t in part["outputs"]]
    members: set[int] = set()
    while todo:
        t = todo.pop()
        i = producer.get(t)
        if t in stop or i is None or i in members:
            continue
        members.add(i)
        todo.extend(int(x) for x in original[i]["inputs"] if x >= 0)
    return members
