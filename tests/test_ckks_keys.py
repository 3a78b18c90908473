"""Key delivery: only the addressed client, with the pinned dealer key, opens its package."""

from __future__ import annotations

import numpy as np
import pytest

from aggregation import wire
from aggregation.ckks import CKKSConfig, ClientKeyPair, DealerKey, KeyPackageError, PublicContext, codec, deal, open_package
from fedrlhf_secure.cli import main as cli

CFG = CKKSConfig()


@pytest.fixture(scope="module")
def setup():
    clients = {cid: ClientKeyPair.generate(cid) for cid in (1, 2)}
    dealer = DealerKey.generate()
    dealt = deal(CFG, {cid: kp.public_bytes for cid, kp in clients.items()}, dealer, epoch=0)
    return clients, dealer, dealt


def test_addressed_client_opens_its_package_and_gets_the_secret_key(setup):
    clients, dealer, dealt = setup
    key = open_package(dealt.packages[1], clients[1], dealer.verify_bytes, CFG, epoch=0)
    assert key.key_id == dealt.public.key_id and key.epoch == 0
    assert key.context.is_private()
    # both clients hold the same key: one decrypts what the other encrypted
    other = open_package(dealt.packages[2], clients[2], dealer.verify_bytes, CFG)
    x = np.linspace(-1, 1, 100)
    blobs = codec.encrypt(x, other.context, CFG)
    got = codec.decrypt(codec.load_chunks(blobs, key.context, CFG, 100))
    assert np.max(np.abs(got - x)) < 1e-5  # 2^-28 scale: one fresh ciphertext's error is ~5e-7 RMS
    # and both derive the same check key (docs/ckks.md), which is not in the server's public context
    assert key.check_key == other.check_key and len(key.check_key) == 32
    assert key.check_key not in dealt.public.encode(CFG)


def test_swapped_package_is_rejected(setup):
    clients, dealer, dealt = setup
    with pytest.raises(KeyPackageError, match="addressed to client 2"):
        open_package(dealt.packages[2], clients[1], dealer.verify_bytes, CFG)


def test_package_forged_by_another_dealer_is_rejected(setup):
    clients, dealer, _ = setup
    mallory = DealerKey.generate()
    forged = deal(CFG, {1: clients[1].public_bytes}, mallory, epoch=0)
    with pytest.raises(KeyPackageError, match="not signed by the pinned dealer"):
        open_package(forged.packages[1], clients[1], dealer.verify_bytes, CFG)


def _tamper(package: bytes, header=None, tensor=None) -> bytes:
    frame = wire.decode(package)
    h = {**frame.header, **(header or {})}
    t = dict(frame.tensors)
    if tensor:
        arr = t[tensor].copy()
        arr[len(arr) // 2] ^= 1
        t[tensor] = arr
    return wire.encode(wire.Frame(frame.kind, h, t))


@pytest.mark.parametrize(
    "change",
    [
        {"tensor": "sealed"},
        {"tensor": "public_context"},
        {"header": {"epoch": 5}},
        {"header": {"client_id": 2}},
        {"header": {"params": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [56, 40], "scale_bits": 34}}},
    ],
)
def test_any_altered_byte_or_field_is_rejected(setup, change):
    clients, dealer, dealt = setup
    with pytest.raises(KeyPackageError):
        open_package(_tamper(dealt.packages[1], **change), clients[1], dealer.verify_bytes, CFG)


def test_package_for_another_epoch_or_parameter_set_is_rejected(setup):
    clients, dealer, dealt = setup
    with pytest.raises(KeyPackageError, match="epoch 0, expected 3"):
        open_package(dealt.packages[1], clients[1], dealer.verify_bytes, CFG, epoch=3)
    with pytest.raises(KeyPackageError, match="parameters"):
        open_package(dealt.packages[1], clients[1], dealer.verify_bytes, CKKSConfig(scale_bits=30))


def test_dealer_cannot_be_impersonated_even_with_the_clients_public_key(setup):
    """Anyone can encrypt to a client's X25519 key; without the dealer's signing key it is refused."""
    clients, dealer, dealt = setup
    mallory = DealerKey.generate()
    frame = wire.decode(mallory_pkg := deal(CFG, {1: clients[1].public_bytes}, mallory, 0).packages[1])
    # splice the genuine dealer's signature onto Mallory's package: the signature covers the ciphertext
    genuine = wire.decode(dealt.packages[1])
    spliced = wire.encode(wire.Frame(frame.kind, frame.header, {**frame.tensors, "signature": genuine.tensors["signature"]}))
    with pytest.raises(KeyPackageError):
        open_package(spliced, clients[1], dealer.verify_bytes, CFG)
    assert mallory_pkg != dealt.packages[1]


def test_public_context_is_authenticated_and_holds_no_key(setup):
    _, dealer, dealt = setup
    encoded = dealt.public.encode(CFG)
    pub = PublicContext.decode(encoded, CFG, dealer.verify_bytes)
    ctx = pub.load(CFG)
    assert not ctx.is_private() and not ctx.has_secret_key()
    with pytest.raises(KeyPackageError, match="pinned dealer"):
        PublicContext.decode(encoded, CFG, DealerKey.generate().verify_bytes)
    with pytest.raises(KeyPackageError, match="parameters"):
        PublicContext.decode(encoded, CKKSConfig(scale_bits=36), dealer.verify_bytes)


def _key_ceremony(tmp_path, cids, *deal_args: str) -> None:
    """``fedrlhf keys`` as a deployment runs it: each client makes its key, the dealer deals to their
    public keys; leaves c<id>/, dealer/ and deal/ under ``tmp_path``."""
    pubs = tmp_path / "pubs"
    pubs.mkdir()
    for cid in cids:
        assert cli(["keys", "client", "--id", str(cid), "--out", str(tmp_path / f"c{cid}")]) == 0
        (pubs / f"client-{cid}.pub").write_text((tmp_path / f"c{cid}" / f"client-{cid}.pub").read_text())
    assert cli(["keys", "dealer", "--out", str(tmp_path / "dealer")]) == 0
    deal = [
        "keys",
        "deal",
        "--dealer-key",
        str(tmp_path / "dealer" / "dealer.key"),
        "--clients",
        str(pubs),
        "--out",
        str(tmp_path / "deal"),
    ]
    assert cli([*deal, *deal_args]) == 0


def _open_as_client_4(tmp_path, package_of: int) -> int:
    """``fedrlhf keys open`` of client ``package_of``'s package with client 4's key."""
    package = str(tmp_path / "deal" / f"package-client-{package_of}.frame")
    key, dealer = str(tmp_path / "c4" / "client-4.key"), str(tmp_path / "dealer" / "dealer.pub")
    return cli(["keys", "open", "--package", package, "--client-key", key, "--dealer-pub", dealer, "--set", "aggregation.scale_bits=36"])


def test_keys_cli_round_trip_and_rejection(tmp_path, capsys):
    _key_ceremony(tmp_path, (4, 9), "--set", "aggregation.scale_bits=36")
    pubs = tmp_path / "pubs"
    assert (tmp_path / "c4" / "client-4.key").stat().st_mode & 0o077 == 0
    out = capsys.readouterr().out
    key_id = out.split("CKKS key ")[1].split()[0]
    ok = _open_as_client_4(tmp_path, package_of=4)
    assert ok == 0 and key_id in capsys.readouterr().out
    swapped = _open_as_client_4(tmp_path, package_of=9)
    assert swapped == 1 and "addressed to client 9" in capsys.readouterr().err
    insecure = cli(
        [
            "keys",
            "deal",
            "--dealer-key",
            str(tmp_path / "dealer" / "dealer.key"),
            "--clients",
            str(pubs),
            "--out",
            str(tmp_path / "bad"),
            "--set",
            "aggregation.coeff_mod_bit_sizes=[60,60]",
        ]
    )
    assert insecure == 2 and "109 bits" in capsys.readouterr().err


def test_dealt_key_files_drive_a_round_where_the_server_reads_only_the_public_context(tmp_path):
    import os

    from aggregation.base import RoundContext, spec_for
    from aggregation.ckks import CKKSAggregator, masking, masking_config
    from fedrlhf_secure.keys import DealtKeyFiles

    cfg = CKKSConfig(masking={"colluders": 0.0, "dropouts": 0.0})  # two clients: no colluder bound to hold
    _key_ceremony(tmp_path, (0, 1))
    dealer_pub = tmp_path / "dealer" / "dealer.pub"
    # the mask round's SecAgg+ identities are one registry for all parties (a deployment loads it from its keys dir)
    masks = spec_for("secagg").factory(masking_config(cfg, masking.plan(cfg, 2)), [0, 1], 0)
    server_side = CKKSAggregator(cfg, DealtKeyFiles(cfg, tmp_path / "deal", dealer_pub), (0, 1), masks)
    client_side = {
        cid: CKKSAggregator(
            cfg, DealtKeyFiles(cfg, tmp_path / "deal", dealer_pub, tmp_path / f"c{cid}" / f"client-{cid}.key"), (0, 1), masks
        )
        for cid in (0, 1)
    }
    ctx = RoundContext(os.urandom(16), 0, (0, 1), 10)
    vecs = {0: np.arange(10, dtype=np.float32), 1: np.ones(10, dtype=np.float32)}
    halves = {cid: client_side[cid].client(ctx, cid, vecs[cid], 2.0 + cid) for cid in (0, 1)}
    with pytest.raises(ValueError, match="no key file for client 1"):
        client_side[0].client(ctx, 1, vecs[1], 1.0)
    server = server_side.server(ctx)
    pending = server.start()
    while pending:
        pending = [out for cid, msg in pending for reply in halves[cid].receive(msg) for out in server.receive(cid, reply)]
    res = halves[1].result()
    bound = 6 * server_side.plan.flood_sigma(2, 11) + server_side.plan.tolerance(2)
    assert res.total_weight == pytest.approx(5.0, abs=bound)
    assert res.weighted_sum == pytest.approx(2.0 * vecs[0] + 3.0 * vecs[1], abs=bound)
