"""The project's one wire format: a typed, versioned frame around a safetensors payload.

Every message that crosses a trust boundary (client <-> server, in process or over Flower) is a
:class:`Frame`. Nothing on the wire is ever unpickled: the header is JSON, the tensors are
safetensors (a format designed to be parsed safely from untrusted bytes).

Layout (integers big-endian)::

    offset  size  field
    0       4     magic            b"FRLH"
    4       1     version          WIRE_VERSION (1)
    5       1     kind_len         k, 1..64
    6       k     kind             ASCII, e.g. "plain/update", "secagg/masked-input"
    6+k     4     header_len       h, <= MAX_HEADER_BYTES
    10+k    h     header           UTF-8 JSON object (typed fields; no floats where ints are meant)
    10+k+h  4     payload_len      p
    14+k+h  p     payload          safetensors bytes (p == 0: no tensors)

The decoder checks every length against the bytes actually present and against the caller's
limits *before* parsing anything, so a forged length cannot make it allocate or read out of
bounds. Raw byte strings (ciphertexts, keys) travel as uint8 tensors.

Zero copy (issue 16): the payload is the safetensors format (8-byte little-endian header length,
a JSON header ``{name: {dtype, shape, data_offsets}}`` padded with spaces to a multiple of 8, then
the tensors' bytes back to back), but this module writes and reads it itself instead of calling the
``safetensors`` package, whose ``save`` copies every tensor twice (into a Rust buffer, then into a
Python ``bytes``) and whose ``load`` copies it once more out of the frame. :func:`encode` copies
each tensor exactly once, straight into the frame (one ``bytes.join`` over the tensors' buffers);
:func:`decode` validates the whole safetensors header first (size, JSON depth and integer lengths,
known dtypes, non-negative integer shapes, offsets that tile the data exactly, sizes that match the
shapes) and only then views each tensor in place with ``np.frombuffer`` — read-only, as the arrays
``safetensors.numpy.load`` returns were. For a 400 KB masked vector that removes four of five copies
per message. The bytes are interchangeable with the ``safetensors`` package in both directions
(tests/test_wire.py checks both).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import AggregationError

MAGIC = b"FRLH"
WIRE_VERSION = 1
MAX_KIND_BYTES = 64
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_DEPTH = 32
"""Deepest nesting of JSON arrays/objects a header may have (ours use at most 4). Checked before
parsing: an unbounded depth makes ``json.loads`` fail with RecursionError, not a decoding error."""
MAX_INT_DIGITS = 64
"""Longest integer literal a header may hold (field elements of GF(2^61 − 1) have 19 digits). Beyond
4,300 digits ``int()`` raises ValueError; long ones also cost quadratic time to parse."""
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_LONG_DIGITS = re.compile(rb"[0-9]{%d,}" % (MAX_INT_DIGITS + 1))
DEFAULT_MAX_FRAME_BYTES = 1 << 31
MAX_TENSOR_HEADER_BYTES = 100_000_000
"""The safetensors header limit (the ``safetensors`` package refuses larger headers too)."""

_ST_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
"""safetensors dtype names numpy can hold (the ones ``safetensors.numpy`` maps), little-endian."""
_ST_NAMES = {(dt.kind, dt.itemsize): name for name, dt in _ST_DTYPES.items()}


class WireError(AggregationError, ValueError):
    """A frame is malformed, too large, of the wrong kind, or missing a field; the message says which."""


@dataclass(frozen=True)
class Frame:
    """One message: a kind (what it is), a small typed header, and named tensors."""

    kind: str
    header: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)

    def field(self, name: str, typ: type | tuple[type, ...]) -> Any:
        """Header field ``name``, checked to be of ``typ`` (bool is never accepted as int)."""
        if name not in self.header:
            raise WireError(f"{self.kind}: header field {name!r} is missing")
        value = self.header[name]
        types = typ if isinstance(typ, tuple) else (typ,)
        if isinstance(value, bool) and bool not in types:
            raise WireError(f"{self.kind}: header field {name!r} must be {_names(types)}, got bool")
        if not isinstance(value, types):
            raise WireError(f"{self.kind}: header field {name!r} must be {_names(types)}, got {type(value).__name__}")
        return value

    def tensor(
        self,
        name: str,
        dtype: np.dtype | type,
        shape: tuple[int | None, ...] | None = None,
    ) -> np.ndarray:
        """Tensor ``name`` checked for dtype and (optionally) shape; ``None`` in shape matches any size."""
        if name not in self.tensors:
            raise WireError(f"{self.kind}: tensor {name!r} is missing")
        arr = self.tensors[name]
        if arr.dtype != np.dtype(dtype):
            raise WireError(f"{self.kind}: tensor {name!r} must be {np.dtype(dtype)}, got {arr.dtype}")
        if shape is not None:
            if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape, strict=False)):
                raise WireError(f"{self.kind}: tensor {name!r} must have shape {shape}, got {arr.shape}")
        return arr

    def blob(self, name: str, *, max_bytes: int | None = None, exact: int | None = None) -> bytes:
        """A raw byte string carried as a 1-D uint8 tensor."""
        arr = self.tensor(name, np.uint8, (None,))
        if exact is not None and arr.size != exact:
            raise WireError(f"{self.kind}: {name!r} must be {exact} bytes, got {arr.size}")
        if max_bytes is not None and arr.size > max_bytes:
            raise WireError(f"{self.kind}: {name!r} is {arr.size} bytes, limit {max_bytes}")
        return arr.tobytes()


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def as_blob(data: bytes) -> np.ndarray:
    """Wrap raw bytes as the uint8 tensor :meth:`Frame.blob` reads back."""
    return np.frombuffer(data, dtype=np.uint8)


def _check_depth(raw: bytes, kind: str) -> None:
    """Refuse a header nested deeper than :data:`MAX_HEADER_DEPTH` (brackets inside strings do not count)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_HEADER_DEPTH:
        return  # fewer opening brackets than the limit, strings included: cannot nest deeper (the common case)
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    if not bare.size:
        return
    step = ((bare == ord("[")) | (bare == ord("{"))).astype(np.int32) - ((bare == ord("]")) | (bare == ord("}")))
    depth = int(np.cumsum(step).max())
    if depth > MAX_HEADER_DEPTH:
        raise WireError(f"{kind}: header nests {depth} levels deep, limit {MAX_HEADER_DEPTH}")


def _loads(raw: bytes, kind: str, **kwargs: Any) -> Any:
    """``json.loads`` of UTF-8 bytes with every integer literal at most :data:`MAX_INT_DIGITS` digits.

    Only a header holding a run of more digits than that (one regex scan in C) is parsed with the
    per-integer check, which then raises naming the length; any other header is parsed with
    Python's native integers, as the check would have accepted every one of them.
    """
    text = raw.decode("utf-8")
    if _LONG_DIGITS.search(raw):
        return json.loads(text, parse_int=lambda digits: _bounded_int(digits, kind), **kwargs)
    return json.loads(text, **kwargs)


def _bounded_int(digits: str, kind: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise WireError(f"{kind}: header holds an integer of {len(digits.lstrip('-'))} digits, limit {MAX_INT_DIGITS}")
    return int(digits)


def encode(frame: Frame) -> bytes:
    kind = frame.kind.encode("ascii")
    if not 1 <= len(kind) <= MAX_KIND_BYTES:
        raise WireError(f"frame kind must be 1..{MAX_KIND_BYTES} ASCII bytes, got {frame.kind!r}")
    header = json.dumps(dict(frame.header), separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise WireError(f"{frame.kind}: header is {len(header)} bytes, limit {MAX_HEADER_BYTES}")
    payload = _tensor_parts(frame.kind, frame.tensors)
    plen = sum(memoryview(p).nbytes for p in payload)
    return b"".join(
        (
            MAGIC,
            struct.pack(">BB", WIRE_VERSION, len(kind)),
            kind,
            struct.pack(">I", len(header)),
            header,
            struct.pack(">I", plen),
            *payload,
        )
    )


def _tensor_parts(kind: str, tensors: Mapping[str, np.ndarray]) -> list[Any]:
    """The safetensors payload as a list of buffers (its header, then each tensor's own memory).

    Nothing is copied here: :func:`encode` joins the parts into the frame in one pass. Tensors are
    laid out in name order (safetensors itself sorts by alignment, then name; readers follow the
    offsets, so either order is valid safetensors).
    """
    if not tensors:
        return []
    entries: dict[str, Any] = {}
    views: list[Any] = []
    offset = 0
    for name in sorted(tensors):
        if not isinstance(name, str):
            raise WireError(f"{kind}: tensor names must be strings, got {type(name).__name__}")
        arr = np.asarray(tensors[name])
        st_name = _ST_NAMES.get((arr.dtype.kind, arr.dtype.itemsize)) if arr.dtype.kind in "biuf" else None
        if st_name is None:
            raise WireError(f"{kind}: tensor {name!r} has dtype {arr.dtype}, which the wire format cannot carry")
        want = _ST_DTYPES[st_name]
        if arr.dtype != want:  # big-endian input: little-endian on the wire, as safetensors writes it
            arr = arr.astype(want)
        arr = np.ascontiguousarray(arr)
        entries[name] = {"dtype": st_name, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        if arr.nbytes:
            views.append(memoryview(arr.reshape(-1).view(np.uint8)))
    head = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # safetensors pads its header to 8 bytes
    return [struct.pack("<Q", len(head)), head, *views]


def _load_tensors(data: bytes, start: int, kind: str) -> dict[str, np.ndarray]:
    """Validate the safetensors payload ``data[start:]`` completely, then view its tensors in place."""
    size = len(data) - start
    if size < 8:
        raise WireError(f"{kind}: payload is not valid safetensors (shorter than its 8-byte header length)")
    (hlen,) = struct.unpack_from("<Q", data, start)
    if hlen > MAX_TENSOR_HEADER_BYTES or 8 + hlen > size:
        raise WireError(f"{kind}: payload is not valid safetensors (header length {hlen} exceeds the payload or the limit)")
    raw = data[start + 8 : start + 8 + hlen]
    if not raw.startswith(b"{"):
        raise WireError(f"{kind}: payload is not valid safetensors (header does not start with '{{')")
    _check_depth(raw, kind)
    try:
        header = _loads(raw, kind, object_pairs_hook=_unique_keys(kind))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"{kind}: payload is not valid safetensors (header is not UTF-8 JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise WireError(f"{kind}: payload is not valid safetensors (header is not a JSON object)")
    body = start + 8 + hlen
    body_len = len(data) - body
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise WireError(f"{kind}: payload is not valid safetensors (__metadata__ must map strings to strings)")
    spans: list[tuple[int, int, str, np.dtype, tuple[int, ...]]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"{kind}: payload is not valid safetensors (entry {name!r} must have exactly dtype, shape, data_offsets)")
        dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise WireError(f"{kind}: tensor {name!r} has dtype {info['dtype']!r}, which the wire format does not carry")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
            raise WireError(f"{kind}: tensor {name!r} has a shape that is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
            raise WireError(f"{kind}: tensor {name!r} has data_offsets that are not two integers")
        begin, end = offsets
        if not 0 <= begin <= end <= body_len:
            raise WireError(f"{kind}: tensor {name!r} spans bytes {begin}..{end}, outside the {body_len} bytes present")
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise WireError(f"{kind}: tensor {name!r} has shape {shape} of {dtype} but {end - begin} bytes")
        spans.append((begin, end, name, dtype, tuple(shape)))
    spans.sort()
    pos = 0
    for begin, end, name, *_ in spans:
        if begin != pos:
            raise WireError(f"{kind}: payload is not valid safetensors (tensor {name!r} starts at {begin}, expected {pos}: gap or overlap)")
        pos = end
    if pos != body_len:
        raise WireError(f"{kind}: payload is not valid safetensors ({body_len - pos} bytes after the last tensor)")
    return {
        name: np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=body + begin).reshape(shape)
        for begin, end, name, dtype, shape in spans
    }


def _unique_keys(kind: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise WireError(f"{kind}: a JSON object names the same key twice")
        return out

    return hook


def decode(
    data: bytes,
    *,
    expect: str | tuple[str, ...] | None = None,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Frame:
    """Parse and validate a frame; raise :class:`WireError` naming the first problem found."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"frame must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise WireError(f"frame is {len(data)} bytes, limit {max_bytes}")
    if len(data) < 10 or data[:4] != MAGIC:
        raise WireError("not a fedrlhf frame (bad magic or truncated)")
    version, klen = struct.unpack_from(">BB", data, 4)
    if version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {version}; this build speaks {WIRE_VERSION}")
    if not 1 <= klen <= MAX_KIND_BYTES or len(data) < 6 + klen + 4:
        raise WireError("truncated frame (kind)")
    try:
        kind = data[6 : 6 + klen].decode("ascii")
    except UnicodeDecodeError as exc:
        raise WireError("frame kind is not ASCII") from exc
    if expect is not None:
        allowed = (expect,) if isinstance(expect, str) else expect
        if kind not in allowed:
            raise WireError(f"expected a {' or '.join(allowed)} frame, got {kind!r}")
    pos = 6 + klen
    (hlen,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if hlen > MAX_HEADER_BYTES or pos + hlen + 4 > len(data):
        raise WireError(f"{kind}: header length {hlen} exceeds the frame or the limit")
    raw_header = data[pos : pos + hlen]
    _check_depth(raw_header, kind)
    try:
        header = _loads(raw_header, kind)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"{kind}: header is not UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WireError(f"{kind}: header must be a JSON object")
    pos += hlen
    (plen,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if pos + plen != len(data):
        raise WireError(f"{kind}: payload length {plen} does not match the {len(data) - pos} bytes present")
    tensors = _load_tensors(data, pos, kind) if plen else {}
    return Frame(kind=kind, header=header, tensors=tensors)
