"""invoicer: rounds issued through the real SDK against the emulator, never twice."""

import random

import pytest

from stark_challenge.bank import Bank
from stark_challenge.invoicer import Invoicer, build_invoices, round_tags
from stark_challenge.taxid import is_valid_tax_id

from support import sdk_config


@pytest.fixture
def store(any_store):
    """Every test of this module runs on both backends."""
    return any_store


def make_invoicer(sdk, store, clock, **values):
    config = sdk_config(sdk, **values)
    bank = Bank(config)
    bank.configure()
    return Invoicer(bank, store, config, "s1", clock=clock, rng=random.Random(11), retry_base_s=10)


def invoice_posts(emulator):
    return [r for r in emulator.requests if r["method"] == "POST" and r["path"] == "/v2/invoice"]


def test_built_invoices_are_valid_and_due_in_the_future(clock):
    invoices = build_invoices(random.Random(1), 12, clock(), ["t"])
    assert len(invoices) == 12
    for inv in invoices:
        assert is_valid_tax_id(inv["tax_id"]) and isinstance(inv["amount"], int)
        assert inv["due"] > clock() and inv["expiration_s"] > 0 and inv["tags"] == ["t"]


def test_a_round_is_one_create_call_recorded_in_the_store(emulator, sdk, store, clock):
    invoicer = make_invoicer(sdk, store, clock)
    outcome = invoicer.issue_round(0, clock())

    assert outcome.state == "issued"
    created = emulator.invoices()
    assert 8 <= len(created) <= 12
    assert len(invoice_posts(emulator)) == 1
    assert all(i["tags"] == round_tags("stark-challenge", "s1", 0, 0) for i in created)
    r = store.round(0)
    assert (r.state, r.count, r.total) == ("issued", len(created), sum(i["amount"] for i in created))
    # Settled: asking again does nothing.
    assert invoicer.issue_round(0, clock()).state == "done"
    assert len(invoice_posts(emulator)) == 1


def test_a_large_round_goes_in_chunks_of_one_hundred(emulator, sdk, store, clock):
    invoicer = make_invoicer(sdk, store, clock, INVOICE_MIN=250, INVOICE_MAX=250)
    assert invoicer.issue_round(0, clock()).state == "issued"
    assert len(emulator.invoices()) == 250
    assert len(invoice_posts(emulator)) == 3
    assert store.round(0).count == 250


def test_a_timed_out_create_is_reconciled_by_its_tag_not_created_again(emulator, sdk, store, clock):
    invoicer = make_invoicer(sdk, store, clock)
    emulator.fail_next_after("POST", "/v2/invoice")  # created, but the answer is lost

    first = invoicer.issue_round(0, clock())
    assert first.state == "retry" and store.round(0).state == "issuing"
    made = len(emulator.invoices())

    clock.advance(60)
    assert invoicer.issue_round(0, clock()).state == "issued"
    assert len(emulator.invoices()) == made  # nothing created twice
    assert len(invoice_posts(emulator)) == 1
    tag_queries = [r for r in emulator.requests if r["method"] == "GET" and r["path"] == "/v2/invoice"]
    assert tag_queries and "batch-s1-0-0" in tag_queries[0]["query"]
    assert store.round(0).count == made


def test_a_500_is_retried_with_backoff_and_issues_the_round_once(emulator, sdk, store, clock):
    invoicer = make_invoicer(sdk, store, clock)
    emulator.fail_next("POST", "/v2/invoice", count=2, status=500)
    waits, retries = [], []
    for _ in range(3):
        tried_at = clock()
        retries.append(invoicer.issue_round(0, tried_at))
        if retries[-1].retry_at is not None:
            waits.append((retries[-1].retry_at - tried_at).total_seconds())
            clock.advance(waits[-1])
    assert [o.state for o in retries] == ["retry", "retry", "issued"]
    # Exponential with 50-100 % jitter: the 2nd wait is 1-4 times the 1st.
    assert 0 < waits[0] <= waits[1] <= 4 * waits[0]
    assert len({i["tags"][-1] for i in emulator.invoices()}) == 1
    assert store.round(0).attempts == 3


def test_a_round_gives_up_after_its_bounded_attempts(emulator, sdk, store, clock):
    invoicer = make_invoicer(sdk, store, clock)
    emulator.fail_next("POST", "/v2/invoice", count=50, status=400)
    states = []
    for _ in range(8):
        states.append(invoicer.issue_round(0, clock()).state)
        clock.advance(7200)
    assert states[:6] == ["retry"] * 5 + ["failed"] and states[6:] == ["done", "done"]
    r = store.round(0)
    assert r.state == "failed" and "injectedFault" in r.error
    assert emulator.invoices() == []
