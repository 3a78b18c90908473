"""The CKKS benchmark's rows carry the fields ``fedrlhf bench aggregation`` tabulates, from a real round."""

import pytest

from fedrlhf_secure.bench.ckks import TABLE_HEADERS, measure, table_rows


def test_measure_returns_the_shipped_round_the_round_before_issue_12_and_nvflares_parameters():
    rows = measure(10, 5000, repeats=1)["rows"]  # the mask round is SecAgg+: 3 clients cannot hold its default bounds
    assert [r["mode"] for r in rows] == ["ckks", "ckks-before-issue-12", "ckks-nvflare-default"]
    for r in rows:
        assert r["n"] == 10 and r["d"] == 5000
        assert r["log_q"] <= r["log_q_bound_128"]
        assert r["bytes_up_per_client"] == pytest.approx(r["expansion_vs_float32"] * 4 * 5000)
        assert all(r[k] > 0 for k in ("encrypt_s_per_1e6", "aggregate_s_per_1e6", "decrypt_s_per_1e6", "round_s"))
    shipped, before, nvflare = rows
    # before issue 12 the clients released CKKS's own error; now the flooding noise dominates it
    assert before["rel_error"] < 1e-6 < shipped["rel_error"] < 0.05
    # the mask round adds its keys, shares and masked input (8 bytes per slot) to the upload
    assert before["expansion_vs_float32"] < shipped["expansion_vs_float32"] < 2 * before["expansion_vs_float32"]
    # the one-prime ciphertext is about half the size of NVFlare's two-prime one under the same protocol
    assert before["bytes_up_per_client"] < 0.6 * nvflare["bytes_up_per_client"] / 1.125
    assert all(len(row) == len(TABLE_HEADERS) for row in table_rows(rows))


def test_the_nvflare_reference_encrypts_under_the_public_key_as_nvflare_does():
    """NVFlare's clients encrypt with an asymmetric context's public key: the server's copy holds
    the public key and no secret, so anyone can encrypt under it; only the clients decrypt."""
    import numpy as np
    import tenseal as ts

    from aggregation.ckks import codec
    from fedrlhf_secure.bench.ckks import NVFLARE, _nvflare_contexts

    config = NVFLARE[1]
    client, server = _nvflare_contexts(config)
    assert client.is_private() and client.has_public_key()
    assert not server.is_private() and server.has_public_key()
    x = np.linspace(-1, 1, 100)
    blobs = codec.encrypt(x, client, config, seeded=False)
    from_server = ts.ckks_vector(server, x.tolist()).serialize()  # public-key encryption needs no secret
    assert len(blobs[0]) > 0.9 * len(from_server)  # full ciphertexts both: public-key ones cannot be seeded
    for blob in (blobs[0], from_server):
        np.testing.assert_allclose(codec.decrypt(codec.load_chunks([blob], client, config, 100)), x, atol=1e-4)
