"""`fedge certs DIR`: a local certificate authority, a server certificate and client keys.

What Flower's SuperLink and SuperNodes need for an encrypted, authenticated federation:

- `ca.crt` (+ `ca.key`): a self-signed CA; clients trust the server through it.
- `server.pem` + `server.key`: the SuperLink's TLS certificate, signed by the CA, valid for
  the given host names and IP addresses.
- `clients/client_N` + `clients/client_N.pub`: one elliptic-curve (SECP384R1) key pair per
  client in OpenSSH format, as Flower's SuperNode authentication wants. `fedge server
  --tls DIR --auth` enrols every `clients/*.pub`; a SuperNode whose key is not enrolled is
  refused. Hand each device only its own private key and `ca.crt`; never `ca.key`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedge.errors import ConfigError

VALID_DAYS = 365
DEFAULT_HOSTS = ("127.0.0.1", "localhost")  # what the server certificate is valid for


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    """A certificate for `subject`; self-signed (a CA) when `issuer` is None."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certs(out: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, clients: int = 0) -> Path:
    """Write the CA, the server certificate for `hosts` and `clients` client key pairs."""
    out = Path(out)
    if (out / "ca.key").exists():
        raise FileExistsError(f"{out}/ca.key exists: use another folder, or delete the old CA")
    if not hosts:
        raise ConfigError("give at least one --host the server certificate is valid for")
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("fedge local CA", ca_key, None, ca_key)
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate("fedge server", server_key, ca.subject, ca_key, hosts)
    _write(out / "server.key", _pem_key(server_key), private=True)
    _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM))
    for i in range(clients):
        client_key(out / "clients" / f"client_{i}")
    return out


def client_key(path: str | Path) -> Path:
    """One SuperNode key pair: `path` (private, OpenSSH) and `path.pub`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(path, private, private=True)
    _write(path.with_name(path.name + ".pub"), public + b"\n")
    return path


def tls_files(tls_dir: str | Path) -> dict[str, Path]:
    """The files `fedge server --tls DIR` needs, checked to exist."""
    tls_dir = Path(tls_dir)
    files = {"ca": "ca.crt", "cert": "server.pem", "key": "server.key"}
    paths = {role: tls_dir / name for role, name in files.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"--tls {tls_dir}: missing {missing}; make them with `fedge certs`")
    return paths


def enrolled_keys(tls_dir: str | Path) -> list[Path]:
    """The client public keys that `--auth` enrols (DIR/clients/*.pub)."""
    keys = sorted(Path(tls_dir, "clients").glob("*.pub"))
    if not keys:
        raise FileNotFoundError(
            f"--auth: no client keys in {tls_dir}/clients/*.pub; create them with "
            "`fedge certs DIR --clients N`"
        )
    return keys
