"""Apple Pay for the cloud: decrypting ``EC_v1`` payment tokens and validating the merchant.

The merchant's Apple Pay keys live in the cloud only, never on a restaurant's edge box.
Two jobs, following Apple's "Payment token format reference" and "Apple Pay on the Web":

**Payment tokens.** ``ApplePayDecrypter.decrypt`` takes the ``paymentData`` JSON a device
produced and either returns an ``ApplePayPayment`` or raises ``ApplePayError``:

1. The token must be a JSON object of version ``EC_v1`` with base64 ``data`` (ciphertext and
   16-byte GCM tag), ``signature`` and ``header.ephemeralPublicKey``/``publicKeyHash``, hex
   ``header.transactionId`` and optional hex ``header.applicationData``.
2. ``publicKeyHash`` must be the SHA-256 of our payment processing certificate's public key
   (DER SubjectPublicKeyInfo): a token for another merchant is refused.
3. ``signature`` is a detached CMS SignedData (read with asn1crypto, checked with
   cryptography). Its signer (leaf) certificate must carry the marker extension
   1.2.840.113635.100.6.29 and be issued by an intermediate in the signature carrying
   1.2.840.113635.100.6.2.14, itself a CA issued by the configured root (Apple Root CA - G3
   in production, ``APPLE_ROOT_CA_G3_PEM``). The signed content is ephemeralPublicKey ||
   data || transactionId || applicationData (the hex fields as bytes); the ``messageDigest``
   signed attribute must be its SHA-256, and the ECDSA-with-SHA-256 signature must verify
   with the leaf's key over the DER of the signed attributes with their ``[0] IMPLICIT`` tag
   replaced by the universal SET OF tag (RFC 5652, section 5.4). All three certificates must
   be valid at the ``signingTime`` signed attribute.
4. ``signingTime`` must lie within ``signing_window`` (default 5 minutes) either side of the
   injected clock, a callable returning a timezone-aware ``datetime``.
5. Key derivation: Z = ECDH(payment processing key, ephemeral key), then the NIST SP 800-56A
   concatenation KDF with SHA-256 and otherInfo = ``b"\\x0did-aes256-GCM" + b"Apple"`` +
   party V, where party V is the SHA-256 of the merchant identifier string. The payment
   processing certificate's extension 1.2.840.113635.100.6.32 holds that hash hex-encoded
   (a UTF8String of 64 hex digits, as Apple documents); ``load_merchant`` reads it and
   refuses a certificate whose hash does not match the configured merchant identifier.
6. AES-256-GCM with a 16-byte all-zero IV and no associated data decrypts ``data``.
7. The transaction id goes through a ``ReplayGuard``: a token seen before is refused. The
   guard only needs to remember ids for the signing window, since older tokens fail step 4.

Every refusal is an ``ApplePayError`` whose ``code`` is one of ``ApplePayCode``. Messages
never contain key material, card numbers or cryptograms, and neither does the ``repr`` of
an ``ApplePayPayment``.

**Merchant validation.** ``MerchantValidator.start_session`` is the server side of the
browser's ``onvalidatemerchant``: it POSTs ``{merchantIdentifier, displayName, initiative:
"web", initiativeContext}`` to the validation URL the browser was given, authenticating with
the merchant identity certificate over TLS, and returns Apple's opaque session object. The
URL must be ``https`` without credentials, on a host of the allowlist (Apple's payment
gateways by default); redirects are not followed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import logging
import re
import secrets
import ssl
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from asn1crypto import cms
from asn1crypto import core as asn1
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from yarl import URL

log = logging.getLogger(__name__)

TOKEN_VERSION = "EC_v1"
LEAF_MARKER_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.29")
INTERMEDIATE_MARKER_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.2.14")
MERCHANT_ID_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.32")
DEFAULT_SIGNING_WINDOW = timedelta(minutes=5)
DEFAULT_VALIDATION_TIMEOUT = 10.0

_KDF_ALGORITHM = b"\x0did-aes256-GCM"
_KDF_PARTY_U = b"Apple"
_GCM_IV = bytes(16)
_GCM_TAG_SIZE = 16
_HEX = re.compile(r"[0-9a-fA-F]+")

# Apple's public root for Apple Pay signatures, from www.apple.com/certificateauthority.
# SHA-256 fingerprint 63343ABFB89A6A03EBB57E9B3F5FA7BE7C4F5C756F3017B3A8C488C3653E9179.
APPLE_ROOT_CA_G3_PEM = b"""-----BEGIN CERTIFICATE-----
MIICQzCCAcmgAwIBAgIILcX8iNLFS5UwCgYIKoZIzj0EAwMwZzEbMBkGA1UEAwwS
QXBwbGUgUm9vdCBDQSAtIEczMSYwJAYDVQQLDB1BcHBsZSBDZXJ0aWZpY2F0aW9u
IEF1dGhvcml0eTETMBEGA1UECgwKQXBwbGUgSW5jLjELMAkGA1UEBhMCVVMwHhcN
MTQwNDMwMTgxOTA2WhcNMzkwNDMwMTgxOTA2WjBnMRswGQYDVQQDDBJBcHBsZSBS
b290IENBIC0gRzMxJjAkBgNVBAsMHUFwcGxlIENlcnRpZmljYXRpb24gQXV0aG9y
aXR5MRMwEQYDVQQKDApBcHBsZSBJbmMuMQswCQYDVQQGEwJVUzB2MBAGByqGSM49
AgEGBSuBBAAiA2IABJjpLz1AcqTtkyJygRMc3RCV8cWjTnHcFBbZDuWmBSp3ZHtf
TjjTuxxEtX/1H7YyYl3J6YRbTzBPEVoA/VhYDKX1DyxNB0cTddqXl5dvMVztK517
IDvYuVTZXpmkOlEKMaNCMEAwHQYDVR0OBBYEFLuw3qFYM4iapIqZ3r6966/ayySr
MA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMAoGCCqGSM49BAMDA2gA
MGUCMQCD6cHEFl4aXTQY2e3v9GwOAEZLuN+yRhHFD/3meoyhpmvOwgPUnPWTxnS4
at+qIxUCMG1mihDK1A3UT82NQz60imOlM27jbdoXt2QfyFMm+YhidDkLF1vLUagM
6BgD56KyKA==
-----END CERTIFICATE-----
"""

# Apple's merchant validation hosts ("Setting up your server"): global and China, production
# and sandbox, and the regional pods. A ``*`` stands for one run of letters and digits.
APPLE_PAY_GATEWAY_HOSTS: tuple[str, ...] = (
    "apple-pay-gateway.apple.com",
    "apple-pay-gateway-cert.apple.com",
    "apple-pay-gateway-*-*.apple.com",
    "cn-apple-pay-gateway.apple.com",
    "cn-apple-pay-gateway-cert.apple.com",
    "cn-apple-pay-gateway-*-*.apple.com",
)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def apple_root_ca_g3() -> x509.Certificate:
    """Apple Root CA - G3, the root to trust for production payment tokens."""
    return x509.load_pem_x509_certificate(APPLE_ROOT_CA_G3_PEM)


# --- errors ---------------------------------------------------------------------------


class ApplePayCode(StrEnum):
    """Every way a payment token or a merchant validation is refused."""

    MALFORMED_TOKEN = "malformed_token"
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_MERCHANT = "wrong_merchant"
    BAD_SIGNATURE = "bad_signature"
    UNTRUSTED_CERTIFICATE = "untrusted_certificate"
    SIGNING_TIME_OUT_OF_WINDOW = "signing_time_out_of_window"
    REPLAYED_TOKEN = "replayed_token"
    DECRYPTION_FAILED = "decryption_failed"
    VALIDATION_URL_REFUSED = "validation_url_refused"
    MERCHANT_VALIDATION_FAILED = "merchant_validation_failed"


APPLE_PAY_ERRORS: dict[ApplePayCode, str] = {
    ApplePayCode.MALFORMED_TOKEN: "the token is not well-formed EC_v1 payment data",
    ApplePayCode.UNSUPPORTED_VERSION: "the token's version is not EC_v1",
    ApplePayCode.WRONG_MERCHANT: "the token was encrypted for another merchant key",
    ApplePayCode.BAD_SIGNATURE: "the token's signature is missing, unreadable or invalid",
    ApplePayCode.UNTRUSTED_CERTIFICATE: "the signature's certificates do not chain to the root",
    ApplePayCode.SIGNING_TIME_OUT_OF_WINDOW: "the token was signed too long ago or ahead",
    ApplePayCode.REPLAYED_TOKEN: "the token's transaction id was already accepted",
    ApplePayCode.DECRYPTION_FAILED: "the token's payment data cannot be decrypted and read",
    ApplePayCode.VALIDATION_URL_REFUSED: "the validation URL is not an allowed https host",
    ApplePayCode.MERCHANT_VALIDATION_FAILED: "Apple Pay did not start a merchant session",
}


class ApplePayError(Exception):
    """A refused token or merchant validation; branch on ``code``, never on the message."""

    def __init__(self, code: ApplePayCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ApplePayError({self.code.value!r}, {self.message!r})"


# --- merchant configuration -------------------------------------------------------------


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True, slots=True)
class ApplePayMerchant:
    """One Apple Pay merchant: its identifier, payment processing and identity credentials.

    ``merchant_id_hash`` is the KDF's party V: SHA-256 of ``merchant_identifier``.
    ``identity_certificates`` is the identity certificate first, then any intermediates.
    """

    merchant_identifier: str
    display_name: str
    domain: str
    payment_key: ec.EllipticCurvePrivateKey = field(repr=False)
    payment_certificate: x509.Certificate = field(repr=False)
    identity_certificates: tuple[x509.Certificate, ...] = field(repr=False)
    identity_key: PrivateKeyTypes = field(repr=False)
    merchant_id_hash: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.merchant_identifier:
            raise ValueError("the merchant identifier is empty")
        if not self.display_name or len(self.display_name) > 64:
            raise ValueError("the display name must be 1 to 64 characters")
        if not self.domain or any(c in self.domain for c in "/:@ "):
            raise ValueError("the domain must be a bare host name, like shop.example.com")
        if not isinstance(self.payment_key.curve, ec.SECP256R1):
            raise ValueError("the payment processing key must be an EC P-256 key")
        if _spki(self.payment_key.public_key()) != _spki(self.payment_certificate.public_key()):
            raise ValueError("the payment processing key does not match its certificate")
        if not self.identity_certificates:
            raise ValueError("the merchant identity certificate is missing")
        identity_public = self.identity_key.public_key()
        if _spki(identity_public) != _spki(self.identity_certificates[0].public_key()):
            raise ValueError("the merchant identity key does not match its certificate")
        if len(self.merchant_id_hash) != 32:
            raise ValueError("the merchant id hash must be 32 bytes (SHA-256)")

    @property
    def public_key_hash(self) -> bytes:
        """SHA-256 of the payment certificate's public key, as tokens' ``publicKeyHash``."""
        return hashlib.sha256(_spki(self.payment_certificate.public_key())).digest()

    def session_request(self) -> dict[str, str]:
        """The body of a merchant validation request for Apple Pay on the web."""
        return {
            "merchantIdentifier": self.merchant_identifier,
            "displayName": self.display_name,
            "initiative": "web",
            "initiativeContext": self.domain,
        }


def merchant_id_hash_from_certificate(certificate: x509.Certificate) -> bytes | None:
    """Party V as Apple stores it in the certificate, or None when the extension is absent.

    Extension 1.2.840.113635.100.6.32 holds the hex-encoded SHA-256 of the merchant
    identifier, DER-encoded as a string (UTF8String in Apple's certificates; IA5String,
    PrintableString and OCTET STRING are read the same way). Raises ValueError otherwise.
    """
    try:
        extension = certificate.extensions.get_extension_for_oid(MERCHANT_ID_OID)
    except x509.ExtensionNotFound:
        return None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise ValueError("the merchant id extension has an unexpected type")
    try:
        decoded = asn1.load(value.value, strict=True)
    except ValueError as exc:
        raise ValueError("the merchant id extension is not DER") from exc
    text = decoded.native
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    if not isinstance(text, str) or len(text) != 64 or not _HEX.fullmatch(text):
        raise ValueError("the merchant id extension is not a hex-encoded SHA-256")
    return bytes.fromhex(text)


def load_merchant(
    *,
    merchant_identifier: str,
    display_name: str,
    domain: str,
    payment_certificate_pem: bytes,
    payment_key_pem: bytes,
    identity_certificate_pem: bytes,
    identity_key_pem: bytes,
    key_password: bytes | None = None,
) -> ApplePayMerchant:
    """Build a merchant from PEM: the certificates as issued by Apple, keys as PKCS#8/SEC1.

    Party V is SHA-256 of ``merchant_identifier``; when the payment processing certificate
    carries the merchant id extension it must hold that same hash (else ValueError), which
    catches a certificate of another merchant id. ``identity_certificate_pem`` may hold the
    identity certificate followed by intermediates.
    """
    payment_certificate = x509.load_pem_x509_certificate(payment_certificate_pem)
    payment_key = serialization.load_pem_private_key(payment_key_pem, key_password)
    if not isinstance(payment_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the payment processing key must be an EC P-256 key")
    merchant_id_hash = hashlib.sha256(merchant_identifier.encode("utf-8")).digest()
    stored = merchant_id_hash_from_certificate(payment_certificate)
    if stored is not None and stored != merchant_id_hash:
        raise ValueError(
            "the payment processing certificate was issued for another merchant identifier"
        )
    return ApplePayMerchant(
        merchant_identifier=merchant_identifier,
        display_name=display_name,
        domain=domain,
        payment_key=payment_key,
        payment_certificate=payment_certificate,
        identity_certificates=tuple(x509.load_pem_x509_certificates(identity_certificate_pem)),
        identity_key=serialization.load_pem_private_key(identity_key_pem, key_password),
        merchant_id_hash=merchant_id_hash,
    )


# --- replay guard -----------------------------------------------------------------------


class ReplayGuard(Protocol):
    """Remembers accepted transaction ids for at least the signing window."""

    async def remember(self, transaction_id: str, signed_at: datetime) -> bool:
        """Record ``transaction_id``; False when it was already recorded (a replay)."""
        ...


class InMemoryReplayGuard:
    """A per-process ``ReplayGuard`` that forgets ids signed more than ``window`` ago."""

    def __init__(self, window: timedelta = DEFAULT_SIGNING_WINDOW, clock: Clock = utc_now):
        self._window = window
        self._clock = clock
        self._seen: dict[str, datetime] = {}
        self._expiry: list[tuple[datetime, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    async def remember(self, transaction_id: str, signed_at: datetime) -> bool:
        """Record the id; False when already recorded and not yet forgotten."""
        self._forget_before(_aware(self._clock()) - self._window)
        if transaction_id in self._seen:
            return False
        self._seen[transaction_id] = signed_at
        heapq.heappush(self._expiry, (signed_at, transaction_id))
        return True

    def _forget_before(self, horizon: datetime) -> None:
        while self._expiry and self._expiry[0][0] < horizon:
            signed_at, transaction_id = heapq.heappop(self._expiry)
            if self._seen.get(transaction_id) == signed_at:
                del self._seen[transaction_id]


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("the clock must return a timezone-aware datetime")
    return moment


# --- token parsing ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    """The fields of an EC_v1 token, decoded from base64 and hex (ids kept as hex)."""

    data: bytes
    signature: bytes
    ephemeral_public_key: bytes
    public_key_hash: bytes
    transaction_id: str
    application_data: str | None

    def signed_content(self) -> bytes:
        """What the device signed: ephemeral key, data, transaction id, application data."""
        application = bytes.fromhex(self.application_data or "")
        return (
            self.ephemeral_public_key + self.data + bytes.fromhex(self.transaction_id) + application
        )


def _as_object(payment_data: str | bytes | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(payment_data, Mapping):
        return payment_data
    try:
        parsed = json.loads(payment_data)
    except (ValueError, TypeError) as exc:
        raise ApplePayError(ApplePayCode.MALFORMED_TOKEN, "the token is not JSON") from exc
    if not isinstance(parsed, dict):
        raise ApplePayError(ApplePayCode.MALFORMED_TOKEN, "the token is not a JSON object")
    return parsed


def _base64_field(container: Mapping[str, Any], name: str) -> bytes:
    value = container.get(name)
    if not isinstance(value, str) or not value:
        raise ApplePayError(ApplePayCode.MALFORMED_TOKEN, f"the token's {name} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApplePayError(
            ApplePayCode.MALFORMED_TOKEN, f"the token's {name} is not base64"
        ) from exc


def _hex_field(container: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = container.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _HEX.fullmatch(value) or len(value) % 2:
        raise ApplePayError(ApplePayCode.MALFORMED_TOKEN, f"the token's {name} is not hex")
    return value.lower()


def _parse_token(payment_data: str | bytes | Mapping[str, Any]) -> _Token:
    token = _as_object(payment_data)
    version = token.get("version")
    if not isinstance(version, str):
        raise ApplePayError(ApplePayCode.MALFORMED_TOKEN, "the token's version is missing")
    if version != TOKEN_VERSION:
        raise ApplePayError(ApplePayCode.UNSUPPORTED_VERSION, "only EC_v1 tokens are accepted")
    header = token.get("header")
    if not isinstance(header, Mapping):
        raise ApplePayError(ApplePayCode.MALFORMED_TOKEN, "the token's header is missing")
    parsed = _Token(
        data=_base64_field(token, "data"),
        signature=_base64_field(token, "signature"),
        ephemeral_public_key=_base64_field(header, "ephemeralPublicKey"),
        public_key_hash=_base64_field(header, "publicKeyHash"),
        transaction_id=_hex_field(header, "transactionId", required=True) or "",
        application_data=_hex_field(header, "applicationData", required=False),
    )
    if len(parsed.data) <= _GCM_TAG_SIZE:
        raise ApplePayError(ApplePayCode.MALFORMED_TOKEN, "the token's data is too short")
    if len(parsed.public_key_hash) != 32:
        raise ApplePayError(
            ApplePayCode.MALFORMED_TOKEN, "the token's publicKeyHash is not SHA-256"
        )
    return parsed


# --- signature ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Signature:
    """What the detached CMS SignedData says, ready for cryptography to check."""

    leaf: x509.Certificate
    certificates: tuple[x509.Certificate, ...]
    signed_attributes: bytes
    signature: bytes
    message_digest: bytes
    signing_time: datetime


def _bad_signature(message: str) -> ApplePayError:
    return ApplePayError(ApplePayCode.BAD_SIGNATURE, message)


def _untrusted(message: str) -> ApplePayError:
    return ApplePayError(ApplePayCode.UNTRUSTED_CERTIFICATE, message)


def _single_attribute(signer: cms.SignerInfo, name: str) -> Any:
    found = [a for a in signer["signed_attrs"] if a["type"].native == name]
    if len(found) != 1 or len(found[0]["values"]) != 1:
        raise _bad_signature(f"the signature needs exactly one {name} attribute")
    return found[0]["values"][0].native


def _signer_certificate(
    signer: cms.SignerInfo, certificates: list[Any]
) -> Any:  # asn1crypto x509.Certificate
    sid = signer["sid"]
    for certificate in certificates:
        if sid.name == "issuer_and_serial_number":
            chosen = sid.chosen
            if (
                certificate.issuer == chosen["issuer"]
                and certificate.serial_number == chosen["serial_number"].native
            ):
                return certificate
        elif certificate.key_identifier == sid.chosen.native:
            return certificate
    raise _untrusted("the signature does not carry its signing certificate")


def _read_signature(blob: bytes) -> _Signature:
    """Parse the CMS SignedData; ApplePayError(bad_signature) when it is not usable."""
    try:
        return _read_signed_data(blob)
    except ApplePayError:
        raise
    except Exception as exc:  # asn1crypto raises assorted errors on hostile input
        raise _bad_signature("the signature is not a readable CMS SignedData") from exc


def _read_signed_data(blob: bytes) -> _Signature:
    content_info = cms.ContentInfo.load(blob, strict=True)
    if content_info["content_type"].native != "signed_data":
        raise _bad_signature("the signature is not a CMS SignedData")
    signed_data = content_info["content"]
    if signed_data["encap_content_info"]["content"].native is not None:
        raise _bad_signature("the signature is not detached")
    signers = signed_data["signer_infos"]
    if len(signers) != 1:
        raise _bad_signature("the signature must have exactly one signer")
    signer = signers[0]
    if signer["digest_algorithm"]["algorithm"].native != "sha256":
        raise _bad_signature("the signature's digest is not SHA-256")
    if signer["signature_algorithm"]["algorithm"].native not in ("sha256_ecdsa", "ecdsa"):
        raise _bad_signature("the signature is not ECDSA with SHA-256")
    if not signer["signed_attrs"]:
        raise _bad_signature("the signature has no signed attributes")
    if _single_attribute(signer, "content_type") != "data":
        raise _bad_signature("the signed content type is not data")
    signing_time = _single_attribute(signer, "signing_time")
    message_digest = _single_attribute(signer, "message_digest")
    if not isinstance(signing_time, datetime) or not isinstance(message_digest, bytes):
        raise _bad_signature("the signing time or message digest is not readable")
    carried = [c.chosen for c in signed_data["certificates"] or () if c.name == "certificate"]
    leaf = _signer_certificate(signer, carried)
    return _Signature(
        leaf=x509.load_der_x509_certificate(leaf.dump()),
        certificates=tuple(x509.load_der_x509_certificate(c.dump()) for c in carried),
        # RFC 5652 5.4: the signature covers the attributes' DER with the SET OF tag,
        # not the [0] IMPLICIT tag they carry inside SignerInfo.
        signed_attributes=signer["signed_attrs"].untag().dump(),
        signature=signer["signature"].native,
        message_digest=message_digest,
        signing_time=signing_time.astimezone(UTC),
    )


def _has_extension(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> bool:
    try:
        certificate.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return False
    return True


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def _intermediate_for(signature: _Signature, root: x509.Certificate) -> x509.Certificate:
    """The chain leaf -> intermediate -> root, checked; returns the intermediate."""
    if not _has_extension(signature.leaf, LEAF_MARKER_OID):
        raise _untrusted("the signing certificate is not an Apple Pay signing certificate")
    for candidate in signature.certificates:
        if candidate == signature.leaf or not _has_extension(candidate, INTERMEDIATE_MARKER_OID):
            continue
        if _issued_by(signature.leaf, candidate):
            break
    else:
        raise _untrusted("the signing certificate is not issued by an Apple Pay intermediate")
    if not _is_ca(candidate):
        raise _untrusted("the intermediate certificate is not a CA")
    if not _issued_by(candidate, root):
        raise _untrusted("the intermediate certificate is not issued by the trusted root")
    return candidate


def _check_signature(signature: _Signature, content: bytes) -> None:
    digest = hashlib.sha256(content).digest()
    if not hmac.compare_digest(digest, signature.message_digest):
        raise _bad_signature("the signature does not cover this token's contents")
    public_key = signature.leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise _untrusted("the signing certificate's key is not an EC key")
    try:
        public_key.verify(
            signature.signature, signature.signed_attributes, ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature as exc:
        raise _bad_signature("the signature does not verify") from exc


def _check_validity(certificates: Iterable[x509.Certificate], moment: datetime) -> None:
    for certificate in certificates:
        if not certificate.not_valid_before_utc <= moment <= certificate.not_valid_after_utc:
            raise _untrusted("a certificate of the signature was not valid at the signing time")


def _verify_signature(token: _Token, root: x509.Certificate) -> datetime:
    """Check the token's CMS signature and chain to ``root``; returns the signing time."""
    signature = _read_signature(token.signature)
    intermediate = _intermediate_for(signature, root)
    _check_signature(signature, token.signed_content())
    _check_validity((signature.leaf, intermediate, root), signature.signing_time)
    return signature.signing_time


# --- decryption ---------------------------------------------------------------------------


def symmetric_key(merchant: ApplePayMerchant, ephemeral_public_key: bytes) -> bytes:
    """The AES-256 key: ECDH with the ephemeral key, then the SP 800-56A concat KDF."""
    try:
        ephemeral = serialization.load_der_public_key(ephemeral_public_key)
    except (ValueError, TypeError) as exc:
        raise ApplePayError(
            ApplePayCode.MALFORMED_TOKEN, "the ephemeral key is not readable"
        ) from exc
    if not isinstance(ephemeral, ec.EllipticCurvePublicKey) or not isinstance(
        ephemeral.curve, ec.SECP256R1
    ):
        raise ApplePayError(ApplePayCode.MALFORMED_TOKEN, "the ephemeral key is not a P-256 key")
    shared_secret = merchant.payment_key.exchange(ec.ECDH(), ephemeral)
    kdf = ConcatKDFHash(
        algorithm=hashes.SHA256(),
        length=32,
        otherinfo=_KDF_ALGORITHM + _KDF_PARTY_U + merchant.merchant_id_hash,
    )
    return kdf.derive(shared_secret)


def _decrypt_data(merchant: ApplePayMerchant, token: _Token) -> bytes:
    key = symmetric_key(merchant, token.ephemeral_public_key)
    try:
        return AESGCM(key).decrypt(_GCM_IV, token.data, None)
    except (InvalidTag, ValueError) as exc:
        raise ApplePayError(
            ApplePayCode.DECRYPTION_FAILED, "the payment data does not decrypt with our key"
        ) from exc


@dataclass(frozen=True, slots=True)
class ApplePayPayment:
    """Decrypted payment data of a verified token; card data is kept out of ``repr``.

    ``transaction_amount`` is in minor units of ``currency_code`` (ISO 4217 numeric).
    ``application_data`` is the token header's hex hash, to compare with the request's.
    """

    transaction_id: str
    signed_at: datetime
    application_primary_account_number: str = field(repr=False)
    application_expiration_date: str
    currency_code: str
    transaction_amount: int
    device_manufacturer_identifier: str
    payment_data_type: str
    online_payment_cryptogram: str | None = field(repr=False)
    eci_indicator: str | None
    emv_data: str | None = field(repr=False)
    cardholder_name: str | None = field(repr=False)
    application_data: str | None


def _unreadable(message: str) -> ApplePayError:
    return ApplePayError(ApplePayCode.DECRYPTION_FAILED, message)


def _text(data: Mapping[str, Any], name: str, pattern: str | None = None) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise _unreadable(f"the payment data's {name} is missing")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise _unreadable(f"the payment data's {name} is not in the expected format")
    return value


def _optional_text(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise _unreadable(f"the payment data's {name} is not a string")
    return value


def _read_payment(plaintext: bytes, token: _Token, signed_at: datetime) -> ApplePayPayment:
    try:
        data = json.loads(plaintext)
    except ValueError as exc:
        raise _unreadable("the decrypted payment data is not JSON") from exc
    if not isinstance(data, dict):
        raise _unreadable("the decrypted payment data is not a JSON object")
    amount = data.get("transactionAmount")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        raise _unreadable("the payment data's transactionAmount is not a whole amount")
    details = data.get("paymentData")
    if not isinstance(details, dict):
        raise _unreadable("the payment data's paymentData is missing")
    data_type = _text(data, "paymentDataType")
    if data_type == "3DSecure":
        _text(details, "onlinePaymentCryptogram")
    elif data_type == "EMV":
        _text(details, "emvData")
    else:
        raise _unreadable("the payment data's paymentDataType is neither 3DSecure nor EMV")
    return ApplePayPayment(
        transaction_id=token.transaction_id,
        signed_at=signed_at,
        application_primary_account_number=_text(data, "applicationPrimaryAccountNumber"),
        application_expiration_date=_text(data, "applicationExpirationDate", r"[0-9]{6}"),
        currency_code=_text(data, "currencyCode", r"[0-9]{3}"),
        transaction_amount=amount,
        device_manufacturer_identifier=_text(data, "deviceManufacturerIdentifier"),
        payment_data_type=data_type,
        online_payment_cryptogram=_optional_text(details, "onlinePaymentCryptogram"),
        eci_indicator=_optional_text(details, "eciIndicator"),
        emv_data=_optional_text(details, "emvData"),
        cardholder_name=_optional_text(data, "cardholderName"),
        application_data=token.application_data,
    )


class ApplePayDecrypter:
    """Verifies and decrypts EC_v1 payment tokens for one merchant.

    ``root`` is the certificate the signature must chain to (``apple_root_ca_g3()`` in
    production). ``clock`` returns a timezone-aware ``datetime``. Without a ``replay_guard``
    an ``InMemoryReplayGuard`` on the same clock and window is used, which only protects
    a single process.
    """

    def __init__(
        self,
        merchant: ApplePayMerchant,
        *,
        root: x509.Certificate,
        clock: Clock = utc_now,
        signing_window: timedelta = DEFAULT_SIGNING_WINDOW,
        replay_guard: ReplayGuard | None = None,
    ) -> None:
        self.merchant = merchant
        self._root = root
        self._clock = clock
        self._window = signing_window
        if replay_guard is None:
            replay_guard = InMemoryReplayGuard(signing_window, clock)
        self._replay_guard = replay_guard

    async def decrypt(self, payment_data: str | bytes | Mapping[str, Any]) -> ApplePayPayment:
        """Verify ``payment_data`` (the token's JSON or its parsed object) and decrypt it."""
        token = _parse_token(payment_data)
        if not hmac.compare_digest(token.public_key_hash, self.merchant.public_key_hash):
            raise ApplePayError(
                ApplePayCode.WRONG_MERCHANT,
                "the token is for another merchant's payment processing certificate",
            )
        signed_at = _verify_signature(token, self._root)
        self._check_signing_time(signed_at)
        payment = _read_payment(_decrypt_data(self.merchant, token), token, signed_at)
        if not await self._replay_guard.remember(token.transaction_id, signed_at):
            raise ApplePayError(ApplePayCode.REPLAYED_TOKEN, "this token was already accepted")
        return payment

    def _check_signing_time(self, signed_at: datetime) -> None:
        now = _aware(self._clock())
        if abs(now - signed_at) > self._window:
            raise ApplePayError(
                ApplePayCode.SIGNING_TIME_OUT_OF_WINDOW,
                f"the token was signed at {signed_at.isoformat()}, more than "
                f"{int(self._window.total_seconds())} s from now",
            )


# --- merchant validation ------------------------------------------------------------------


def _host_pattern(host: str) -> re.Pattern[str]:
    parts = (re.escape(part) for part in host.lower().split("*"))
    return re.compile("[a-z0-9]+".join(parts))


def check_validation_url(validation_url: str, allowed_hosts: Iterable[str]) -> URL:
    """The parsed URL when it is ``https``, without credentials, on an allowed host."""
    try:
        url = URL(validation_url)
    except (ValueError, TypeError) as exc:
        raise ApplePayError(ApplePayCode.VALIDATION_URL_REFUSED, "the URL is not valid") from exc
    if url.scheme != "https" or not url.is_absolute():
        raise ApplePayError(ApplePayCode.VALIDATION_URL_REFUSED, "the URL must be https")
    if url.user is not None or url.password is not None:
        raise ApplePayError(
            ApplePayCode.VALIDATION_URL_REFUSED, "the URL must not carry credentials"
        )
    host = (url.raw_host or "").lower()
    if not any(_host_pattern(allowed).fullmatch(host) for allowed in allowed_hosts):
        raise ApplePayError(
            ApplePayCode.VALIDATION_URL_REFUSED, f"{host!r} is not an Apple Pay validation host"
        )
    return url


def identity_ssl_context(
    merchant: ApplePayMerchant, server_ca_pem: bytes | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ client context presenting the merchant identity certificate.

    The server is checked against ``server_ca_pem`` when given, else the system's roots.
    """
    context = ssl.create_default_context(
        cadata=server_ca_pem.decode("ascii") if server_ca_pem is not None else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl loads client credentials from files only: they are written for the moment of
    # loading to a private temporary folder, the key encrypted under a one-time password.
    password = secrets.token_bytes(32)
    key_pem = merchant.identity_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    chain_pem = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in merchant.identity_certificates
    )
    with tempfile.TemporaryDirectory(prefix="fynlo-applepay-") as folder:
        chain_path, key_path = Path(folder, "identity.pem"), Path(folder, "identity.key")
        chain_path.write_bytes(chain_pem)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(chain_path, key_path, password=password)
    return context


class MerchantValidator:
    """Starts Apple Pay merchant sessions for one merchant (``onvalidatemerchant``).

    ``allowed_hosts`` are exact host names or patterns where ``*`` matches one run of
    letters and digits; ``server_ca_pem`` replaces the system's roots for the server.
    """

    def __init__(
        self,
        merchant: ApplePayMerchant,
        *,
        allowed_hosts: Iterable[str] = APPLE_PAY_GATEWAY_HOSTS,
        server_ca_pem: bytes | None = None,
        timeout: float = DEFAULT_VALIDATION_TIMEOUT,
    ) -> None:
        self.merchant = merchant
        self._allowed_hosts = tuple(allowed_hosts)
        self._ssl = identity_ssl_context(merchant, server_ca_pem)
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def start_session(self, validation_url: str) -> dict[str, Any]:
        """POST the session request to ``validation_url``; returns Apple's session object."""
        url = check_validation_url(validation_url, self._allowed_hosts)
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as http,
                http.post(
                    url,
                    json=self.merchant.session_request(),
                    ssl=self._ssl,
                    allow_redirects=False,
                ) as response,
            ):
                status = response.status
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("Apple Pay merchant validation at %s failed: %r", url.host, exc)
            raise ApplePayError(
                ApplePayCode.MERCHANT_VALIDATION_FAILED,
                f"could not reach Apple Pay at {url.host}: {type(exc).__name__}",
            ) from exc
        return _session_from(status, body, url)


def _session_from(status: int, body: bytes, url: URL) -> dict[str, Any]:
    if status != 200:
        log.warning(
            "Apple Pay merchant validation at %s answered %d: %.300r", url.host, status, body
        )
        raise ApplePayError(
            ApplePayCode.MERCHANT_VALIDATION_FAILED, f"Apple Pay answered HTTP {status}"
        )
    try:
        session = json.loads(body)
    except ValueError as exc:
        raise ApplePayError(
            ApplePayCode.MERCHANT_VALIDATION_FAILED, "Apple Pay's answer is not JSON"
        ) from exc
    if not isinstance(session, dict):
        raise ApplePayError(
            ApplePayCode.MERCHANT_VALIDATION_FAILED, "Apple Pay's answer is not a JSON object"
        )
    return session
