"""bank: SDK calls against the emulator, error translation, and signature verification that gives
the same verdicts as the SDK's own ``starkbank.event.parse`` while fetching the key at most once a minute."""

import json
import threading

import pytest
import starkbank
from ellipticcurve import Ecdsa, PrivateKey

from stark_challenge import verify
from stark_challenge.bank import Bank
from stark_challenge.errors import BankRejected, BankUnavailable, ConfigError, SignatureError

from stark_challenge.verify import KeyCache, Signatures

from support import sdk_config, signed_event, verifies, wait_for


@pytest.fixture
def bank(sdk):
    b = Bank(sdk_config(sdk))
    b.configure()
    return b


def sdk_accepts(content, signature):
    try:
        starkbank.event.parse(content=content, signature=signature)
        return True
    except starkbank.error.InvalidSignatureError:
        return False



def test_verdicts_match_the_sdks_parse(emulator, bank):
    signatures = Signatures(bank.fetch_public_key)
    body, headers = signed_event(emulator, "1", {"id": "9", "amount": 100, "fee": 1, "tags": []})
    good = headers["Digital-Signature"]
    content = body.decode()
    stranger = Ecdsa.sign(content, PrivateKey()).toBase64()
    reordered = json.dumps(json.loads(content), sort_keys=True)  # the SDK accepts the key-sorted form too
    sorted_signed = emulator.sign(reordered.encode())
    cases = [
        (content, good),
        (content.replace('"amount":100', '"amount":101'), good),
        (content, stranger),
        (content + " ", good),
        (content, sorted_signed),
        (content, "bm90IGEgc2lnbmF0dXJl"),
        (content, "%%%"),
    ]
    for case in cases:
        assert verifies(signatures, *case) == sdk_accepts(*case), case
    assert [verifies(signatures, *c) for c in cases] == [True, False, False, False, True, False, False]


def test_forged_signatures_refetch_the_key_at_most_once_a_minute(emulator, sdk):
    now = [1000.0]
    bank = Bank(sdk_config(sdk))
    bank.configure()
    signatures = Signatures(bank.fetch_public_key, clock=lambda: now[0])
    body, headers = signed_event(emulator, "1", {"id": "9"})
    forged = Ecdsa.sign(body.decode(), PrivateKey()).toBase64()
    before = emulator.public_key_fetches

    for _ in range(200):
        with pytest.raises(SignatureError):
            signatures.check(body.decode(), forged)
    assert emulator.public_key_fetches - before == 1  # the first fetch; the refresh is not due yet

    now[0] += 61
    for _ in range(50):
        with pytest.raises(SignatureError):
            signatures.check(body.decode(), forged)
    assert emulator.public_key_fetches - before == 2
    signatures.check(body.decode(), headers["Digital-Signature"])  # genuine ones still pass


def test_an_unreachable_key_is_unavailable_not_a_bad_signature(emulator, sdk):
    now = [0.0]
    bank = Bank(sdk_config(sdk))
    bank.configure()
    signatures = Signatures(bank.fetch_public_key, clock=lambda: now[0])
    body, headers = signed_event(emulator, "1", {"id": "9"})
    emulator.fail_next("GET", "/v2/public-key", count=1, status=500)
    with pytest.raises(BankUnavailable):
        signatures.check(body.decode(), headers["Digital-Signature"])
    with pytest.raises(BankUnavailable):  # no new fetch within KEY_RETRY_S
        signatures.check(body.decode(), headers["Digital-Signature"])
    now[0] += 10
    signatures.check(body.decode(), headers["Digital-Signature"])


def test_key_cache_counts_fetches_and_shares_a_refresh():
    fetched = []
    key = PrivateKey().publicKey().toPem()
    cache = KeyCache(lambda: fetched.append(1) or key, clock=lambda: 0.0)
    first = cache.get()
    assert cache.get() is first and fetched == [1]
    assert cache.refresh(stale=first) is None  # within the minute
    assert cache.fetches == 1


def test_sdk_errors_become_ours(emulator, bank):
    tags = ["t", "x-1"]
    emulator.fail_next("POST", "/v2/transfer", status=400)
    with pytest.raises(BankRejected) as rejected:
        bank.create_transfer(100, "x-1", tags)
    assert rejected.value.codes == ("injectedFault",)
    emulator.fail_next("POST", "/v2/transfer", status=500)
    with pytest.raises(BankUnavailable):
        bank.create_transfer(100, "x-1", tags)
    emulator.fail_next_after("POST", "/v2/transfer")
    with pytest.raises(BankUnavailable):
        bank.create_transfer(100, "x-1", tags)
    # That last one was created: Stark Bank refuses the external id again, and it can be found by tag.
    with pytest.raises(BankRejected):
        bank.create_transfer(100, "x-1", tags)
    found = bank.find_transfer("x-1")
    assert found["external_id"] == "x-1" and found["amount"] == 100
    assert bank.find_transfer("x-2") is None


def test_a_transfer_goes_to_the_configured_account(emulator, bank):
    sent = bank.create_transfer(4321, "x-9", ["stark-challenge", "invoice-1", "x-9"])
    assert sent["status"] == "created"
    (t,) = emulator.transfers()
    assert (t["amount"], t["externalId"], t["bankCode"], t["branchCode"], t["accountNumber"], t["taxId"],
            t["name"], t["accountType"]) == (4321, "x-9", "20018183", "0001", "6341320293482496",
                                             "20.018.183/0001-80", "Stark Bank S.A.", "payment")


def test_undelivered_events_come_back_shaped_like_webhooks(emulator, bank):
    emulator.set(hold_deliveries=True)
    bank.create_transfer(500, "x-5", ["t"])
    events = bank.undelivered_events()
    assert events and events[0]["subscription"] == "transfer"
    assert events[0]["log"]["transfer"]["externalId"] == "x-5"
    assert isinstance(events[0]["log"]["transfer"]["amount"], int)
    bank.mark_delivered(events[0]["id"])
    assert events[0]["id"] not in {e["id"] for e in bank.undelivered_events()}


def test_a_bad_private_key_is_a_config_error(sdk):
    bank = Bank(sdk_config(sdk, STARK_PRIVATE_KEY="-----BEGIN EC PRIVATE KEY-----\nnope\n-----END EC PRIVATE KEY-----"))
    with pytest.raises(ConfigError, match="STARK_PRIVATE_KEY"):
        bank.configure()


class WatchedVerifier:
    """The pure verifier, counting the checks that run at once; the first one waits for company."""

    name = "watched"
    cheap = False  # the pure verifier inside

    def __init__(self, parsed):
        self._inner = verify.PureVerifier()
        self._lock = threading.Lock()
        self._parsed = parsed  # signatures parsed so far: one per caller that reached the check
        self.running = self.most = 0
        self._held_one = False  # the first check was held
        self.company = threading.Event()  # a second check started while the first ran

    def verify(self, message, signature, key):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            first, self._held_one = not self._held_one, True
            if self.running > 1:
                self.company.set()
        try:
            if first:  # hold the first check while the others arrive: any that overlaps it shows
                wait_for(lambda: len(self._parsed) == 3, message="every caller at the check")
                self.company.wait(0.5)
            return self._inner.verify(message, signature, key)
        finally:
            with self._lock:
                self.running -= 1


def test_signature_checks_run_one_at_a_time(emulator, sdk, monkeypatch):
    parsed = []
    real_parse = verify.parse_signature
    monkeypatch.setattr(verify, "parse_signature", lambda text: parsed.append(text) or real_parse(text))
    watched = WatchedVerifier(parsed)
    bank = Bank(sdk_config(sdk))
    bank.configure()
    signatures = Signatures(bank.fetch_public_key, watched)
    body, headers = signed_event(emulator, "1", {"id": "9"})
    results = []
    threads = [threading.Thread(target=lambda: results.append(verifies(signatures, body.decode(), headers["Digital-Signature"])))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True, True, True]
    assert watched.most == 1  # each check waited for the one before it


def test_a_get_is_none_only_for_a_404_or_a_400_saying_the_id_is_unknown(emulator, bank):
    assert bank.get("transfer", "7000000000000001") is None  # 400 invalidTransferId: no such transfer for us
    emulator.fail_next("GET", "/v2/transfer/7000000000000001", status=404)
    assert bank.get("transfer", "7000000000000001") is None
    emulator.fail_next("GET", "/v2/invoice/6000000000000001", status=400)  # another code: a refusal, not "none"
    with pytest.raises(BankRejected, match="injectedFault"):
        bank.get("invoice", "6000000000000001")
    emulator.fail_next("GET", "/v2/invoice/6000000000000001", status=503)
    with pytest.raises(BankUnavailable):
        bank.get("invoice", "6000000000000001")


def test_find_transfer_takes_the_one_with_exactly_our_external_id_and_the_moving_one_first(emulator, bank):
    emulator.set(duplicate_external_id="fail_later", transfer_delay_s=600)
    first = bank.create_transfer(100, "x-1", ["x-1"])
    bank.create_transfer(200, "x-10", ["x-1"])  # carries our tag, another external id
    again = bank.create_transfer(100, "x-1", ["x-1"])  # created, to fail later
    emulator.fail_transfer(again["id"])
    assert bank.find_transfer("x-1")["id"] == first["id"]
    assert bank.find_transfer("x-2") is None
