"""Malformed, truncated, bit-flipped and foreign ciphertexts are rejected with ProtocolError, never a crash."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ckks_rounds import to_updates
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import wire
from aggregation.base import ProtocolError, RoundContext
from aggregation.ckks import CKKSConfig, codec, factory
from aggregation.ckks.params import new_secret_context

CLIENTS = tuple(range(6))  # the mask round is SecAgg+: 6 clients hold its default bounds (3 cannot)
DIM = 3000
CFG = CKKSConfig()


@pytest.fixture(scope="module")
def round_parts():
    agg = factory(CFG, CLIENTS, 0)
    ctx = RoundContext(os.urandom(16), 0, CLIENTS, DIM)
    vec = (np.random.default_rng(0).normal(size=DIM) * 1e-2).astype(np.float32)
    inputs = {c: (vec, 10.0) for c in CLIENTS}
    server, _, updates = to_updates(agg, ctx, inputs)
    return agg, ctx, updates[0], server


def _fresh_server(agg, ctx):
    """A server that has not reached the masked-input stage: every rejection here happens in the
    ciphertext checks, before the SecAgg half sees anything."""
    server = agg.server(ctx)
    server.start()
    return server


LENGTH = factory(CFG, CLIENTS, 0).server(RoundContext(os.urandom(16), 0, CLIENTS, DIM)).length


def _with_blobs(update: bytes, blobs: list[bytes]) -> bytes:
    frame = wire.decode(update)
    data, lengths = codec.join(blobs)
    return wire.encode(wire.Frame(frame.kind, frame.header, {**frame.tensors, "ciphertexts": data, "lengths": lengths}))


def _blobs(update: bytes) -> list[bytes]:
    frame = wire.decode(update)
    return codec.split(frame.tensors["ciphertexts"], frame.tensors["lengths"], CFG, LENGTH)


def test_valid_update_is_accepted(round_parts):
    agg, ctx, update, server = round_parts
    assert server.receive(0, update) == []


@pytest.mark.parametrize("cut", [1, 17, 100, 5000])
def test_truncated_frame_is_rejected(round_parts, cut):
    agg, ctx, update, _ = round_parts
    with pytest.raises(ProtocolError):
        _fresh_server(agg, ctx).receive(0, update[:-cut])


@pytest.mark.parametrize("cut", [1, 8, 64, 10_000])
def test_truncated_ciphertext_with_consistent_lengths_is_rejected(round_parts, cut):
    agg, ctx, update, _ = round_parts
    blobs = _blobs(update)
    blobs[1] = blobs[1][:-cut]
    with pytest.raises(ProtocolError):
        _fresh_server(agg, ctx).receive(0, _with_blobs(update, blobs))


def test_ciphertext_from_a_foreign_parameter_set_is_rejected(round_parts):
    agg, ctx, update, _ = round_parts
    other = CKKSConfig(coeff_mod_bit_sizes=(48, 40), scale_bits=28)  # same N and scale, other primes
    foreign = codec.encrypt(np.zeros(LENGTH), new_secret_context(other), other)
    with pytest.raises(ProtocolError, match="TenSEAL rejected|not a fresh"):
        _fresh_server(agg, ctx).receive(0, _with_blobs(update, foreign))
    big = CKKSConfig(poly_modulus_degree=8192, coeff_mod_bit_sizes=(56, 40), scale_bits=28)
    with pytest.raises(ProtocolError, match="ciphertext"):
        _fresh_server(agg, ctx).receive(0, _with_blobs(update, codec.encrypt(np.zeros(LENGTH), new_secret_context(big), big)))


def test_ciphertext_with_another_scale_is_rejected(round_parts):
    agg, ctx, update, _ = round_parts
    other = CKKSConfig(scale_bits=30)
    blobs = codec.encrypt(np.zeros(LENGTH), new_secret_context(other), other)
    with pytest.raises(ProtocolError, match="scale"):
        _fresh_server(agg, ctx).receive(0, _with_blobs(update, blobs))


def test_zstd_bomb_is_refused_before_tenseal_inflates_it(round_parts):
    agg, ctx, update, _ = round_parts
    blobs = _blobs(update)
    # a zstd frame of 4000 RLE blocks: ~30 KB that would inflate to 500 MB
    block = ((1 << 1) | ((128 * 1024) << 3)).to_bytes(3, "little") + b"\0"
    last = (1 | (1 << 1) | ((128 * 1024) << 3)).to_bytes(3, "little") + b"\0"
    frame = struct.pack("<I", codec.ZSTD_MAGIC) + bytes([0x00, 0x70]) + block * 3999 + last
    seal_at = blobs[0].index(b"\x5e\xa1\x10")
    bomb = bytearray(blobs[0][seal_at : seal_at + 16]) + frame
    struct.pack_into("<Q", bomb, 8, len(bomb))
    proto = bytearray()
    size_field = bytes([0x0A, 2]) + bytes([0x80, 0x10])  # sizes = [2048]
    proto += size_field + bytes([0x12]) + _varint(len(bomb)) + bomb + bytes([0x19]) + struct.pack("<d", CFG.scale)
    blobs[0] = bytes(proto)
    with pytest.raises(ProtocolError, match="inflate"):
        _fresh_server(agg, ctx).receive(0, _with_blobs(update, blobs))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_validator_only_ever_raises_value_error_on_arbitrary_bytes(data):
    try:
        codec.check_vector_bytes(data, CFG, 2048)
    except ValueError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 70_000), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped_update_never_escapes_as_anything_but_protocol_error(round_parts, flips):
    agg, ctx, update, _ = round_parts
    blob = bytearray(_blobs(update)[0])
    for pos, bit in flips:
        blob[pos % len(blob)] ^= 1 << bit
    blobs = _blobs(update)
    blobs[0] = bytes(blob)
    server = _fresh_server(agg, ctx)
    try:
        server.receive(0, _with_blobs(update, blobs))
    except ProtocolError:
        assert server._got == []  # a rejected message leaves the state unchanged


def test_hundreds_of_corruptions_do_not_crash_the_process():
    """TenSEAL is C++: run a corruption campaign in a subprocess so a segfault fails the test."""
    script = textwrap.dedent(
        """
        import os, sys, numpy as np
        sys.path.insert(0, {tests!r})
        from ckks_rounds import to_updates
        from aggregation.base import ProtocolError, RoundContext
        from aggregation.ckks import CKKSConfig, factory
        from aggregation.ckks import codec
        from aggregation import wire
        cfg = CKKSConfig(); clients = tuple(range(6)); dim = 2500
        agg = factory(cfg, clients, 0); ctx = RoundContext(os.urandom(16), 0, clients, dim)
        server, _, ups = to_updates(agg, ctx, {{c: (np.ones(dim, np.float32) * 0.01, 3.0) for c in clients}})
        frame = wire.decode(ups[0])
        blobs = codec.split(frame.tensors["ciphertexts"], frame.tensors["lengths"], cfg, server.length)
        rng = np.random.default_rng(7); rejected = accepted = 0
        for trial in range(200):
            b = [bytearray(x) for x in blobs]; i = int(rng.integers(len(b)))
            kind = trial % 4
            if kind == 0:
                for _ in range(int(rng.integers(1, 6))):
                    p = int(rng.integers(len(b[i]))); b[i][p] ^= 1 << int(rng.integers(8))
            elif kind == 1:
                p = int(rng.integers(40)); b[i][p] = int(rng.integers(256))
            elif kind == 2:
                b[i] = b[i][: int(rng.integers(1, len(b[i])))]
            else:
                p = int(rng.integers(len(b[i]))); b[i][p:p + 64] = bytes(rng.integers(0, 256, 64, dtype=np.uint8))
            data, lengths = codec.join([bytes(x) for x in b])
            msg = wire.encode(wire.Frame(frame.kind, frame.header, {{**frame.tensors, "ciphertexts": data, "lengths": lengths}}))
            s = agg.server(ctx); s.start()
            try:
                s.receive(0, msg); accepted += 1
            except ProtocolError:
                rejected += 1
        print(rejected, accepted)
        """
    ).format(tests=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rejected, accepted = map(int, proc.stdout.split()[-2:])
    assert rejected + accepted == 200 and rejected >= 100


def test_seeded_ciphertexts_halve_the_upload_and_decrypt_like_tenseals_own():
    """Seeded symmetric ciphertexts (SEAL's encrypt_symmetric + save): half TenSEAL's full bytes, the
    same checks on load, and the same values after a server-side sum of one of each kind."""
    from aggregation.ckks.params import load_context, public_context_bytes

    ctx = new_secret_context(CFG)
    server_ctx = load_context(public_context_bytes(ctx), CFG, secret=False)
    x = np.random.default_rng(1).normal(size=LENGTH) * 1e-2
    seeded = codec.encrypt(x, ctx, CFG)
    full = codec.encrypt(x, ctx, CFG, seeded=False)
    assert len(seeded) == len(full) == len(codec.chunk_lengths(CFG, LENGTH))
    ratio = sum(map(len, seeded)) / sum(map(len, full))
    assert 0.45 < ratio < 0.55
    assert sum(map(len, seeded)) / (4 * CFG.slots * len(seeded)) < 4.2  # expansion over float32 per full chunk
    acc = codec.load_chunks(seeded, server_ctx, CFG, LENGTH)
    for a, c in zip(acc, codec.load_chunks(full, server_ctx, CFG, LENGTH), strict=True):
        a.add_(c)
    total = codec.decrypt(codec.load_chunks([c.serialize() for c in acc], ctx, CFG, LENGTH))
    np.testing.assert_allclose(total, 2 * x, atol=1e-5)
    # a short vector after a long one: the in-memory file is truncated by every save
    short = codec.encrypt(x[:10], ctx, CFG)
    np.testing.assert_allclose(codec.decrypt(codec.load_chunks(short, ctx, CFG, 10)), x[:10], atol=1e-5)


def test_seeded_encryption_without_memfd_uses_a_private_file_and_decrypts(monkeypatch):
    """Where the OS has no memfd (macOS), SEAL saves to a private temporary file (0600 in a 0700
    directory) that keeps its name for the process and is removed at exit; the ciphertexts are the same kind."""
    import threading

    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setattr(codec, "_SCRATCH", threading.local())
    ctx = new_secret_context(CFG)
    x = np.random.default_rng(2).normal(size=LENGTH) * 1e-2
    out = codec.encrypt(x, ctx, CFG)
    path = Path(codec._SCRATCH.path)
    assert path.is_file() and not path.is_relative_to("/proc")
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    np.testing.assert_allclose(codec.decrypt(codec.load_chunks(out, ctx, CFG, LENGTH)), x, atol=1e-5)
