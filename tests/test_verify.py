"""verify: the pure (ellipticcurve) and native (coincurve) verifiers give the same verdict on
every kind of signature, including Stark Bank's real high-S one; without coincurve the pure one
is chosen and works.

Signatures are made as Stark Bank makes them, with ``ellipticcurve`` (the emulator's
``EventKey``), then turned high-S or low-S: ``(r, s)`` and ``(r, n - s)`` sign the same body.
"""

import base64
import json
import os
import subprocess
import sys

import pytest
from ellipticcurve import PrivateKey, Signature
from ellipticcurve.curve import secp256k1

from stark_challenge import verify
from stark_challenge.emulator.keys import EventKey

try:
    import coincurve
except ImportError:  # the [fast] extra is not installed: the pure verifier is checked alone
    coincurve = None

N = secp256k1.N
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "stark-signed-event.json")
BODY = json.dumps({"event": {"log": {"type": "credited", "invoice": {"id": "1", "amount": 100, "fee": 2}}, "id": "7"}})


@pytest.fixture(scope="module")
def real():
    with open(FIXTURE, "rb") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def signer():
    return EventKey(PrivateKey())


@pytest.fixture(scope="module")
def verifiers():
    return [verify.PureVerifier()] + ([verify.NativeVerifier()] if coincurve else [])


def with_s(signature_b64, high):
    """The same signature as base64 DER, with s on the high (> n/2) or low side."""
    sig = Signature.fromBase64(signature_b64)
    s = sig.s if (sig.s > N // 2) == high else N - sig.s
    return Signature(sig.r, s).toBase64()


def verdict(verifiers, content, signature_b64, pem):
    """The verifiers' common verdict: True, False, or "malformed" (asserting they agree)."""
    out = []
    for v in verifiers:
        try:
            parsed = verify.parse_signature(signature_b64)
        except verify.MalformedSignature:
            out.append("malformed")
            continue
        out.append(verify.signature_matches(content, parsed, verify.load_key(pem), v))
    assert len(out) == len(verifiers) and len(set(out)) == 1, out
    return out[0]


def der(r, s):
    return base64.b64encode(verify.low_s_der(r, s)).decode()


def test_the_verifiers_are_named(verifiers):
    pytest.importorskip("coincurve")
    assert [v.name for v in verifiers] == ["pure Python (ellipticcurve)", "native (coincurve)"]
    assert verify.best_verifier().name == verify.NATIVE_NAME
    assert verify.best_verifier(native=False).name == verify.PURE_NAME
    assert verify.Signatures(str).name == verify.NATIVE_NAME
    assert verify.Signatures(str, verify.PureVerifier()).name == verify.PURE_NAME


def test_high_s_and_low_s_of_a_genuine_signature_both_verify(verifiers, signer):
    signature = signer.sign(BODY)
    high, low = with_s(signature, high=True), with_s(signature, high=False)
    assert Signature.fromBase64(high).s > N // 2 >= Signature.fromBase64(low).s
    assert verdict(verifiers, BODY, high, signer.public_pem) is True
    assert verdict(verifiers, BODY, low, signer.public_pem) is True


@pytest.mark.parametrize("high", [True, False])
def test_a_tampered_body_fails_with_both(verifiers, signer, high):
    signature = with_s(signer.sign(BODY), high)
    tampered = BODY.replace('"amount": 100', '"amount": 900')
    assert tampered != BODY
    assert verdict(verifiers, tampered, signature, signer.public_pem) is False


@pytest.mark.parametrize("high", [True, False])
def test_another_keys_signature_fails_with_both(verifiers, signer, high):
    signature = with_s(EventKey(PrivateKey()).sign(BODY), high)
    assert verdict(verifiers, BODY, signature, signer.public_pem) is False


def test_the_key_sorted_body_is_accepted_by_both(verifiers, signer):
    # The SDK accepts a body whose key-sorted form was signed; a reordered body must still
    # fail when its sorted form was not what was signed.
    sorted_body = json.dumps(json.loads(BODY), sort_keys=True)
    assert sorted_body != BODY
    for high in (True, False):
        signature = with_s(signer.sign(sorted_body), high)
        assert verdict(verifiers, BODY, signature, signer.public_pem) is True
    signature = signer.sign(BODY)
    assert verdict(verifiers, sorted_body, signature, signer.public_pem) is False
    assert verdict(verifiers, "not json", signature, signer.public_pem) is False


def test_a_body_nested_too_deep_to_parse_has_no_sorted_form_and_fails_with_both(verifiers, signer):
    deep = "[" * 30000 + "]" * 30000  # deeper than json's parser recurses
    assert verdict(verifiers, deep, signer.sign(BODY), signer.public_pem) is False
    assert verdict(verifiers, deep, signer.sign(deep), signer.public_pem) is True  # its raw form still verifies


@pytest.mark.parametrize(
    "signature",
    [
        "not base64 !!",
        "",
        base64.b64encode(b"garbage, not DER").decode(),
        "truncated",  # replaced below by a truncated genuine signature
        "non-canonical",  # replaced below: a genuine signature with a padded length
    ],
)
def test_malformed_signatures_are_refused_alike(verifiers, signer, signature):
    genuine = base64.b64decode(signer.sign(BODY))
    if signature == "truncated":
        signature = base64.b64encode(genuine[:-3]).decode()
    elif signature == "non-canonical":
        signature = base64.b64encode(genuine + b"\x00").decode()
    assert verdict(verifiers, BODY, signature, signer.public_pem) == "malformed"


@pytest.mark.parametrize("r, s", [(0, 1), (1, 0), (N, 1), (1, N), (N - 1, N - 1)])
def test_out_of_range_numbers_fail_with_both(verifiers, signer, r, s):
    # Well-formed DER, but r or s outside [1, n - 1] (or simply wrong): never a match.
    assert verdict(verifiers, BODY, Signature(r, s).toBase64(), signer.public_pem) is False


def test_the_real_stark_bank_event_verifies_with_both(verifiers, real):
    pytest.importorskip("coincurve")
    signature = real["digital_signature"]
    assert Signature.fromBase64(signature).s > N // 2, "Stark Bank's real signature is high-S"
    # libsecp256k1 itself refuses it as signed: the normalisation is what makes it pass.
    raw = base64.b64decode(signature)
    native_key = coincurve.PublicKey.from_point(*_point(real["public_key_pem"]))
    assert not native_key.verify(raw, real["body"].encode())
    assert verdict(verifiers, real["body"], signature, real["public_key_pem"]) is True
    low = with_s(signature, high=False)
    assert verdict(verifiers, real["body"], low, real["public_key_pem"]) is True
    changed = real["body"].replace('"amount": 256', '"amount": 257')
    assert changed != real["body"]
    assert verdict(verifiers, changed, signature, real["public_key_pem"]) is False


def _point(pem):
    key = verify.load_key(pem)
    return key.point.x, key.point.y


def test_a_native_key_is_parsed_once_per_key(signer):
    pytest.importorskip("coincurve")
    native = verify.NativeVerifier()
    key = verify.load_key(signer.public_pem)
    assert native._native_key(key) is native._native_key(verify.load_key(signer.public_pem))
    others = [verify.load_key(EventKey().public_pem) for _ in range(10)]
    for other in others:  # more keys than the cache holds: it stays bounded and correct
        assert native._native_key(other).format(compressed=False)[1:33] == other.point.x.to_bytes(32, "big")
    assert len(native._keys) <= 8


def test_an_unreadable_key_is_a_value_error():
    with pytest.raises(ValueError, match="not a secp256k1 public key"):
        verify.load_key("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----")


def test_der_integers_are_minimal():
    assert verify.low_s_der(1, 0x7F) == bytes.fromhex("300602010102017f")
    assert verify.low_s_der(0x80, 0x100) == bytes.fromhex("3008020200800202" "0100")
    # s above n/2 is replaced by n - s.
    assert verify.low_s_der(1, N - 1) == bytes.fromhex("3006020101020101")


BLOCKED = (
    "import sys; sys.modules['coincurve'] = None\n"
    "import json\n"
    "from stark_challenge import verify\n"
    "real = json.load(open(sys.argv[1]))\n"
    "v = verify.best_verifier()\n"
    "key = verify.load_key(real['public_key_pem'])\n"
    "sig = verify.parse_signature(real['digital_signature'])\n"
    "try:\n"
    "    verify.best_verifier(native=True)\n"
    "    demanded = 'built'\n"
    "except RuntimeError as e:\n"
    "    demanded = str(e)\n"
    "print(json.dumps({'available': verify.native_available(), 'name': v.name,\n"
    "    'service': verify.Signatures(str).name, 'demanded': demanded,\n"
    "    'real': verify.signature_matches(real['body'], sig, key, v),\n"
    "    'tampered': verify.signature_matches(real['body'].replace('256', '257'), sig, key, v)}))\n"
)


def test_without_coincurve_the_pure_verifier_is_chosen_and_works():
    tests = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests]))
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, FIXTURE], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {
        "available": False,
        "name": verify.PURE_NAME,
        "service": verify.PURE_NAME,
        "demanded": "the native verifier needs coincurve: pip install 'stark-challenge[fast]'",
        "real": True,
        "tampered": False,
    }
