"""A bounds-checking walk over a TFLite flatbuffer, in pure Python (no flatbuffers package).

The TFLite interpreters trust the file: an offset past the end of a truncated file, or
a tensor index a flipped byte made too large, is read anyway and may crash the
process, or not, depending on what lies in memory there. This walk reads every table
the interpreter reads while loading (model, operator codes, subgraphs, tensors,
quantization, operators, buffers, metadata, signatures), checks that each offset,
vtable, vector and string lies inside the file, and that every index points at
something that exists. Operator option tables are checked as tables, not field by field.
Field numbers follow ``tensorflow/lite/schema/schema.fbs``.
"""

from __future__ import annotations

import struct


class FlatbufferError(ValueError):
    """The file is not a well-formed TFLite flatbuffer; the message says where."""


class _Table:
    """One flatbuffer table at ``pos`` in ``buf`` (its vtable checked)."""

    __slots__ = ("buf", "pos", "vt", "vt_size", "t_size", "what")

    def __init__(self, buf: bytes, pos: int, what: str) -> None:
        self.buf, self.pos, self.what = buf, pos, what
        _need(buf, pos, 4, what)
        self.vt = pos - struct.unpack_from("<i", buf, pos)[0]
        _need(buf, self.vt, 4, f"{what} vtable")
        self.vt_size, self.t_size = struct.unpack_from("<HH", buf, self.vt)
        if self.vt_size < 4 or self.vt_size % 2:
            raise FlatbufferError(f"{what}: bad vtable size {self.vt_size}")
        _need(buf, self.vt, self.vt_size, f"{what} vtable")
        _need(buf, pos, max(self.t_size, 4), what)

    def _field(self, slot: int, size: int) -> int | None:
        """Absolute position of field ``slot`` (None when absent); it must lie inside the table."""
        at = 4 + 2 * slot
        if at >= self.vt_size:
            return None
        off = struct.unpack_from("<H", self.buf, self.vt + at)[0]
        if off == 0:
            return None
        if off + size > self.t_size:
            raise FlatbufferError(f"{self.what}: field {slot} lies outside its table")
        return self.pos + off

    def scalar(self, slot: int, fmt: str, default: int = 0) -> int:
        at = self._field(slot, struct.calcsize(fmt))
        return default if at is None else struct.unpack_from("<" + fmt, self.buf, at)[0]

    def _target(self, slot: int, what: str) -> int | None:
        at = self._field(slot, 4)
        if at is None:
            return None
        target = at + struct.unpack_from("<I", self.buf, at)[0]
        _need(self.buf, target, 4, what)
        return target

    def table(self, slot: int, what: str) -> _Table | None:
        target = self._target(slot, what)
        return None if target is None else _Table(self.buf, target, what)

    def vector(self, slot: int, elem: int, what: str) -> tuple[int, int]:
        """(start, length) of a vector field ((0, 0) when absent), all of it inside the file."""
        target = self._target(slot, what)
        if target is None:
            return 0, 0
        n = struct.unpack_from("<I", self.buf, target)[0]
        _need(self.buf, target + 4, n * elem, what)
        return target + 4, n

    def ints(self, slot: int, what: str, fmt: str = "i") -> tuple[int, ...]:
        start, n = self.vector(slot, struct.calcsize(fmt), what)
        return struct.unpack_from(f"<{n}{fmt}", self.buf, start) if n else ()

    def string(self, slot: int, what: str) -> None:
        start, n = self.vector(slot, 1, f"{what} string")
        if start:
            _need(self.buf, start + n, 1, f"{what} string end")
            if self.buf[start + n] != 0:
                raise FlatbufferError(f"{what}: string is not terminated")
            try:  # the interpreter's Python API decodes names as UTF-8 and raises deep inside otherwise
                bytes(self.buf[start : start + n]).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FlatbufferError(f"{what}: string is not UTF-8 ({exc.reason} at byte {exc.start})") from None

    def tables(self, slot: int, what: str) -> list[_Table]:
        start, n = self.vector(slot, 4, what)
        out = []
        for k in range(n):
            at = start + 4 * k
            out.append(_Table(self.buf, at + struct.unpack_from("<I", self.buf, at)[0], f"{what}[{k}]"))
        return out


def _need(buf: bytes, pos: int, size: int, what: str) -> None:
    if pos < 0 or size < 0 or pos + size > len(buf):
        raise FlatbufferError(
            f"{what} lies outside the {len(buf)}-byte file (at {pos}, {size} bytes): truncated or corrupt"
        )


def _indices(values: tuple[int, ...], limit: int, what: str, optional: bool = False) -> None:
    low = -1 if optional else 0
    for v in values:
        if not low <= v < limit:
            raise FlatbufferError(f"{what} refers to tensor {v}, but there are {limit}")


def _check_tensor(t: _Table, n_buffers: int) -> None:
    t.ints(0, f"{t.what}.shape")
    t.ints(7, f"{t.what}.shape_signature")
    t.string(3, t.what)
    buffer = t.scalar(2, "I")
    if buffer >= n_buffers:
        raise FlatbufferError(f"{t.what} uses buffer {buffer}, but there are {n_buffers}")
    q = t.table(4, f"{t.what}.quantization")
    if q is not None:
        for slot, fmt in ((0, "f"), (1, "f"), (2, "f"), (3, "q")):
            q.ints(slot, f"{t.what}.quantization", fmt)
        q.table(5, f"{t.what}.quantization.details")
    s = t.table(6, f"{t.what}.sparsity")
    if s is not None:
        s.ints(0, f"{t.what}.sparsity.traversal_order")
        s.ints(1, f"{t.what}.sparsity.block_map")
        s.tables(2, f"{t.what}.sparsity.dim_metadata")


def _check_operator(op: _Table, n_codes: int, n_tensors: int) -> None:
    code = op.scalar(0, "I")
    if code >= n_codes:
        raise FlatbufferError(f"{op.what} uses operator code {code}, but there are {n_codes}")
    _indices(op.ints(1, f"{op.what}.inputs"), n_tensors, f"{op.what} input", optional=True)
    _indices(op.ints(2, f"{op.what}.outputs"), n_tensors, f"{op.what} output", optional=True)
    _indices(op.ints(8, f"{op.what}.intermediates"), n_tensors, f"{op.what} intermediate", optional=True)
    op.table(4, f"{op.what}.builtin_options")
    op.table(12, f"{op.what}.builtin_options_2")
    op.vector(5, 1, f"{op.what}.custom_options")
    op.vector(7, 1, f"{op.what}.mutating_variable_inputs")


def _check_subgraph(g: _Table, n_codes: int, n_buffers: int) -> None:
    tensors = g.tables(0, f"{g.what}.tensors")
    for t in tensors:
        _check_tensor(t, n_buffers)
    _indices(g.ints(1, f"{g.what}.inputs"), len(tensors), f"{g.what} input")
    _indices(g.ints(2, f"{g.what}.outputs"), len(tensors), f"{g.what} output")
    g.string(4, g.what)
    for op in g.tables(3, f"{g.what}.operators"):
        _check_operator(op, n_codes, len(tensors))


def _check_buffer(b: _Table, size: int) -> None:
    b.vector(0, 1, f"{b.what}.data")
    offset, length = b.scalar(1, "Q"), b.scalar(2, "Q")
    if offset and (offset + length > size or offset < 8):
        raise FlatbufferError(f"{b.what} points at bytes {offset}..{offset + length} of a {size}-byte file")


def verify_tflite(buf: bytes) -> None:
    """Raise :class:`FlatbufferError` unless ``buf`` is a TFLite model whose tables all lie inside it.

    Args:
        buf: The whole ``.tflite`` file.
    """
    _need(buf, 0, 8, "file header")
    if buf[4:8] != b"TFL3":
        raise FlatbufferError("no TFL3 identifier at byte 4: not a TFLite model")
    model = _Table(buf, struct.unpack_from("<I", buf, 0)[0], "model")
    codes = model.tables(1, "operator_codes")
    for c in codes:
        c.string(1, c.what)
    buffers = model.tables(4, "buffers")
    for b in buffers:
        _check_buffer(b, len(buf))
    subgraphs = model.tables(2, "subgraphs")
    if not subgraphs:
        raise FlatbufferError("the model has no subgraph")
    for g in subgraphs:
        _check_subgraph(g, len(codes), len(buffers))
    model.string(3, "description")
    model.ints(5, "metadata_buffer")
    for m in model.tables(6, "metadata"):
        m.string(0, m.what)
        if m.scalar(1, "I") >= len(buffers):
            raise FlatbufferError(f"{m.what} uses buffer {m.scalar(1, 'I')}, but there are {len(buffers)}")
    for s in model.tables(7, "signature_defs"):
        _check_signature(s, [len(g.tables(0, f"{g.what}.tensors")) for g in subgraphs])


def _check_signature(s: _Table, tensors_per_subgraph: list[int]) -> None:
    index = s.scalar(4, "I")
    if index >= len(tensors_per_subgraph):
        raise FlatbufferError(f"{s.what} names subgraph {index}, but there are {len(tensors_per_subgraph)}")
    for slot, kind in ((0, "inputs"), (1, "outputs")):
        for m in s.tables(slot, f"{s.what}.{kind}"):
            m.string(0, m.what)
            _indices((m.scalar(1, "I"),), tensors_per_subgraph[index], m.what)
    s.string(2, s.what)
