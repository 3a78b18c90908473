"""TLS certificates and SuperNode authentication keys for a Flower deployment.

Two independent credentials protect the Flower transport (see SECURITY.md §10):

* **TLS** (server-authenticated): a deployment CA signs the SuperLink's certificate, whose
  subjectAltNames list every hostname / IP the SuperNodes and the ``flwr`` CLI dial. SuperNodes
  pin the CA (``--root-certificates``), so a network attacker can neither read nor alter the
  traffic nor impersonate the SuperLink.
* **SuperNode authentication**: each SuperNode holds an EC private key (OpenSSH format, a NIST
  curve, as ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  expect in flwr 1.42); the SuperLink started with ``--enable-supernode-auth`` only accepts
  SuperNodes whose public key was registered, and every request is signed with that key.

Everything is generated with the ``cryptography`` package (no ``openssl`` shell-outs); private
keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import InputError, RunFailed


class CredentialExists(RunFailed, FileExistsError):
    """A CA or node key already exists; it is never overwritten (re-issuing would silently
    invalidate what the other parties pinned). Exit status 1: the step refused to run."""


CERT_DAYS = 365
NODE_KEY_CURVE = ec.SECP384R1
"""The curve of Flower's own node-key recipe (``ssh-keygen -t ecdsa -b 384``)."""


@dataclass(frozen=True)
class CertificatePaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPaths:
    private_key: Path
    public_key: Path


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    if private:
        os.chmod(path, 0o600)


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise InputError("empty hostname in the certificate's host list")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def create_certificates(out_dir: Path, hosts: Sequence[str], *, days: int = CERT_DAYS) -> CertificatePaths:
    """A deployment CA and a SuperLink server certificate valid for ``hosts`` (names or IPs).

    Refuses to overwrite an existing CA key: re-issuing the CA would silently invalidate every
    SuperNode's pinned root certificate.
    """
    if not hosts:
        raise InputError("at least one SuperLink hostname or IP address is needed for the certificate")
    out_dir = Path(out_dir)
    paths = CertificatePaths(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.pem", out_dir / "server.key")
    if paths.ca_key.exists():
        raise CredentialExists(f"{paths.ca_key} already exists; remove it (and re-distribute ca.crt) to issue a new CA")
    now = dt.datetime.now(dt.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrlhf deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write(paths.ca_key, ca_key.private_bytes(pem, pkcs8, none), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(pem), private=False)
    _write(paths.server_key, server_key.private_bytes(pem, pkcs8, none), private=True)
    _write(paths.server_cert, server_cert.public_bytes(pem), private=False)
    return paths


def create_node_keys(out_dir: Path, names: Sequence[str]) -> list[NodeKeyPaths]:
    """One SuperNode authentication key pair per name: ``NAME`` (private) and ``NAME.pub``."""
    out_dir = Path(out_dir)
    out: list[NodeKeyPaths] = []
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise InputError(f"invalid node key name {name!r}: use a plain file name")
        paths = NodeKeyPaths(out_dir / name, out_dir / f"{name}.pub")
        if paths.private_key.exists():
            raise CredentialExists(f"{paths.private_key} already exists; refusing to overwrite a node key")
        key = ec.generate_private_key(NODE_KEY_CURVE())
        priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(paths.private_key, priv, private=True)
        _write(paths.public_key, pub + f" fedrlhf-{name}\n".encode(), private=False)
        out.append(paths)
    return out
