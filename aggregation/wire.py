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
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

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
DEFAULT_MAX_FRAME_BYTES = 1 << 31


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
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    if not bare.size:
        return
    step = np.isin(bare, (ord("["), ord("{"))).astype(np.int32) - np.isin(bare, (ord("]"), ord("}")))
    depth = int(np.cumsum(step).max())
    if depth > MAX_HEADER_DEPTH:
        raise WireError(f"{kind}: header nests {depth} levels deep, limit {MAX_HEADER_DEPTH}")


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
    tensors = {k: np.ascontiguousarray(v) for k, v in frame.tensors.items()}
    payload = _st_save(tensors) if tensors else b""
    return b"".join(
        (
            MAGIC,
            struct.pack(">BB", WIRE_VERSION, len(kind)),
            kind,
            struct.pack(">I", len(header)),
            header,
            struct.pack(">I", len(payload)),
            payload,
        )
    )


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
        header = json.loads(raw_header.decode("utf-8"), parse_int=lambda digits: _bounded_int(digits, kind))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"{kind}: header is not UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WireError(f"{kind}: header must be a JSON object")
    pos += hlen
    (plen,) = struct.unpack_from(">I", data, pos)
    pos += 4
    if pos + plen != len(data):
        raise WireError(f"{kind}: payload length {plen} does not match the {len(data) - pos} bytes present")
    tensors: dict[str, np.ndarray] = {}
    if plen:
        try:
            tensors = _st_load(data[pos:])
        except Exception as exc:  # safetensors raises its own error types for malformed input
            raise WireError(f"{kind}: payload is not valid safetensors ({exc})") from exc
    return Frame(kind=kind, header=header, tensors=tensors)
