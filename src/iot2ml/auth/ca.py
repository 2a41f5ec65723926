"""The platform's certificate authority: device certificates, provisioning claims and the server
certificate of the TLS listeners (MQTTS, HTTPS).

The CA lives in ``data_dir/ca`` (``ca.pem``, ``ca.key`` mode 0600) unless the user brings their own
(``ca_cert_file`` / ``ca_key_file``). ``rotate()`` makes a new CA and keeps the old ones in
``bundle.pem``, the file the listeners trust, so certificates issued before keep working until they
expire or are revoked. Keys are ECDSA P-256.

A certificate's subject names who holds it and which certificate it is, so that the broker can map
it to a user and revoke one certificate without the others (NATS ``verify_and_map`` matches the
subject)::

    CN=<device id>,OU=device,serialNumber=<serial>     a device
    CN=<claim name>,OU=claim,serialNumber=<serial>     a provisioning claim
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..core.config import Settings
from ..core.errors import ConfigError, InvalidInput

KINDS = ("device", "claim")

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate just signed: its PEM, its serial (hex), when it ends, and the key if we made it."""

    cert_pem: str
    serial: str
    not_after: dt.datetime
    key_pem: str | None = None


def subject_dn(kind: str, name: str, serial: str) -> str:
    """The subject as the broker prints and matches it (RFC 4514 order, most specific first).

    >>> subject_dn("device", "pump-9", "0a1b")
    'SERIALNUMBER=0a1b,OU=device,CN=pump-9'
    """
    return f"SERIALNUMBER={serial},OU={kind},CN={name}"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateAuthority:
    """The CA of a data dir (``folder`` = ``data_dir/ca``), or the user's own from two PEM files."""

    def __init__(self, folder: Path, *, cert_file: Path | None = None, key_file: Path | None = None,
                 device_days: float = 365.0) -> None:
        self.folder = Path(folder)
        self.own = cert_file is not None
        if (cert_file is None) != (key_file is None):
            raise ConfigError("give both ca_cert_file and ca_key_file (the CA's certificate and key), or neither")
        self.cert_path = Path(cert_file) if cert_file else self.folder / "ca.pem"
        self.key_path = Path(key_file) if key_file else self.folder / "ca.key"
        self.bundle_path = self.folder / "bundle.pem"
        self.device_days = device_days

    # ---- the CA itself --------------------------------------------------------------------
    def ensure(self) -> CertificateAuthority:
        """Create the CA on first use (not when the user brought one); write the trust bundle."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.cert_path.exists():
            if self.own:
                raise ConfigError(f"CA certificate {self.cert_path} does not exist")
            self._create()
        if not self.bundle_path.exists() or self.own:
            _write_public(self.bundle_path, self.cert_path.read_bytes())
        return self

    def _create(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "iot2ml"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"iot2ml CA {_now():%Y-%m-%d %H%M%S}")])
        now = _now()
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + 10 * 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        _write_public(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def rotate(self) -> dict[str, object]:
        """A new CA; the old one stays trusted (in the bundle) for the certificates it signed."""
        if self.own:
            raise ConfigError("this platform uses your own CA (ca_cert_file): rotate it where you keep it")
        self.ensure()
        old = self.cert_path.read_bytes()
        bundle = self.bundle_path.read_bytes()
        self._create()
        _write_public(self.bundle_path, self.cert_path.read_bytes() + (bundle if old in bundle else old + bundle))
        return self.info()

    @property
    def cert_pem(self) -> str:
        return self.ensure().cert_path.read_text()

    @property
    def bundle_pem(self) -> str:
        """Every CA certificate the listeners trust (the current one first)."""
        return self.ensure().bundle_path.read_text()

    def info(self) -> dict[str, object]:
        """What ``iot2ml ca show`` prints: the current CA and the older ones still trusted."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        self.ensure()
        certs = x509.load_pem_x509_certificates(self.bundle_path.read_bytes())
        rows = [{"subject": c.subject.rfc4514_string(), "sha256": c.fingerprint(hashes.SHA256()).hex(),
                 "not_after": c.not_valid_after_utc.isoformat()} for c in certs]
        return {"cert_file": str(self.cert_path), "bundle_file": str(self.bundle_path), "own": self.own,
                **rows[0], "previous": rows[1:], "cert": self.cert_pem}

    def _load(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.ensure()
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        return cert, key

    # ---- issuing --------------------------------------------------------------------------
    def _sign(self, public_key, subject, *, server_hosts: list[str] | None = None,
              days: float | None = None) -> Issued:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID

        ca_cert, ca_key = self._load()
        now = _now()
        serial = x509.random_serial_number()
        not_after = min(now + (days if days is not None else self.device_days) * _DAY, ca_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
            .serial_number(serial).not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if server_hosts is not None:
            names: list[x509.GeneralName] = []
            for host in server_hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = (builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), format(serial, "x"), not_after)

    def _subject(self, kind: str, name: str, serial_hint: str):
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        if kind not in KINDS:
            raise InvalidInput(f"certificate kind {kind!r}: one of {', '.join(KINDS)}")
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                          x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                          x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_hint)])

    def issue(self, kind: str, name: str) -> Issued:
        """A new key pair and a certificate for ``name`` (``kind`` device or claim); the key is
        returned once and never stored."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        issued = self.sign_public_key(kind, name, key.public_key())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return Issued(issued.cert_pem, issued.serial, issued.not_after, key_pem)

    def sign_public_key(self, kind: str, name: str, public_key) -> Issued:
        # The subject carries its own certificate's id: a random 128-bit value we choose first
        # (the X.509 serial number is chosen by the builder; both are unique).
        ident = secrets.token_hex(16)
        issued = self._sign(public_key, self._subject(kind, name, ident))
        return Issued(issued.cert_pem, ident, issued.not_after)

    def sign_csr(self, kind: str, name: str, csr_pem: str) -> Issued:
        """Sign a device's CSR (its key stays on the device). The subject is ours, not the CSR's."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"csr is not a PEM certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise InvalidInput("csr signature does not verify: sign it with the device's own key")
        key = csr.public_key()
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
            raise InvalidInput(f"csr key is RSA-{key.key_size}: use RSA-2048 or more, or ECDSA P-256")
        if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            raise InvalidInput("csr key must be RSA (2048+) or ECDSA")
        return self.sign_public_key(kind, name, key)

    def server_files(self, folder: Path, hosts: list[str]) -> tuple[Path, Path]:
        """``(cert, key)`` files of a server certificate for ``hosts`` signed by this CA, made once
        (again when the hosts change or it nears its end)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_path, key_path = folder / "server.pem", folder / "server.key"
        hosts = sorted(set(hosts) | {"localhost", "127.0.0.1"})
        if cert_path.exists() and key_path.exists():
            current = x509.load_pem_x509_certificate(cert_path.read_bytes())
            try:
                san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
                    str(v) for v in san.get_values_for_type(x509.IPAddress)}
            except x509.ExtensionNotFound:
                have = set()
            ca_now = self._load()[0]
            if (set(hosts) <= have and current.not_valid_after_utc - _now() > 30 * _DAY
                    and current.issuer == ca_now.subject):
                return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        issued = self._sign(key.public_key(), subject, server_hosts=hosts, days=825)
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        _write_public(cert_path, issued.cert_pem.encode())
        return cert_path, key_path


def platform_ca(settings: Settings) -> CertificateAuthority:
    """The CA of ``settings``: the user's own (``ca_cert_file``/``ca_key_file``) or one under ``data_dir/ca``."""
    return CertificateAuthority(settings.data_dir / "ca", cert_file=settings.ca_cert_file,
                                key_file=settings.ca_key_file, device_days=settings.device_cert_days)


def server_tls_files(settings: Settings) -> tuple[Path, Path, Path]:
    """``(server certificate, its key, CA bundle)`` of the TLS listeners: the user's certificate
    (``tls_cert_file``/``tls_key_file``) or one the platform CA signs for this host, made on first use.
    The bundle is what client certificates are checked against (and what clients trust when the
    server certificate is ours)."""
    import socket

    ca = platform_ca(settings).ensure()
    if settings.tls_cert_file is not None:
        if settings.tls_key_file is None:
            raise ConfigError("--tls-cert needs --tls-key (the certificate's private key)")
        for path in (settings.tls_cert_file, settings.tls_key_file):
            if not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")
        return Path(settings.tls_cert_file).absolute(), Path(settings.tls_key_file).absolute(), ca.bundle_path.absolute()
    hosts = [h for h in (settings.host, socket.gethostname()) if h and h not in ("0.0.0.0", "::")]
    cert, key = ca.server_files(settings.data_dir / "tls", hosts)
    return cert.absolute(), key.absolute(), ca.bundle_path.absolute()
