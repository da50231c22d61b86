"""TLS for the agent's network API: the operator's certificate, or Kiln's own CA.

Without ``--tls-cert``/``--tls-key`` the agent makes, on first use, a CA under
``KILN_HOME/tls/`` and a server certificate it signs for the listen address and
localhost. A client trusts that CA file (``KILN_CA``, or the home's own): nothing
is ever sent to an agent whose certificate is not verified.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.paths import private_dirs, write_private

__all__ = ["CA_FILE", "Listen", "ensure_server_certificate", "home_ca", "parse_listen"]

TLS_DIR = "tls"
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_FILE = "server.pem"
SERVER_KEY_FILE = "server-key.pem"
CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class Listen:
    """Where the network API listens, and the certificate it presents."""

    host: str
    port: int
    cert: Path
    key: Path
    ca: Path | None = None
    """Kiln's own CA, which clients must trust; None for the operator's certificate."""

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port), refused with one line otherwise."""
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise KilnError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:7443")
    return host, int(port_text)


def home_ca(home: Path) -> Path:
    return home / TLS_DIR / CA_FILE


def _names(host: str) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses a certificate for ``host`` must cover."""
    dns = {"localhost"}
    ips = {"127.0.0.1", "::1"}
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        dns.add(host)
    else:
        if address.is_unspecified:  # 0.0.0.0: reached by whatever name the machine has
            dns.add(socket.gethostname())
        else:
            ips.add(str(address))
    return sorted(dns), sorted(ips)


def ensure_server_certificate(
    home: Path, host: str, cert: Path | None = None, key: Path | None = None
) -> tuple[Path, Path]:
    """The certificate and key to serve: the given files (checked now, so a bad one fails
    at start with one line), or Kiln's own, made or re-issued to cover ``host``."""
    if (cert is None) != (key is None):
        raise KilnError("--tls-cert and --tls-key go together")
    if cert is None or key is None:
        cert, key = _own_certificate(home, host)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise KilnError(f"TLS certificate {cert} / key {key}: unusable ({e})") from None
    return cert, key


def _own_certificate(home: Path, host: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = home / TLS_DIR
    private_dirs(directory)
    ca_path, ca_key_path = directory / CA_FILE, directory / CA_KEY_FILE
    if not (ca_path.exists() and ca_key_path.exists()):
        _write_ca(ca_path, ca_key_path)
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KilnError(f"{ca_key_path}: not the EC key Kiln makes; remove {directory} to renew")
    cert_path, key_path = directory / SERVER_FILE, directory / SERVER_KEY_FILE
    dns, ips = _names(host)
    if not _covers(cert_path, ca_cert, dns, ips):
        _write_server(cert_path, key_path, ca_cert, ca_key, dns, ips)
    return cert_path, key_path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_ca(ca_path: Path, ca_key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Kiln agent CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
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
    write_private(
        ca_key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private(ca_path, cert.public_bytes(serialization.Encoding.PEM))


def _covers(cert_path: Path, ca_cert: object, dns: list[str], ips: list[str]) -> bool:
    """Whether the server certificate on disk is signed by this CA, valid for a while
    yet, and names every address it must."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    assert isinstance(ca_cert, x509.Certificate)
    if cert.issuer != ca_cert.subject:
        return False
    if cert.not_valid_after_utc < _now() + datetime.timedelta(days=1):
        return False
    have_dns = set(sans.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return set(dns) <= have_dns and set(ips) <= have_ips


def _write_server(
    cert_path: Path,
    key_path: Path,
    ca_cert: object,
    ca_key: object,
    dns: list[str],
    ips: list[str],
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    assert isinstance(ca_cert, x509.Certificate)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln agent")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
