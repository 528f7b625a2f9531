"""A throwaway certificate authority and the TLS leaf for Stark Bank's API hosts.

The SDK talks HTTPS to hard-coded hosts; the emulator answers for them by terminating
TLS itself, so clients must trust a CA made for the occasion (via REQUESTS_CA_BUNDLE).
`make_certificates` runs the `openssl` command to create, in a directory the caller
owns and later deletes:

- ca.pem / ca.key: a self-signed CA (basicConstraints CA:TRUE, keyUsage keyCertSign),
- leaf.pem / leaf.key: a server certificate signed by it, with subjectAltName DNS
  entries for every host in HOSTS and extendedKeyUsage serverAuth.

Modern OpenSSL and Python's ssl (VERIFY_X509_STRICT since 3.13) reject certificates
missing those extensions, or key identifiers, so all are written explicitly in our own
config file rather than taken from the system's openssl.cnf. Keys never leave the
directory and nothing is ever committed. No state, no threads.
"""

import os
import secrets
import subprocess
from typing import NamedTuple

__all__ = ["HOSTS", "Certificates", "make_certificates", "CertificateError"]

# The two hosts the SDK addresses (starkcore/utils/request.py).
HOSTS = ("sandbox.api.starkbank.com", "api.starkbank.com")

# Long enough for any test run or demo session, short enough to be obviously throwaway.
_VALID_DAYS = "7"

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = placeholder

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {alt_names}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class CertificateError(RuntimeError):
    """The openssl command is missing or failed."""


class Certificates(NamedTuple):
    """Paths of the files `make_certificates` wrote."""

    ca_path: str
    """PEM of the CA certificate: what clients must trust (REQUESTS_CA_BUNDLE)."""
    cert_path: str
    """PEM of the leaf certificate the emulator presents."""
    key_path: str
    """PEM of the leaf's private key."""


def _openssl(*args, cwd):
    try:
        subprocess.run(("openssl",) + args, cwd=cwd, check=True, capture_output=True, timeout=30)
    except FileNotFoundError as error:
        raise CertificateError("the openssl command is required to run the emulator") from error
    except subprocess.CalledProcessError as error:
        raise CertificateError("openssl %s failed: %s" % (args[0], error.stderr.decode(errors="replace"))) from error


def make_certificates(directory):
    """Create a fresh CA and a leaf for HOSTS in directory; return their Certificates.

    Raise CertificateError if openssl is missing or fails. Each call makes new keys.
    """
    config = os.path.join(directory, "openssl.cnf")
    with open(config, "w") as file:
        file.write(_CONFIG.format(alt_names=", ".join("DNS:" + host for host in HOSTS)))
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", "-new", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", _VALID_DAYS,
        "-config", config, "-extensions", "ca_ext", "-subj", "/CN=stark_challenge emulator throwaway CA",
        cwd=directory,
    )
    _openssl(
        "req", "-new", *curve, "-keyout", "leaf.key", "-out", "leaf.csr", "-config", config,
        "-subj", "/CN=" + HOSTS[0],
        cwd=directory,
    )
    _openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", str(secrets.randbits(63)), "-days", _VALID_DAYS, "-sha256",
        "-extfile", config, "-extensions", "leaf_ext", "-out", "leaf.pem",
        cwd=directory,
    )
    for name in ("ca.key", "leaf.key"):
        os.chmod(os.path.join(directory, name), 0o600)
    return Certificates(
        ca_path=os.path.join(directory, "ca.pem"),
        cert_path=os.path.join(directory, "leaf.pem"),
        key_path=os.path.join(directory, "leaf.key"),
    )
