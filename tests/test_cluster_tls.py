"""The cluster's CA and node certificates (gs_ray.cluster_tls): private files, a certificate
chain a TLS peer accepts, clear errors. That Ray's servers then refuse everyone else is checked on
a running head and worker node in test_ray_security."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gs_ray import cluster_tls
from gs_ray.cluster_tls import TLSError, load_ca, main, make_ca, make_node_cert, ray_env


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_and_node_certificate_form_a_chain_for_the_nodes_names(tmp_path):
    d = tmp_path / "tls"
    ca_cert, ca_key = make_ca(d)
    cert_path, key_path = make_node_cert(d, ["10.0.3.7"])
    assert mode(d) == 0o700 and mode(ca_key) == 0o600 and mode(key_path) == 0o600
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    node = x509.load_pem_x509_certificate(cert_path.read_bytes())
    node.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    alt = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}
    assert {"10.0.3.7", "127.0.0.1", "::1"} <= ips
    assert "localhost" in alt.get_values_for_type(x509.DNSName)
    usage = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    assert node.not_valid_after_utc <= ca.not_valid_after_utc
    for ip in ips:
        ipaddress.ip_address(ip)


def test_an_existing_ca_is_kept_and_node_certificates_are_fresh(tmp_path):
    make_ca(tmp_path)
    before = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes()
    make_ca(tmp_path)  # a restarted head keeps its cluster's CA
    assert ((tmp_path / "ca.crt").read_bytes(), (tmp_path / "ca.key").read_bytes()) == before
    first = make_node_cert(tmp_path, ["10.0.0.1"])[0].read_bytes()
    assert make_node_cert(tmp_path, ["10.0.0.2"])[0].read_bytes() != first
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_or_broken_ca_files_are_named(tmp_path, capsys):
    with pytest.raises(TLSError, match=r"ca\.crt: not found.*cluster_tls ca"):
        make_node_cert(tmp_path, ["10.0.0.1"])
    assert main(["node", str(tmp_path), "--ip", "10.0.0.1"]) == 2
    assert "ca.crt: not found" in capsys.readouterr().err
    make_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(TLSError, match=r"ca\.crt exists without its other half"):
        make_ca(tmp_path)
    other = tmp_path / "other"
    make_ca(other)
    (tmp_path / "ca.key").write_bytes((other / "ca.key").read_bytes())
    with pytest.raises(TLSError, match=r"ca\.key is not the key of .*ca\.crt"):
        load_ca(tmp_path)
    (tmp_path / "ca.crt").write_text("not a certificate")
    with pytest.raises(TLSError, match=r"ca\.crt: not a PEM certificate"):
        load_ca(tmp_path)


def test_cli_and_ray_env(tmp_path, capsys):
    assert main(["ca", str(tmp_path)]) == 0
    assert main(["node", str(tmp_path), "--ip", "10.1.2.3", "--ip", "node-7"]) == 0
    out = capsys.readouterr().out
    assert "10.1.2.3, node-7" in out and "localhost" in out
    env = ray_env("$HOME/.gs-ray-tls")
    assert env == {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": "$HOME/.gs-ray-tls/node.crt",
        "RAY_TLS_SERVER_KEY": "$HOME/.gs-ray-tls/node.key",
        "RAY_TLS_CA_CERT": "$HOME/.gs-ray-tls/ca.crt",
    }
    assert env["RAY_TLS_CA_CERT"].endswith(cluster_tls.CA_CERT)
