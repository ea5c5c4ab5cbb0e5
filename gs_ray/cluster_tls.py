"""Mutual TLS for Ray's gRPC on a multi-node cluster (cluster.yaml; docs/security.md).

On a cluster, Ray's servers listen on each node's address: the GCS, the raylets, every worker
and every Ray Serve replica's inter-deployment gRPC server (plaintext on ``[::]:<port>``). Token
authentication covers Ray's own services; with ``RAY_USE_TLS`` every one of these gRPC servers
and clients also speaks TLS and wants the peer's certificate signed by the cluster's CA
(``ray._common.tls_utils``: ``require_client_auth``), so a process without a certificate of the
cluster can call none of them, Serve replicas included.

The head makes the cluster's CA once (``ca``), and leaves it for the workers where it leaves the
token; every node then makes its own key and certificate (``node``), for its Ray address and
loopback, before ``ray start``; ``ray_env`` is what ``ray start`` and every process of the node
need in their environment. ``cluster_config`` writes these steps into cluster.yaml.

    python -m gs_ray.cluster_tls ca DIR               # DIR/ca.crt, DIR/ca.key (kept if present)
    python -m gs_ray.cluster_tls node DIR [--ip IP]   # DIR/node.crt, node.key, by DIR's CA
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import socket
import sys
from pathlib import Path

from gs_ray.io import atomic_write_bytes

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
NODE_CERT = "node.crt"
NODE_KEY = "node.key"
CA_DAYS = 3650
NODE_DAYS = 825
#: Names every node certificate holds besides the node's own address: Ray's processes also talk
#: to their own node's servers on loopback.
LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


class TLSError(RuntimeError):
    """A CA or node certificate that cannot be made or used (the message names the file)."""


def _private_dir(directory: Path) -> Path:
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    return directory


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gs-ray cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(directory: str | Path, days: int = CA_DAYS) -> tuple[Path, Path]:
    """The cluster's CA in ``directory`` (0700): ca.crt (0644) and ca.key (0600). An existing
    pair is kept (a restarted head keeps its cluster's CA); half a pair is an error."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    directory = _private_dir(Path(directory))
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and key_path.exists():
        load_ca(directory)  # readable and a pair, or a clear error
        return cert_path, key_path
    if cert_path.exists() or key_path.exists():
        have = cert_path if cert_path.exists() else key_path
        raise TLSError(f"{have} exists without its other half: remove it or restore the pair")
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    name = _name("gs-ray cluster CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write_bytes(key_path, _pem_key(key), mode=0o600)
    atomic_write_bytes(cert_path, _pem_cert(cert), mode=0o644)
    return cert_path, key_path


def load_ca(directory: str | Path):
    """(certificate, key) of the CA in ``directory``; a missing or broken file is a TLSError
    that names it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    directory = Path(directory).expanduser()
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise TLSError(
                f"{path}: not found. Make the cluster's CA first (python -m gs_ray.cluster_tls "
                f"ca {directory}) or copy the head's {CA_CERT} and {CA_KEY} there"
            )
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as err:
        raise TLSError(f"{cert_path}: not a PEM certificate ({err})") from err
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise TLSError(f"{key_path}: not an unencrypted PEM private key ({err})") from err
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise TLSError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def node_names(ips: list[str] | None = None) -> list[str]:
    """What a node certificate is for: ``ips`` (default: the address Ray gives this node), the
    host name and loopback, without repeats."""
    if not ips:
        from ray.util import get_node_ip_address

        ips = [get_node_ip_address()]
    names: list[str] = []
    for n in [*ips, socket.gethostname(), *LOOPBACK_NAMES]:
        if n and n not in names:
            names.append(n)
    return names


def make_node_cert(
    directory: str | Path, ips: list[str] | None = None, days: int = NODE_DAYS
) -> tuple[Path, Path]:
    """This node's node.key (0600) and node.crt, signed by the CA in ``directory``, for its
    address, host name and loopback; for serving and for calling (mutual TLS). Made afresh each
    time (a node's address may change between starts)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    directory = _private_dir(Path(directory))
    ca_cert, ca_key = load_ca(directory)
    names = node_names(ips)
    alt: list = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_path, cert_path = directory / NODE_KEY, directory / NODE_CERT
    atomic_write_bytes(key_path, _pem_key(key), mode=0o600)
    atomic_write_bytes(cert_path, _pem_cert(cert), mode=0o644)
    return cert_path, key_path


def ray_env(directory: str | Path) -> dict[str, str]:
    """The environment that turns on Ray's mutual TLS with the node certificate in
    ``directory`` (taken as written: "$HOME/.gs-ray-tls" stays for a shell to expand)."""
    d = str(directory).rstrip("/")
    return {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": f"{d}/{NODE_CERT}",
        "RAY_TLS_SERVER_KEY": f"{d}/{NODE_KEY}",
        "RAY_TLS_CA_CERT": f"{d}/{CA_CERT}",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gs_ray.cluster_tls", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("ca", help="make the cluster's CA in DIR (kept if it exists)")
    ca.add_argument("dir")
    node = sub.add_parser("node", help="make this node's key and certificate with DIR's CA")
    node.add_argument("dir")
    node.add_argument(
        "--ip", action="append", help="the node's address (repeatable; default: Ray's choice)"
    )
    args = p.parse_args(argv)
    try:
        if args.command == "ca":
            cert, _ = make_ca(args.dir)
            print(f"cluster CA: {cert}")
        else:
            cert, _ = make_node_cert(args.dir, args.ip)
            print(f"node certificate: {cert} for {', '.join(node_names(args.ip))}")
    except TLSError as err:
        print(f"gs-ray: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
