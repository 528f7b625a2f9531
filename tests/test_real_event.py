"""Real data: an event exactly as Stark Bank signed and delivered it (tests/fixtures, copied
byte for byte from the SDK's published tests), with its Digital-Signature and Stark Bank's
public key. The verifier must accept it as is and refuse any change to it.

Stark Bank's signature is high-S; the verifier (pure-Python ecdsa, as the SDK) accepts it.
Like the SDK, it also accepts the key-sorted re-serialisation of a body: the signed text
here is already in that form, so only a re-serialisation that changes a value can differ.
"""

import base64
import hashlib
import json
import os

import pytest
from ellipticcurve import Signature
from starkcore.utils.parse import _is_signature_valid as sdk_is_signature_valid

from stark_challenge.verify import Signatures
from support import verifies

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "stark-signed-event.json")
# sha256 of the fixture as Stark Bank signed it and it was first stored: any edit shows here.
FIXTURE_SHA256 = "9b1176f9c1be37b83d99be6f23e923b78e850464dd6586d8db9980a5e98b618e"


@pytest.fixture(scope="module")
def real():
    with open(FIXTURE, "rb") as f:
        raw = f.read()
    assert hashlib.sha256(raw).hexdigest() == FIXTURE_SHA256
    return json.loads(raw)


@pytest.fixture
def signatures(real):
    """Signature checks whose key fetch returns Stark Bank's published key (no network)."""
    return Signatures(lambda: real["public_key_pem"])



def sdk_accepts(real, content, signature):
    from ellipticcurve import PublicKey

    try:
        parsed = Signature.fromBase64(signature)
    except Exception:
        return False
    return sdk_is_signature_valid(content, parsed, PublicKey.fromPem(real["public_key_pem"]))


def test_the_real_event_is_accepted_byte_for_byte(signatures, real):
    assert verifies(signatures, real["body"], real["digital_signature"])
    event = json.loads(real["body"])["event"]
    assert (event["subscription"], event["log"]["type"], event["log"]["invoice"]["amount"]) == ("invoice", "created", 256)
    # The signature is high-S (s > n/2), as Stark Bank's are.
    signature = Signature.fromBase64(real["digital_signature"])
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    assert signature.s > n // 2


def flipped(text, index):
    """Return ``text`` with the character at ``index`` changed (one bit of its byte, kept printable)."""
    char = text[index]
    other = chr(ord(char) ^ 1) if chr(ord(char) ^ 1).isprintable() else chr(ord(char) ^ 2)
    return text[:index] + other + text[index + 1:]


def test_a_flipped_byte_anywhere_in_the_body_is_refused(signatures, real):
    body = real["body"]
    # Every 13th position plus both ends: each part of the body (ids, dates, amount, fee, tags, brcode).
    positions = sorted(set(range(0, len(body), 13)) | {len(body) - 1, body.index('"amount": 256') + 11})
    refused = [i for i in positions if not verifies(signatures, flipped(body, i), real["digital_signature"])]
    assert refused == positions
    assert not any(sdk_accepts(real, flipped(body, i), real["digital_signature"]) for i in positions[::8])


def test_a_flipped_byte_in_the_signature_is_refused(signatures, real):
    der = base64.b64decode(real["digital_signature"])
    for index in range(4, len(der)):  # past the DER header: every byte of r and s
        changed = bytearray(der)
        changed[index] ^= 1
        signature = base64.b64encode(bytes(changed)).decode()
        assert not verifies(signatures, real["body"], signature), index
    assert not verifies(signatures, real["body"], real["digital_signature"][::-1])


@pytest.mark.parametrize("change", [
    lambda d: d["event"]["log"]["invoice"].update(amount=257),
    lambda d: d["event"]["log"]["invoice"].update(fee=1),
    lambda d: d["event"]["log"].update(type="credited"),
    lambda d: d["event"].update(workspaceId="1"),
    lambda d: d["event"]["log"]["invoice"]["tags"].append("stark-challenge"),
], ids=["amount", "fee", "log type", "workspace", "tags"])
def test_a_re_serialised_body_with_any_value_changed_is_refused(signatures, real, change):
    document = json.loads(real["body"])
    change(document)
    for body in (json.dumps(document), json.dumps(document, sort_keys=True),
                 json.dumps(document, separators=(",", ":"))):
        assert not verifies(signatures, body, real["digital_signature"])
        assert not sdk_accepts(real, body, real["digital_signature"])


def test_a_re_serialisation_of_the_same_document_gets_the_sdks_verdict(signatures, real):
    document = json.loads(real["body"])
    compact = json.dumps(document, separators=(",", ":"))
    assert compact != real["body"]
    # Its key-sorted form is the signed text: the SDK accepts it, and so does the verifier.
    assert verifies(signatures, compact, real["digital_signature"]) == sdk_accepts(real, compact, real["digital_signature"])
