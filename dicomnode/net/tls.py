"""TLS contexts for the SCP and the SCU (DICOM TLS, PS3.15 Annex B.1; TLS >= 1.2)."""

from __future__ import annotations

import ssl

from dicomnode.config import TlsSettings
from dicomnode.errors import ConfigError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The SCP's context: our certificate; client certificates verified against the CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.certificate is None or tls.private_key is None:
        raise ConfigError("TLS needs [node.tls].certificate and private_key")
    try:
        ctx.load_cert_chain(tls.certificate, tls.private_key)
        if tls.ca_certificates is not None:
            ctx.load_verify_locations(tls.ca_certificates)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from exc
    if tls.require_client_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """The SCU's context: verify the peer against the CA (hostname included); present our
    certificate when we have one (for peers that require client certificates)."""
    if tls.ca_certificates is None:
        raise ConfigError("sending with TLS needs [node.tls].ca_certificates")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_certificates))
        if tls.certificate is not None and tls.private_key is not None:
            ctx.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS material: {exc}") from exc
    ctx.minimum_version = _VERSIONS[tls.min_version]
    return ctx
