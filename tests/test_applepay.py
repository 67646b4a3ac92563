"""Apple Pay in the cloud: EC_v1 tokens and merchant validation, end to end.

Tokens are built here the way a device does it: an ephemeral P-256 key, ECDH against the
merchant's payment processing certificate, the concatenation KDF, AES-256-GCM, and a
detached CMS signature from a leaf -> intermediate -> root chain made by these tests (the
root is injected into the decrypter in place of Apple Root CA - G3). Merchant validation
talks to a real HTTPS server on 127.0.0.1 that requires a client certificate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from asn1crypto import cms
from asn1crypto import core as asn1
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud.applepay import (
    APPLE_PAY_GATEWAY_HOSTS,
    INTERMEDIATE_MARKER_OID,
    LEAF_MARKER_OID,
    MERCHANT_ID_OID,
    ApplePayCode,
    ApplePayDecrypter,
    ApplePayError,
    ApplePayMerchant,
    ApplePayPayment,
    InMemoryReplayGuard,
    MerchantValidator,
    apple_root_ca_g3,
    check_validation_url,
    load_merchant,
    merchant_id_hash_from_certificate,
)

T = TypeVar("T")
MERCHANT_ID = "merchant.com.fynlo.test"
OTHER_MERCHANT_ID = "merchant.com.fynlo.other"
T0 = datetime.now(UTC).replace(microsecond=0)
WINDOW = timedelta(minutes=5)
PAN = "4109370251004320"
PAYMENT: dict[str, Any] = {
    "applicationPrimaryAccountNumber": PAN,
    "applicationExpirationDate": "291231",
    "currencyCode": "826",
    "transactionAmount": 4250,
    "deviceManufacturerIdentifier": "040010030273",
    "paymentDataType": "3DSecure",
    "paymentData": {"onlinePaymentCryptogram": "Af9x/QwAA/DjmU65oyc1MAABAAA=", "eciIndicator": "5"},
}


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


# --- certificates --------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def marker(oid: x509.ObjectIdentifier) -> x509.UnrecognizedExtension:
    """Apple's marker extensions carry an ASN.1 NULL; only their presence matters."""
    return x509.UnrecognizedExtension(oid, b"\x05\x00")


def merchant_id_extension(merchant_identifier: str) -> x509.UnrecognizedExtension:
    """What Apple puts in a merchant certificate: UTF8String of the id's SHA-256 in hex."""
    digest = hashlib.sha256(merchant_identifier.encode()).hexdigest().upper()
    return x509.UnrecognizedExtension(MERCHANT_ID_OID, asn1.UTF8String(digest).dump())


def issue(
    name: str,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    extensions: tuple[x509.ExtensionType, ...] = (),
    usage: tuple[x509.ObjectIdentifier, ...] = (),
    ip: str | None = None,
    not_before: datetime = T0 - timedelta(days=1),
    not_after: datetime = T0 + timedelta(days=365),
) -> Issued:
    """A certificate for a fresh P-256 key, self-signed when ``issuer`` is None."""
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not ca,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
    if ip:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return Issued(builder.sign(signer, hashes.SHA256()), key)


@dataclass(frozen=True)
class Chain:
    """The signing chain a device's token carries, and the root the cloud trusts."""

    root: Issued
    intermediate: Issued
    leaf: Issued


def make_chain(
    *,
    leaf_marker: bool = True,
    intermediate_marker: bool = True,
    intermediate_ca: bool = True,
    intermediate_root: Issued | None = None,
    leaf_by_root: bool = False,
    leaf_not_after: datetime = T0 + timedelta(days=365),
) -> Chain:
    """A root -> intermediate -> leaf chain; the options break one link each."""
    root = issue("Test Root CA - G3", ca=True)
    intermediate = issue(
        "Test Application Integration CA - G3",
        intermediate_root or root,
        ca=intermediate_ca,
        extensions=(marker(INTERMEDIATE_MARKER_OID),) if intermediate_marker else (),
    )
    leaf = issue(
        "test-smp-broker-sign",
        root if leaf_by_root else intermediate,
        extensions=(marker(LEAF_MARKER_OID),) if leaf_marker else (),
        not_after=leaf_not_after,
    )
    return Chain(root, intermediate, leaf)


@pytest.fixture(scope="module")
def chain() -> Chain:
    return make_chain()


@dataclass(frozen=True)
class MerchantKit:
    """A merchant as configured in the cloud, and the CA that issued its identity."""

    merchant: ApplePayMerchant
    payment: Issued
    identity: Issued
    identity_ca: Issued


def make_merchant(
    merchant_identifier: str = MERCHANT_ID, identity_ca: Issued | None = None
) -> MerchantKit:
    apple_wwdr = issue("Test Worldwide Developer Relations CA", ca=True)
    payment = issue(
        f"Apple Pay Payment Processing:{merchant_identifier}",
        apple_wwdr,
        extensions=(merchant_id_extension(merchant_identifier),),
    )
    identity_ca = identity_ca or issue("Test Merchant Identity CA", ca=True)
    identity = issue(
        f"Merchant ID: {merchant_identifier}",
        identity_ca,
        extensions=(merchant_id_extension(merchant_identifier),),
        usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
    )
    merchant = load_merchant(
        merchant_identifier=merchant_identifier,
        display_name="Fynlo Test Bistro",
        domain="bistro.fynlo.test",
        payment_certificate_pem=pem(payment.certificate),
        payment_key_pem=key_pem(payment.key),
        identity_certificate_pem=pem(identity.certificate),
        identity_key_pem=key_pem(identity.key),
    )
    return MerchantKit(merchant, payment, identity, identity_ca)


@pytest.fixture(scope="module")
def kit() -> MerchantKit:
    return make_merchant()


# --- tokens as a device makes them ---------------------------------------------------------


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def encrypt_for(
    certificate: x509.Certificate, merchant_identifier: str, plaintext: bytes
) -> tuple[bytes, bytes]:
    """(ephemeral public key DER, ciphertext || tag) for the certificate's key."""
    ephemeral = new_key()
    merchant_key = certificate.public_key()
    assert isinstance(merchant_key, ec.EllipticCurvePublicKey)
    shared = ephemeral.exchange(ec.ECDH(), merchant_key)
    party_v = hashlib.sha256(merchant_identifier.encode()).digest()
    kdf = ConcatKDFHash(hashes.SHA256(), 32, otherinfo=b"\x0did-aes256-GCM" + b"Apple" + party_v)
    data = AESGCM(kdf.derive(shared)).encrypt(bytes(16), plaintext, None)
    public = ephemeral.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public, data


def asn1_certificate(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))


def sign_detached(
    content: bytes,
    chain: Chain,
    signing_time: datetime | None,
    *,
    digest: bytes | None = None,
) -> bytes:
    """A detached CMS SignedData over ``content`` by the chain's leaf, as Apple's broker."""
    attributes = [
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute(
            {"type": "message_digest", "values": [digest or hashlib.sha256(content).digest()]}
        ),
    ]
    if signing_time is not None:
        attributes.insert(
            1,
            cms.CMSAttribute(
                {"type": "signing_time", "values": [cms.Time({"utc_time": signing_time})]}
            ),
        )
    signed_attrs = cms.CMSAttributes(attributes)
    signature = chain.leaf.key.sign(signed_attrs.dump(), ec.ECDSA(hashes.SHA256()))
    leaf = asn1_certificate(chain.leaf.certificate)
    signer = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                        {"issuer": leaf.issuer, "serial_number": leaf.serial_number}
                    )
                }
            ),
            "digest_algorithm": {"algorithm": "sha256"},
            "signed_attrs": signed_attrs,
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": signature,
        }
    )
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {"content_type": "data"},
            "certificates": [leaf, asn1_certificate(chain.intermediate.certificate)],
            "signer_infos": [signer],
        }
    )
    encoded: bytes = cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()
    return encoded


Signer = Callable[[bytes], bytes]


def device_token(
    kit: MerchantKit,
    chain: Chain,
    *,
    signing_time: datetime | None = T0,
    payment: dict[str, Any] | bytes = PAYMENT,
    merchant_identifier: str = MERCHANT_ID,
    transaction_id: str | None = None,
    application_data: str | None = None,
    signer: Signer | None = None,
) -> dict[str, Any]:
    """The ``paymentData`` a device sends for ``kit``'s merchant."""
    plaintext = payment if isinstance(payment, bytes) else json.dumps(payment).encode()
    ephemeral, data = encrypt_for(kit.payment.certificate, merchant_identifier, plaintext)
    transaction_id = transaction_id or secrets.token_hex(32)
    content = ephemeral + data + bytes.fromhex(transaction_id)
    if application_data is not None:
        content += bytes.fromhex(application_data)
    signature = signer(content) if signer else sign_detached(content, chain, signing_time)
    header = {
        "ephemeralPublicKey": b64(ephemeral),
        "publicKeyHash": b64(hashlib.sha256(spki(kit.payment.certificate)).digest()),
        "transactionId": transaction_id,
    }
    if application_data is not None:
        header["applicationData"] = application_data
    return {"version": "EC_v1", "data": b64(data), "signature": b64(signature), "header": header}


def decrypter(
    kit: MerchantKit,
    chain: Chain,
    *,
    now: datetime = T0 + timedelta(seconds=20),
    guard: InMemoryReplayGuard | None = None,
) -> ApplePayDecrypter:
    return ApplePayDecrypter(
        kit.merchant,
        root=chain.root.certificate,
        clock=lambda: now,
        signing_window=WINDOW,
        replay_guard=guard,
    )


def refusal(decrypter: ApplePayDecrypter, token: Any) -> ApplePayError:
    with pytest.raises(ApplePayError) as caught:
        run(decrypter.decrypt(token))
    assert PAN not in str(caught.value)
    return caught.value


def flip(value: str, index: int) -> str:
    """The base64 field with one byte of its decoded value flipped."""
    raw = bytearray(base64.b64decode(value))
    raw[index] ^= 0x01
    return b64(bytes(raw))


# --- decrypting good tokens ----------------------------------------------------------------


def test_good_token_decrypts_to_the_exact_payment_data(kit: MerchantKit, chain: Chain) -> None:
    token = device_token(kit, chain, transaction_id="00ABCDEF" * 8)
    payment = run(decrypter(kit, chain).decrypt(json.dumps(token)))
    assert payment == ApplePayPayment(
        transaction_id="00abcdef" * 8,
        signed_at=T0,
        application_primary_account_number=PAN,
        application_expiration_date="291231",
        currency_code="826",
        transaction_amount=4250,
        device_manufacturer_identifier="040010030273",
        payment_data_type="3DSecure",
        online_payment_cryptogram="Af9x/QwAA/DjmU65oyc1MAABAAA=",
        eci_indicator="5",
        emv_data=None,
        cardholder_name=None,
        application_data=None,
    )
    assert PAN not in repr(payment) and "Af9x" not in repr(payment)


def test_token_as_bytes_or_parsed_object_is_accepted(kit: MerchantKit, chain: Chain) -> None:
    first, second = device_token(kit, chain), device_token(kit, chain)
    assert run(decrypter(kit, chain).decrypt(json.dumps(first).encode())).transaction_amount
    assert run(decrypter(kit, chain).decrypt(second)).currency_code == "826"


def test_application_data_is_signed_and_returned(kit: MerchantKit, chain: Chain) -> None:
    order_hash = hashlib.sha256(b"order 1042").hexdigest()
    token = device_token(kit, chain, application_data=order_hash)
    assert run(decrypter(kit, chain).decrypt(token)).application_data == order_hash

    token["header"]["applicationData"] = hashlib.sha256(b"order 1043").hexdigest()
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.BAD_SIGNATURE


def test_token_signed_by_openssl_cms_builder_verifies(kit: MerchantKit, chain: Chain) -> None:
    """An independent CMS producer (OpenSSL, real signing time): re-tagging must agree."""

    def openssl_signer(content: bytes) -> bytes:
        return (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(content)
            .add_signer(chain.leaf.certificate, chain.leaf.key, hashes.SHA256())
            .add_certificate(chain.intermediate.certificate)
            .sign(
                serialization.Encoding.DER,
                [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
            )
        )

    token = device_token(kit, chain, signer=openssl_signer)
    payment = run(ApplePayDecrypter(kit.merchant, root=chain.root.certificate).decrypt(token))
    assert payment.application_primary_account_number == PAN
    assert abs(datetime.now(UTC) - payment.signed_at) < timedelta(minutes=1)


def test_emv_payment_data_is_read(kit: MerchantKit, chain: Chain) -> None:
    emv = {
        **PAYMENT,
        "paymentDataType": "EMV",
        "cardholderName": "A Diner",
        "paymentData": {"emvData": "nwIGAAAAAAEAnwM="},
    }
    payment = run(decrypter(kit, chain).decrypt(device_token(kit, chain, payment=emv)))
    assert (payment.payment_data_type, payment.emv_data) == ("EMV", "nwIGAAAAAAEAnwM=")
    assert (payment.cardholder_name, payment.online_payment_cryptogram) == ("A Diner", None)


# --- tampering -----------------------------------------------------------------------------


def test_flipped_byte_in_data_is_refused(kit: MerchantKit, chain: Chain) -> None:
    token = device_token(kit, chain)
    token["data"] = flip(token["data"], 5)
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.BAD_SIGNATURE


def test_flipped_byte_in_ephemeral_key_is_refused(kit: MerchantKit, chain: Chain) -> None:
    token = device_token(kit, chain)
    token["header"]["ephemeralPublicKey"] = flip(token["header"]["ephemeralPublicKey"], -3)
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.BAD_SIGNATURE


def test_flipped_byte_in_transaction_id_is_refused(kit: MerchantKit, chain: Chain) -> None:
    token = device_token(kit, chain, transaction_id="11" * 32)
    token["header"]["transactionId"] = "11" * 31 + "10"
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.BAD_SIGNATURE


def test_flipped_byte_in_signature_value_is_refused(kit: MerchantKit, chain: Chain) -> None:
    token = device_token(kit, chain)
    token["signature"] = flip(token["signature"], -1)  # the ECDSA signature's last byte
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.BAD_SIGNATURE


def test_signature_that_is_not_cms_is_refused(kit: MerchantKit, chain: Chain) -> None:
    token = device_token(kit, chain)
    token["signature"] = b64(secrets.token_bytes(200))
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.BAD_SIGNATURE


def test_signature_over_another_content_is_refused(kit: MerchantKit, chain: Chain) -> None:
    """A valid signature whose messageDigest names other content does not cover the token."""
    token = device_token(kit, chain, signer=lambda content: sign_detached(b"other", chain, T0))
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.BAD_SIGNATURE


def test_signature_without_signing_time_is_refused(kit: MerchantKit, chain: Chain) -> None:
    token = device_token(kit, chain, signing_time=None)
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.BAD_SIGNATURE


# --- merchant ------------------------------------------------------------------------------


def test_token_for_another_merchant_is_refused(kit: MerchantKit, chain: Chain) -> None:
    other = make_merchant(OTHER_MERCHANT_ID)
    token = device_token(other, chain, merchant_identifier=OTHER_MERCHANT_ID)
    assert run(decrypter(other, chain).decrypt(token)).transaction_amount == 4250
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.WRONG_MERCHANT


def test_our_key_hash_on_a_token_for_another_key_cannot_decrypt(
    kit: MerchantKit, chain: Chain
) -> None:
    """publicKeyHash is not signed: claiming ours still leaves a token we cannot open."""
    other = make_merchant(OTHER_MERCHANT_ID)
    token = device_token(other, chain, merchant_identifier=OTHER_MERCHANT_ID)
    token["header"]["publicKeyHash"] = b64(kit.merchant.public_key_hash)
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.DECRYPTION_FAILED


def test_token_derived_for_another_merchant_id_cannot_decrypt(
    kit: MerchantKit, chain: Chain
) -> None:
    token = device_token(kit, chain, merchant_identifier=OTHER_MERCHANT_ID)
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.DECRYPTION_FAILED


# --- signing time and replays --------------------------------------------------------------


@pytest.mark.parametrize(
    ("clock_offset", "accepted"),
    [
        (timedelta(0), True),
        (WINDOW, True),
        (-WINDOW, True),
        (WINDOW + timedelta(seconds=1), False),
        (-WINDOW - timedelta(seconds=1), False),
        (timedelta(hours=3), False),
    ],
)
def test_signing_time_must_be_within_the_window(
    kit: MerchantKit, chain: Chain, clock_offset: timedelta, accepted: bool
) -> None:
    token = device_token(kit, chain, signing_time=T0)
    verifier = decrypter(kit, chain, now=T0 + clock_offset)
    if accepted:
        assert run(verifier.decrypt(token)).signed_at == T0
    else:
        assert refusal(verifier, token).code is ApplePayCode.SIGNING_TIME_OUT_OF_WINDOW


def test_replay_is_refused_and_another_token_still_accepted(kit: MerchantKit, chain: Chain) -> None:
    verifier = decrypter(kit, chain)
    token = device_token(kit, chain)
    run(verifier.decrypt(token))
    assert refusal(verifier, token).code is ApplePayCode.REPLAYED_TOKEN
    upper = {**token, "header": {**token["header"]}}
    upper["header"]["transactionId"] = token["header"]["transactionId"].upper()
    assert refusal(verifier, upper).code is ApplePayCode.REPLAYED_TOKEN
    assert run(verifier.decrypt(device_token(kit, chain))).transaction_amount == 4250


def test_a_refused_token_does_not_use_up_its_transaction_id(kit: MerchantKit, chain: Chain) -> None:
    verifier = decrypter(kit, chain)
    token = device_token(kit, chain)
    tampered = {**token, "data": flip(token["data"], 0)}
    assert refusal(verifier, tampered).code is ApplePayCode.BAD_SIGNATURE
    assert run(verifier.decrypt(token)).transaction_id == token["header"]["transactionId"]


def test_replay_after_the_window_is_refused_by_time(kit: MerchantKit, chain: Chain) -> None:
    """The guard may forget an id once the window is over: the time check refuses it."""
    now = [T0]
    guard = InMemoryReplayGuard(WINDOW, clock=lambda: now[0])
    verifier = ApplePayDecrypter(
        kit.merchant, root=chain.root.certificate, clock=lambda: now[0], replay_guard=guard
    )
    token = device_token(kit, chain, signing_time=T0)
    run(verifier.decrypt(token))
    now[0] = T0 + WINDOW + timedelta(seconds=1)
    run(verifier.decrypt(device_token(kit, chain, signing_time=now[0])))
    assert len(guard) == 1  # the first id was forgotten
    assert refusal(verifier, token).code is ApplePayCode.SIGNING_TIME_OUT_OF_WINDOW


def test_in_memory_guard_remembers_for_the_window_then_forgets() -> None:
    now = [T0]
    guard = InMemoryReplayGuard(WINDOW, clock=lambda: now[0])
    assert run(guard.remember("aa", T0)) is True
    assert run(guard.remember("aa", T0)) is False
    assert run(guard.remember("bb", T0 + timedelta(minutes=3))) is True
    now[0] = T0 + WINDOW
    assert run(guard.remember("aa", T0)) is False  # still inside the window
    now[0] = T0 + WINDOW + timedelta(seconds=1)
    assert run(guard.remember("bb", T0 + timedelta(minutes=3))) is False
    assert len(guard) == 1
    assert run(guard.remember("aa", T0)) is True


# --- certificate chain ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"leaf_marker": False}, id="leaf-without-marker"),
        pytest.param({"intermediate_marker": False}, id="intermediate-without-marker"),
        pytest.param({"intermediate_ca": False}, id="intermediate-not-a-ca"),
        pytest.param({"leaf_by_root": True}, id="leaf-not-issued-by-intermediate"),
        pytest.param({"leaf_not_after": T0 - timedelta(seconds=1)}, id="leaf-expired-at-signing"),
    ],
)
def test_broken_chain_is_refused(kit: MerchantKit, broken: dict[str, Any]) -> None:
    bad = make_chain(**broken)
    token = device_token(kit, bad)
    assert refusal(decrypter(kit, bad), token).code is ApplePayCode.UNTRUSTED_CERTIFICATE


def test_chain_to_an_untrusted_root_is_refused(kit: MerchantKit, chain: Chain) -> None:
    rogue = make_chain(intermediate_root=issue("Rogue Root CA", ca=True))
    token = device_token(kit, rogue)
    trusting_ours = replace(rogue, root=chain.root)
    assert refusal(decrypter(kit, trusting_ours), token).code is (
        ApplePayCode.UNTRUSTED_CERTIFICATE
    )


def test_production_root_is_apple_root_ca_g3(kit: MerchantKit, chain: Chain) -> None:
    root = apple_root_ca_g3()
    assert root.fingerprint(hashes.SHA256()).hex().upper() == (
        "63343ABFB89A6A03EBB57E9B3F5FA7BE7C4F5C756F3017B3A8C488C3653E9179"
    )
    token = device_token(kit, chain)
    verifier = ApplePayDecrypter(kit.merchant, root=root, clock=lambda: T0)
    assert refusal(verifier, token).code is ApplePayCode.UNTRUSTED_CERTIFICATE


# --- malformed tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["RSA_v1", "EC_v2", "ec_v1"])
def test_unsupported_version_is_refused(kit: MerchantKit, chain: Chain, version: str) -> None:
    token = {**device_token(kit, chain), "version": version}
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.UNSUPPORTED_VERSION


def _without(token: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in token.items() if k != name}


def _header(token: dict[str, Any], **changes: Any) -> dict[str, Any]:
    header = {**token["header"], **changes}
    return {**token, "header": {k: v for k, v in header.items() if v is not None}}


MALFORMED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "not-json": lambda t: "{not json",
    "json-array": lambda t: json.dumps([t]),
    "no-version": lambda t: _without(t, "version"),
    "version-not-text": lambda t: {**t, "version": 1},
    "no-header": lambda t: _without(t, "header"),
    "header-not-object": lambda t: {**t, "header": "EC_v1"},
    "no-data": lambda t: _without(t, "data"),
    "data-not-base64": lambda t: {**t, "data": "*not base64*"},
    "data-too-short": lambda t: {**t, "data": b64(bytes(16))},
    "no-signature": lambda t: _without(t, "signature"),
    "no-ephemeral-key": lambda t: _header(t, ephemeralPublicKey=None),
    "no-transaction-id": lambda t: _header(t, transactionId=None),
    "transaction-id-not-hex": lambda t: _header(t, transactionId="zz" * 32),
    "transaction-id-odd-length": lambda t: _header(t, transactionId="abc"),
    "transaction-id-with-spaces": lambda t: _header(t, transactionId="ab cd"),
    "application-data-not-hex": lambda t: _header(t, applicationData="order-1042"),
    "public-key-hash-not-sha256": lambda t: _header(t, publicKeyHash=b64(b"short")),
}


@pytest.mark.parametrize("mutation", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_token_is_refused(
    kit: MerchantKit, chain: Chain, mutation: Callable[[dict[str, Any]], Any]
) -> None:
    token = mutation(device_token(kit, chain))
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.MALFORMED_TOKEN


@pytest.mark.parametrize(
    "payment",
    [
        b"not json",
        {**PAYMENT, "transactionAmount": "42.50"},
        {**PAYMENT, "transactionAmount": True},
        {**PAYMENT, "currencyCode": "GBP"},
        {**PAYMENT, "paymentDataType": "Magnetic"},
        {**PAYMENT, "paymentData": {"eciIndicator": "5"}},
        _without(PAYMENT, "applicationPrimaryAccountNumber"),
    ],
    ids=[
        "not-json",
        "amount-text",
        "amount-bool",
        "currency-alpha",
        "unknown-type",
        "no-cryptogram",
        "no-pan",
    ],
)
def test_decrypted_data_that_is_not_payment_data_is_refused(
    kit: MerchantKit, chain: Chain, payment: dict[str, Any] | bytes
) -> None:
    token = device_token(kit, chain, payment=payment)
    assert refusal(decrypter(kit, chain), token).code is ApplePayCode.DECRYPTION_FAILED


# --- merchant configuration ----------------------------------------------------------------


def test_merchant_id_hash_is_read_from_the_certificate(kit: MerchantKit) -> None:
    stored = merchant_id_hash_from_certificate(kit.payment.certificate)
    assert stored == hashlib.sha256(MERCHANT_ID.encode()).digest()
    assert kit.merchant.merchant_id_hash == stored


def test_certificate_of_another_merchant_id_is_refused_at_load(kit: MerchantKit) -> None:
    with pytest.raises(ValueError, match="another merchant identifier"):
        load_merchant(
            merchant_identifier=OTHER_MERCHANT_ID,
            display_name="Fynlo Test Bistro",
            domain="bistro.fynlo.test",
            payment_certificate_pem=pem(kit.payment.certificate),
            payment_key_pem=key_pem(kit.payment.key),
            identity_certificate_pem=pem(kit.identity.certificate),
            identity_key_pem=key_pem(kit.identity.key),
        )


def test_certificate_without_the_extension_uses_the_given_identifier(chain: Chain) -> None:
    payment = issue("Payment Processing without merchant id", issue("CA", ca=True))
    identity = issue("Identity", issue("Identity CA", ca=True))
    merchant = load_merchant(
        merchant_identifier=MERCHANT_ID,
        display_name="Fynlo Test Bistro",
        domain="bistro.fynlo.test",
        payment_certificate_pem=pem(payment.certificate),
        payment_key_pem=key_pem(payment.key),
        identity_certificate_pem=pem(identity.certificate),
        identity_key_pem=key_pem(identity.key),
    )
    assert merchant_id_hash_from_certificate(payment.certificate) is None
    kit = MerchantKit(merchant, payment, identity, identity)
    assert run(decrypter(kit, chain).decrypt(device_token(kit, chain))).transaction_amount


def test_mismatched_keys_are_refused_at_load(kit: MerchantKit) -> None:
    with pytest.raises(ValueError, match="payment processing key does not match"):
        replace(kit.merchant, payment_key=new_key())
    with pytest.raises(ValueError, match="identity key does not match"):
        replace(kit.merchant, identity_key=new_key())


def test_merchant_repr_shows_no_keys(kit: MerchantKit) -> None:
    assert "key" not in repr(kit.merchant)


# --- merchant validation -------------------------------------------------------------------


SESSION = {
    "epochTimestamp": 1700000000000,
    "expiresAt": 1700003600000,
    "merchantSessionIdentifier": "SSH2B5A1E5B7C6D4E8F9A0B1C2D3E4F5A6B7C8D9E0F",
    "nonce": "7f3a1c2e",
    "merchantIdentifier": "4D6F7265",
    "domainName": "bistro.fynlo.test",
    "displayName": "Fynlo Test Bistro",
    "signature": "308006092a864886f70d010702a0803080020101",
}
START_SESSION = "/paymentservices/startSession"


@dataclass
class Gateway:
    """A local stand-in for Apple's gateway: its URL and the requests it answered."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Tls:
    """The gateway's CA and server certificate; the server trusts only ``client_ca``."""

    server_ca: Issued
    server: Issued
    client_ca: Issued
    folder: Path

    def server_context(self) -> ssl.SSLContext:
        chain, key = self.folder / "server.pem", self.folder / "server.key"
        chain.write_bytes(pem(self.server.certificate))
        key.write_bytes(key_pem(self.server.key))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(chain, key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=pem(self.client_ca.certificate).decode())
        return context


@pytest.fixture
def tls(tmp_path: Path, kit: MerchantKit) -> Tls:
    server_ca = issue("Test Gateway CA", ca=True)
    server = issue("127.0.0.1", server_ca, ip="127.0.0.1", usage=(ExtendedKeyUsageOID.SERVER_AUTH,))
    return Tls(server_ca, server, kit.identity_ca, tmp_path)


@asynccontextmanager
async def gateway(tls: Tls, *, status: int = 200, delay: float = 0.0) -> AsyncIterator[Gateway]:
    """Serve ``START_SESSION`` over TLS, requiring a client certificate from ``client_ca``."""
    served = Gateway(url="")

    async def start_session(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        body = await request.json()
        served.requests.append({"body": body, "peer": peer})
        await asyncio.sleep(delay)
        if status != 200:
            return web.json_response({"statusMessage": "Payment Services Exception"}, status=status)
        return web.json_response(SESSION)

    app = web.Application()
    app.router.add_post(START_SESSION, start_session)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.server_context())
    await site.start()
    served.url = f"https://127.0.0.1:{runner.addresses[0][1]}{START_SESSION}"
    try:
        yield served
    finally:
        await runner.cleanup()


def validator(kit: MerchantKit, tls: Tls, **options: Any) -> MerchantValidator:
    options.setdefault("allowed_hosts", ("127.0.0.1",))
    return MerchantValidator(kit.merchant, server_ca_pem=pem(tls.server_ca.certificate), **options)


def common_name(peer: dict[str, Any]) -> str:
    names = [value for rdn in peer["subject"] for key, value in rdn if key == "commonName"]
    return str(names[0])


def test_merchant_validation_returns_apple_session(kit: MerchantKit, tls: Tls) -> None:
    async def scenario() -> tuple[dict[str, Any], Gateway]:
        async with gateway(tls) as served:
            return await validator(kit, tls).start_session(served.url), served

    session, served = run(scenario())
    assert session == SESSION
    [request] = served.requests
    assert request["body"] == {
        "merchantIdentifier": MERCHANT_ID,
        "displayName": "Fynlo Test Bistro",
        "initiative": "web",
        "initiativeContext": "bistro.fynlo.test",
    }
    assert common_name(request["peer"]) == f"Merchant ID: {MERCHANT_ID}"


@asynccontextmanager
async def counting_listener() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP port that counts the connections it gets."""
    connections: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connections
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://127.0.0.1:{port}/paymentservices/startSession", APPLE_PAY_GATEWAY_HOSTS),
        ("https://127.0.0.1:{port}/paymentservices/startSession", ("localhost",)),
        ("http://127.0.0.1:{port}/paymentservices/startSession", ("127.0.0.1",)),
        ("https://user:pw@127.0.0.1:{port}/paymentservices/startSession", ("127.0.0.1",)),
    ],
    ids=["not-an-apple-host", "not-in-allowlist", "plain-http", "credentials"],
)
def test_refused_validation_url_makes_no_connection(
    kit: MerchantKit, tls: Tls, url: str, allowed: tuple[str, ...]
) -> None:
    async def scenario() -> tuple[ApplePayError, list[int]]:
        async with counting_listener() as (port, connections):
            with pytest.raises(ApplePayError) as caught:
                await validator(kit, tls, allowed_hosts=allowed).start_session(
                    url.format(port=port)
                )
            await asyncio.sleep(0.05)
            return caught.value, connections

    error, connections = run(scenario())
    assert error.code is ApplePayCode.VALIDATION_URL_REFUSED
    assert connections == []


@pytest.mark.parametrize(
    "url",
    [
        "https://apple-pay-gateway.apple.com/paymentservices/paymentSession",
        "https://apple-pay-gateway-cert.apple.com/paymentservices/startSession",
        "https://apple-pay-gateway-nc-pod5.apple.com/paymentservices/startSession",
        "https://APPLE-PAY-GATEWAY-PR-POD1.apple.com:443/paymentservices/startSession",
        "https://cn-apple-pay-gateway-sh-pod2.apple.com/paymentservices/startSession",
        "https://cn-apple-pay-gateway.apple.com/paymentservices/startSession",
    ],
)
def test_apple_gateway_hosts_are_allowed_by_default(url: str) -> None:
    assert check_validation_url(url, APPLE_PAY_GATEWAY_HOSTS).scheme == "https"


@pytest.mark.parametrize(
    "url",
    [
        "https://apple-pay-gateway.apple.com.attacker.test/paymentservices/startSession",
        "https://attacker.test/apple-pay-gateway.apple.com",
        "https://attacker.test#@apple-pay-gateway.apple.com/",
        "https://apple-pay-gateway-nc-pod1.attacker.test/",
        "https://apple-pay-gateway-nc.pod1.apple.com/",
        "https://xapple-pay-gateway.apple.com/",
        "https://apple.com/",
        "http://apple-pay-gateway.apple.com/paymentservices/startSession",
        "apple-pay-gateway.apple.com/paymentservices/startSession",
        "https://user@apple-pay-gateway.apple.com/",
        "",
    ],
)
def test_other_validation_urls_are_refused(url: str) -> None:
    with pytest.raises(ApplePayError) as caught:
        check_validation_url(url, APPLE_PAY_GATEWAY_HOSTS)
    assert caught.value.code is ApplePayCode.VALIDATION_URL_REFUSED


def test_gateway_error_status_is_merchant_validation_failed(kit: MerchantKit, tls: Tls) -> None:
    async def scenario() -> ApplePayError:
        async with gateway(tls, status=500) as served:
            with pytest.raises(ApplePayError) as caught:
                await validator(kit, tls).start_session(served.url)
            assert len(served.requests) == 1
            return caught.value

    error = run(scenario())
    assert error.code is ApplePayCode.MERCHANT_VALIDATION_FAILED
    assert "500" in error.message


def test_gateway_timeout_is_merchant_validation_failed(kit: MerchantKit, tls: Tls) -> None:
    async def scenario() -> ApplePayError:
        async with gateway(tls, delay=1.0) as served:
            with pytest.raises(ApplePayError) as caught:
                await validator(kit, tls, timeout=0.2).start_session(served.url)
            return caught.value

    assert run(scenario()).code is ApplePayCode.MERCHANT_VALIDATION_FAILED


def test_identity_the_gateway_does_not_accept_is_rejected(kit: MerchantKit, tls: Tls) -> None:
    """A merchant whose identity certificate is not from the gateway's CA gets no session."""
    stranger = make_merchant(identity_ca=issue("Unknown Identity CA", ca=True))

    async def scenario() -> tuple[ApplePayError, Gateway]:
        async with gateway(tls) as served:
            with pytest.raises(ApplePayError) as caught:
                await validator(stranger, tls).start_session(served.url)
            return caught.value, served

    error, served = run(scenario())
    assert error.code is ApplePayCode.MERCHANT_VALIDATION_FAILED
    assert served.requests == []


def test_client_without_a_certificate_is_rejected_by_the_gateway(tls: Tls) -> None:
    """The stand-in gateway really requires a client certificate (so the tests above mean it)."""
    context = ssl.create_default_context(cadata=pem(tls.server_ca.certificate).decode())

    async def scenario() -> Gateway:
        async with gateway(tls) as served, aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                async with http.post(served.url, json={}, ssl=context) as response:
                    await response.read()
            return served

    assert run(scenario()).requests == []


def test_gateway_we_do_not_trust_is_refused(kit: MerchantKit, tls: Tls) -> None:
    async def scenario() -> tuple[ApplePayError, Gateway]:
        async with gateway(tls) as served:
            untrusting = MerchantValidator(kit.merchant, allowed_hosts=("127.0.0.1",))
            with pytest.raises(ApplePayError) as caught:
                await untrusting.start_session(served.url)
            return caught.value, served

    error, served = run(scenario())
    assert error.code is ApplePayCode.MERCHANT_VALIDATION_FAILED
    assert served.requests == []


# --- through the product: a tablet asks the edge, the edge asks the cloud ------------------


def test_a_tablet_starts_an_apple_pay_session_through_the_edge_and_the_cloud(
    kit: MerchantKit, tls: Tls, tmp_path: Path, pg_database: str
) -> None:
    """The merchant identity certificate stays in the cloud: the guest's browser gets Apple's
    session through the edge (a tablet's credential) and the cloud (the edge's)."""
    from cloud.applepay import MerchantValidator
    from cloud.payments import PaymentProviders
    from edge.config import CloudSettings

    from .api_harness import running_edge
    from .harness import cloud_config, running_cloud
    from .test_api_orders import code, till_for

    async def scenario() -> None:
        providers = PaymentProviders(applepay=validator(kit, tls))
        async with (
            gateway(tls) as served,
            running_cloud(cloud_config(pg_database), providers) as cloud,
        ):
            site = await cloud.add_site("Harbour")
            node, token = await cloud.add_device(site, "edge")
            settings = CloudSettings(url=cloud.url, token=token)
            async with running_edge(tmp_path, site_id=site, node_id=node, cloud=settings) as edge:
                tablet = await till_for(edge)
                path, who = "/v1/payments/applepay/session", tablet.headers("sam")
                got, answer, _ = await edge.call(
                    "POST", path, who, json={"validation_url": served.url}
                )
                assert got == 200, answer
                assert answer == {"session": SESSION}
                assert served.requests[0]["body"]["merchantIdentifier"] == MERCHANT_ID
                # a validation URL off Apple's gateways is refused without a connection
                elsewhere = "https://example.com/paymentservices/startSession"
                got, refused, _ = await edge.call(
                    "POST", path, who, json={"validation_url": elsewhere}
                )
                assert (got, code(refused)) == (502, "merchant_validation_failed")
                assert refused["error"]["details"]["reason"] == "validation_url_refused"
                assert len(served.requests) == 1
                # a cloud without Apple Pay says so
                providers.applepay = None
                got, refused, _ = await edge.call(
                    "POST", path, who, json={"validation_url": served.url}
                )
                assert (got, code(refused)) == (409, "tender_unavailable")

    run(scenario())
    assert isinstance(validator(kit, tls), MerchantValidator)


def test_the_cloud_reads_its_apple_pay_merchant_from_pem_files(
    kit: MerchantKit, tmp_path: Path
) -> None:
    from cloud.app import applepay_merchant
    from cloud.config import PaymentSettings

    files = {
        "identity.pem": pem(kit.identity.certificate),
        "identity.key": key_pem(kit.identity.key),
        "payment.pem": pem(kit.payment.certificate),
        "payment.key": key_pem(kit.payment.key),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    settings = PaymentSettings(
        bank="off",
        applepay_merchant_id=MERCHANT_ID,
        applepay_display_name="Fynlo Test Bistro",
        applepay_domain="bistro.fynlo.test",
        applepay_identity_certificate=str(tmp_path / "identity.pem"),
        applepay_identity_key=str(tmp_path / "identity.key"),
        applepay_payment_certificate=str(tmp_path / "payment.pem"),
        applepay_payment_key=str(tmp_path / "payment.key"),
    )
    merchant = applepay_merchant(settings)
    assert merchant.public_key_hash == kit.merchant.public_key_hash
    assert merchant.merchant_id_hash == kit.merchant.merchant_id_hash
    with pytest.raises(ValueError, match="Apple Pay needs"):
        PaymentSettings(applepay_merchant_id=MERCHANT_ID)  # no files
