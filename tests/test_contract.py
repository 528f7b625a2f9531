"""The emulator's contract with Stark Bank: what the service relies on, asserted through the
real SDK against one backend or the other.

- ``emulator``: the built-in emulator (always).
- ``sandbox``: Stark Bank's real sandbox, opt-in, so the emulator's guesses can be checked by
  anyone with an account::

      STARK_SANDBOX_TEST=1 STARK_PROJECT_ID=... STARK_PRIVATE_KEY=path/to/key.pem \\
          .venv/bin/python -m pytest -q tests/test_contract.py

  It creates a few invoices (small amounts, due in a week), four transfers of 1 real sandbox
  cent to Stark Bank S.A. (two attempts under one external id, then a batch of two), and marks
  at most one undelivered event delivered.
  Skipped, with the reason, when not requested or without credentials.

Each test asserts only what both must do; the emulator's own details are in test_emulator.py.
"""

import datetime
import secrets

import pytest
import starkbank
from ellipticcurve import Ecdsa, PublicKey, Signature
from starkcore.utils.cache import cache as sdk_cache

from stark_challenge import config as config_module
from support import wait_for
from support.sandbox import SANDBOX_CREDENTIALS, sandbox_skip_reason

RECEIVER = dict(name="Stark Bank S.A.", tax_id="20.018.183/0001-80", bank_code="20018183", branch_code="0001",
                account_number="6341320293482496", account_type="payment")


class Backend:
    """Where the SDK points: ``name``, the emulator (None for the sandbox), and how long to wait
    for what the backend does in the background."""

    def __init__(self, name, emulator=None, patience_s=10.0):
        self.name, self.emulator, self.patience_s = name, emulator, patience_s


@pytest.fixture(params=["emulator", "sandbox"])
def backend(request, monkeypatch):
    saved_user = starkbank.user
    sdk_cache.clear()  # the SDK caches Stark Bank's public key process-wide
    if request.param == "emulator":
        emulator = request.getfixturevalue("emulator")
        project = request.getfixturevalue("emulator_project")
        for name, value in project.env.items():
            if not name.startswith("STARK_"):
                monkeypatch.setenv(name, value)
        starkbank.user = starkbank.Project(environment="sandbox", id=project.id, private_key=project.private_key)
        yield Backend("emulator", emulator)
    else:
        reason = sandbox_skip_reason()
        if reason:
            pytest.skip(reason)
        # The key may be PEM text or a file, as the service reads it; no proxy is set (see conftest).
        config = config_module.load({k: v for k, v in SANDBOX_CREDENTIALS.items() if k.startswith("STARK_P")},
                                    dotenv_path=None)
        starkbank.user = starkbank.Project(environment="sandbox", id=config.project_id, private_key=config.private_key)
        yield Backend("sandbox", patience_s=60.0)
    starkbank.user = saved_user
    sdk_cache.clear()


def run_tag():
    return f"contract-{secrets.token_hex(6)}"


def new_invoice(tag, amount=1000):
    due = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=7)
    return starkbank.Invoice(amount=amount, name="Arya Stark", tax_id="012.345.678-90", due=due, expiration=3600,
                             tags=[tag])


def new_transfer(external_id, amount=1):
    return starkbank.Transfer(amount=amount, external_id=external_id, tags=["contract"], **RECEIVER)


def test_invoices_are_created_and_found_again_by_their_tag(backend):
    tag = run_tag()
    created = starkbank.invoice.create([new_invoice(tag, 1000), new_invoice(tag, 1001)])
    assert len(created) == 2 and all(i.id and i.status == "created" for i in created)

    def by_tag():
        found = list(starkbank.invoice.query(tags=[tag], limit=10))
        return len(found) == 2 and found

    found = wait_for(by_tag, backend.patience_s, interval=0.5, message="both invoices by their tag")
    assert sorted(i.id for i in found) == sorted(i.id for i in created)
    assert sorted(i.amount for i in found) == [1000, 1001]
    assert list(starkbank.invoice.query(tags=[run_tag()], limit=10)) == []


def test_a_transfer_with_a_used_external_id_is_refused_or_fails(backend):
    # Stark Bank is reported to refuse it at once (400 invalidExternalId) or to create it and
    # fail it later; the service handles both. Either way no second transfer succeeds.
    external_id = f"contract-{secrets.token_hex(8)}"
    (first,) = starkbank.transfer.create([new_transfer(external_id)])
    assert first.id and first.external_id == external_id
    try:
        (second,) = starkbank.transfer.create([new_transfer(external_id)])
    except starkbank.error.InputErrors as refused:
        assert [e.code for e in refused.errors] == ["invalidExternalId"]
    else:
        wait_for(lambda: starkbank.transfer.get(second.id).status == "failed", backend.patience_s, interval=1.0,
                 message="the duplicate failed")
    assert [t.id for t in starkbank.transfer.query(tags=["contract"], limit=100)
            if t.external_id == external_id and t.status != "failed"] == [first.id]


def test_a_raw_create_answer_lists_each_transfer_sent_in_its_place(backend):
    # bank.create_transfers posts the JSON itself and reads the answer's JSON: it relies on each
    # transfer coming back at its place with its id, status, amount, tags and external id.
    sent = [{"amount": 1, "externalId": f"contract-{secrets.token_hex(8)}", "tags": ["contract", f"raw-{n}"],
             "name": RECEIVER["name"], "taxId": RECEIVER["tax_id"], "bankCode": RECEIVER["bank_code"],
             "branchCode": RECEIVER["branch_code"], "accountNumber": RECEIVER["account_number"],
             "accountType": RECEIVER["account_type"]} for n in range(2)]
    response = starkbank.request.post("transfer", body={"transfers": sent})
    assert response.status == 200
    answered = response.json()["transfers"]
    assert [t["externalId"] for t in answered] == [t["externalId"] for t in sent]
    for made, item in zip(answered, sent):
        assert isinstance(made["id"], str) and made["id"] and made["status"] == "created"
        assert made["amount"] == 1 and isinstance(made["amount"], int) and made["tags"] == item["tags"]


def test_undelivered_events_are_queried_and_marked_delivered(backend):
    starkbank.invoice.create([new_invoice(run_tag())])  # its "created" event, where a webhook subscribes
    try:
        (event, *_) = wait_for(lambda: list(starkbank.event.query(is_delivered=False, limit=5)), 10.0, interval=0.5,
                               message="an undelivered event")
    except AssertionError:
        if backend.emulator is not None:
            raise
        pytest.skip("no undelivered event in this sandbox workspace (events exist only for webhook subscriptions)")
    assert event.is_delivered is False and event.subscription and event.log
    assert starkbank.event.update(event.id, is_delivered=True).is_delivered is True
    assert starkbank.event.get(event.id).is_delivered is True
    assert event.id not in [e.id for e in starkbank.event.query(is_delivered=False, limit=100)]


def test_the_public_key_is_a_secp256k1_pem_that_verifies_event_signatures(backend):
    response = starkbank.request.get("public-key", query={"limit": 1})
    assert response.status == 200
    pem = response.json()["publicKeys"][0]["content"]
    key = PublicKey.fromPem(pem)
    assert key.curve.name == "secp256k1"
    if backend.emulator is not None:  # the sandbox signs only what it sends: checked by test_real_event.py
        body = b'{"event": {"id": "1"}}'
        assert Ecdsa.verify(body.decode(), Signature.fromBase64(backend.emulator.sign(body)), key)
