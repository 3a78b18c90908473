"""Encrypted vectors on the wire: TenSEAL's own bytes, structurally validated before TenSEAL sees them.

A client's update ``[w_k x_k, w_k]`` (the weight rides in one extra slot, so the clients learn
``W = sum_k w_k`` by decryption and the server never sees any ``w_k``) is encrypted as one
TenSEAL ``CKKSVector``; TenSEAL splits it into ``ceil((d+1) / (N/2))`` SEAL ciphertexts and
serializes it as a ``CKKSVectorProto`` (``sizes``, ``ciphertexts``, ``scale``).

TenSEAL and SEAL are C++: fed garbage they may raise odd exceptions, allocate without bound
(SEAL inflates a zstd stream before checking what it holds, so a few KiB can expand to GiB), or
worse. So :func:`check_vector_bytes` walks the protobuf, every SEAL header and every zstd block
header *before* any C++ code runs, and checks the chunk sizes, the declared lengths, the scale and
an upper bound on each inflated size against what the parameter set allows. Only then is the
vector deserialized, and the result's ciphertexts are checked again (2 polynomials, ring degree,
number of primes, NTT form, scale). Every failure is a :class:`ValueError` naming the problem.

Seeded ciphertexts (issue 16): a fresh symmetric CKKS ciphertext is ``(c0, c1)`` with ``c1`` uniform,
drawn from a PRNG; SEAL can save it with the 64-byte PRNG seed in place of ``c1`` (``Encryptor::
encrypt_symmetric`` returning ``Serializable<Ciphertext>``), halving the upload. ``CKKSVector``
keeps a plain ``seal::Ciphertext`` and so always serializes both polynomials (7.6-8.0× a float32
vector); TenSEAL's low-level ``sealapi`` does bind the seeded overload, but its
``SerializableCiphertext`` can only ``save`` to a file path. :func:`encrypt` therefore encodes with
``sealapi.CKKSEncoder``, encrypts with the secret key into a seeded ciphertext, saves it to an
in-memory file (``memfd``; a private temporary file where there is none) and wraps the bytes in
the same ``CKKSVectorProto`` TenSEAL writes. Receivers are unchanged: ``ckks_vector_from`` (SEAL's
``Ciphertext::load``) expands the seed, and every check above runs first. Same key, same noise
distribution (SEAL draws ``c1`` from a seeded PRNG either way), half the bytes: 4.0× a float32
vector at the default parameters. Public-key ciphertexts (``c1 = u·pk1 + e1``) cannot be seeded.
"""

from __future__ import annotations

import atexit
import os
import shutil
import struct
import tempfile
import threading

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .params import CKKSConfig

SEAL_MAGIC = 0xA15E
SEAL_HEADER_BYTES = 16
SEAL_COMPR_NONE = 0
SEAL_COMPR_ZSTD = 2
ZSTD_MAGIC = 0xFD2FB528
ZSTD_BLOCK_MAX = 128 * 1024
CIPHERTEXT_METADATA_BYTES = 256
"""Generous bound on a SEAL ciphertext's non-polynomial fields (parms_id, flags, sizes, scale)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _i in range(10):
        if pos >= len(data):
            raise ValueError("truncated varint in ciphertext vector")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("overlong varint in ciphertext vector")


def _zstd_inflated_bound(frame: bytes) -> int:
    """Upper bound on what one zstd frame inflates to, from its block headers (RFC 8878, section 3.1)."""
    if len(frame) < 6 or struct.unpack_from("<I", frame, 0)[0] != ZSTD_MAGIC:
        raise ValueError("ciphertext is not a single zstd frame")
    fhd = frame[4]
    if fhd & 0x08:
        raise ValueError("zstd frame header has its reserved bit set")
    fcs_flag, single_segment, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    pos += (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    total = 0
    while True:
        if pos + 3 > len(frame):
            raise ValueError("truncated zstd block header")
        hdr = frame[pos] | frame[pos + 1] << 8 | frame[pos + 2] << 16
        pos += 3
        last, btype, bsize = hdr & 1, (hdr >> 1) & 3, hdr >> 3
        if btype == 0:  # raw
            total, pos = total + bsize, pos + bsize
        elif btype == 1:  # RLE: one byte repeated bsize times
            total, pos = total + bsize, pos + 1
        elif btype == 2:  # compressed: inflates to at most one block
            if bsize > ZSTD_BLOCK_MAX:
                raise ValueError("zstd block larger than the format allows")
            total, pos = total + ZSTD_BLOCK_MAX, pos + bsize
        else:
            raise ValueError("reserved zstd block type")
        if pos > len(frame):
            raise ValueError("truncated zstd block")
        if last:
            break
    pos += 4 if checksum else 0
    if pos != len(frame):
        raise ValueError("bytes after the zstd frame")
    return total


def _check_seal_ciphertext(blob: bytes, config: CKKSConfig) -> None:
    raw_max = config.raw_ciphertext_bytes() + CIPHERTEXT_METADATA_BYTES
    if len(blob) < SEAL_HEADER_BYTES:
        raise ValueError("ciphertext shorter than a SEAL header")
    magic, hsize, _major, _minor, compr, reserved, size = struct.unpack_from("<HBBBBHQ", blob, 0)
    if magic != SEAL_MAGIC or hsize != SEAL_HEADER_BYTES or reserved != 0:
        raise ValueError("ciphertext has no valid SEAL header")
    if size != len(blob):
        raise ValueError(f"SEAL header declares {size} bytes but the ciphertext has {len(blob)}")
    body = blob[SEAL_HEADER_BYTES:]
    if compr == SEAL_COMPR_NONE:
        inflated = len(body)
    elif compr == SEAL_COMPR_ZSTD:
        inflated = _zstd_inflated_bound(body)
    else:
        raise ValueError(f"unsupported SEAL compression mode {compr}")
    allowed = (-(-raw_max // ZSTD_BLOCK_MAX) + 1) * ZSTD_BLOCK_MAX  # the bound counts whole blocks
    if inflated > allowed:
        raise ValueError(f"ciphertext would inflate to up to {inflated} bytes; this parameter set allows {raw_max}")


def check_vector_bytes(data: bytes, config: CKKSConfig, length: int) -> None:
    """Validate serialized ``CKKSVectorProto`` bytes for a vector of ``length`` values; raise ValueError."""
    slots = config.slots
    want_sizes = [slots] * (length // slots) + ([length % slots] if length % slots else [])
    limit = len(want_sizes) * (config.raw_ciphertext_bytes() + CIPHERTEXT_METADATA_BYTES + SEAL_HEADER_BYTES + 64) + 64
    if len(data) > limit:
        raise ValueError(f"ciphertext vector is {len(data)} bytes; at most {limit} expected for {length} values")
    sizes: list[int] = []
    blobs: list[bytes] = []
    scale: float | None = None
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field_no, wtype = key >> 3, key & 7
        if field_no == 1 and wtype == 2:  # packed repeated uint32 sizes
            n, pos = _varint(data, pos)
            end = pos + n
            if end > len(data):
                raise ValueError("truncated chunk sizes")
            while pos < end:
                s, pos = _varint(data, pos)
                sizes.append(s)
            if pos != end:
                raise ValueError("malformed chunk sizes")
        elif field_no == 1 and wtype == 0:  # unpacked uint32 (also valid protobuf)
            s, pos = _varint(data, pos)
            sizes.append(s)
        elif field_no == 2 and wtype == 2:
            n, pos = _varint(data, pos)
            if pos + n > len(data):
                raise ValueError("truncated ciphertext")
            blobs.append(data[pos : pos + n])
            pos += n
        elif field_no == 3 and wtype == 1:
            if pos + 8 > len(data):
                raise ValueError("truncated scale")
            (scale,) = struct.unpack_from("<d", data, pos)
            pos += 8
        else:
            raise ValueError(f"unexpected field {field_no} (wire type {wtype}) in ciphertext vector")
        if len(sizes) > len(want_sizes) or len(blobs) > len(want_sizes):
            raise ValueError(f"more than the {len(want_sizes)} chunks expected for {length} values")
    if sizes != want_sizes:
        raise ValueError(f"chunk sizes {sizes[:4]}... do not pack {length} values into {slots}-slot ciphertexts")
    if len(blobs) != len(want_sizes):
        raise ValueError(f"{len(blobs)} ciphertexts, expected {len(want_sizes)}")
    if scale != config.scale:
        raise ValueError(f"ciphertext scale {scale} differs from the parameter set's 2^{config.scale_bits}")
    for blob in blobs:
        _check_seal_ciphertext(blob, config)


def chunk_lengths(config: CKKSConfig, length: int) -> list[int]:
    """How ``length`` values split into ``N/2``-slot ciphertexts (all full but the last)."""
    slots = config.slots
    return [slots] * (length // slots) + ([length % slots] if length % slots else [])


def encrypt(values: np.ndarray, ctx: ts.Context, config: CKKSConfig, *, seeded: bool = True) -> list[bytes]:
    """Encrypt a float vector as one single-ciphertext ``CKKSVector`` per ``N/2`` values.

    Chunking here rather than in TenSEAL keeps every wire object a one-ciphertext vector (so the
    bounds checked per object are tight) and avoids TenSEAL's multi-chunk path, which prints a
    warning to the process's stdout. With a secret-key context (every client of the protocol) the
    ciphertexts are seeded (module docstring: half the bytes); ``seeded=False`` or a context without
    the secret key gives TenSEAL's own full serialization.
    """
    values = np.asarray(values, dtype=np.float64)
    lengths = chunk_lengths(config, values.size)
    if seeded and ctx.is_private():
        return _encrypt_seeded(values, lengths, ctx, config)
    out, start = [], 0
    for n in lengths:
        out.append(ts.ckks_vector(ctx, values[start : start + n].tolist()).serialize())
        start += n
    return out


_SCRATCH = threading.local()


def _scratch_file() -> tuple[int, str]:
    """A per-thread, per-process in-memory file SEAL can ``save`` to by path (a fork gets its own)."""
    if getattr(_SCRATCH, "pid", None) != os.getpid():
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            fd = os.memfd_create("fedrlhf-ckks", getattr(os, "MFD_CLOEXEC", 0))
            path = f"/proc/self/fd/{fd}"
        else:  # no memfd: a private (0700 directory, 0600 file) temporary file; SEAL saves by path, so it
            # must keep its name while the process lives, and is removed when the process exits
            directory = tempfile.mkdtemp(prefix="fedrlhf-ckks-")
            path = os.path.join(directory, "ct")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            atexit.register(shutil.rmtree, directory, True)
        _SCRATCH.fd, _SCRATCH.path, _SCRATCH.pid = fd, path, os.getpid()
    return _SCRATCH.fd, _SCRATCH.path


def _encrypt_seeded(values: np.ndarray, lengths: list[int], ctx: ts.Context, config: CKKSConfig) -> list[bytes]:
    seal_ctx = ctx.seal_context().data
    encoder = sealapi.CKKSEncoder(seal_ctx)
    encryptor = sealapi.Encryptor(seal_ctx, ctx.secret_key().data)
    fd, path = _scratch_file()
    out, start = [], 0
    for n in lengths:
        plain = sealapi.Plaintext()
        encoder.encode(values[start : start + n].tolist(), config.scale, plain)
        encryptor.encrypt_symmetric(plain).save(path)
        blob = os.pread(fd, os.fstat(fd).st_size, 0)
        out.append(_vector_proto(n, blob, config.scale))
        start += n
    return out


def _pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _vector_proto(size: int, ciphertext: bytes, scale: float) -> bytes:
    """TenSEAL's ``CKKSVectorProto`` (field 1: packed sizes, 2: ciphertext bytes, 3: scale as a double)."""
    sizes = _pb_varint(size)
    return b"".join(
        (b"\x0a", _pb_varint(len(sizes)), sizes, b"\x12", _pb_varint(len(ciphertext)), ciphertext, b"\x19", struct.pack("<d", scale))
    )


def load_chunks(blobs: list[bytes], ctx: ts.Context, config: CKKSConfig, length: int) -> list[ts.CKKSVector]:
    """Validate, deserialize and re-check the chunks of one encrypted vector; raise ValueError."""
    want = chunk_lengths(config, length)
    if len(blobs) != len(want):
        raise ValueError(f"{len(blobs)} ciphertexts, expected {len(want)} for {length} values")
    return [load_vector(b, ctx, config, n) for b, n in zip(blobs, want, strict=False)]


def load_vector(data: bytes, ctx: ts.Context, config: CKKSConfig, length: int) -> ts.CKKSVector:
    """Validate, deserialize and re-check one encrypted vector of ``length`` values; raise ValueError."""
    check_vector_bytes(data, config, length)
    try:
        vec = ts.ckks_vector_from(ctx, bytes(data))
        cts = vec.ciphertext()
    except Exception as exc:  # SEAL rejects foreign parameter sets and out-of-range data here
        raise ValueError(f"TenSEAL rejected the ciphertext ({type(exc).__name__}: {exc})") from exc
    if vec.size() != length:
        raise ValueError(f"ciphertext vector holds {vec.size()} values, expected {length}")
    for ct in cts:
        if (
            ct.size() != 2
            or ct.poly_modulus_degree() != config.poly_modulus_degree
            or ct.coeff_modulus_size() != config.data_primes
            or not ct.is_ntt_form()
            or ct.scale != config.scale
        ):
            raise ValueError("ciphertext is not a fresh ciphertext of this parameter set")
    return vec


def decrypt(chunks: list[ts.CKKSVector]) -> np.ndarray:
    """Decrypt (needs a context holding the secret key) and concatenate the chunks."""
    return np.concatenate([np.asarray(c.decrypt(), dtype=np.float64) for c in chunks])


def join(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Chunks -> (one uint8 tensor, int64 lengths) for a :class:`aggregation.wire.Frame`."""
    lengths = np.asarray([len(b) for b in blobs], dtype=np.int64)
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), lengths


def split(data: np.ndarray, lengths: np.ndarray, config: CKKSConfig, length: int) -> list[bytes]:
    """Inverse of :func:`join`, checking the lengths against the bytes present and the chunk count."""
    want = len(chunk_lengths(config, length))
    if lengths.ndim != 1 or lengths.size != want:
        raise ValueError(f"expected {want} ciphertext lengths, got {lengths.size}")
    per_max = config.raw_ciphertext_bytes() + CIPHERTEXT_METADATA_BYTES + SEAL_HEADER_BYTES + 128
    if np.any(lengths <= 0) or np.any(lengths > per_max):
        raise ValueError(f"ciphertext lengths must be in 1..{per_max}")
    if int(lengths.sum()) != data.size:
        raise ValueError(f"ciphertext lengths sum to {int(lengths.sum())} but {data.size} bytes are present")
    raw = data.tobytes()
    out, pos = [], 0
    for n in lengths.tolist():
        out.append(raw[pos : pos + n])
        pos += n
    return out
