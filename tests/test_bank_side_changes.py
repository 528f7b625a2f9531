"""What Stark Bank's side does to invoices after they are issued, as the running service sees it:
an invoice going overdue or expiring changes nothing but the report (no credit, no transfer).

The emulator moves the invoices' dates as a person updating them through the API would
(``invoice.update`` with the same workspace's credentials); the service learns of it only
through the events Stark Bank sends.
"""

import datetime

import starkbank

from support import query, service_settled, status_json, wait_for


def test_invoices_going_overdue_or_expiring_change_only_the_report(emulator, service_factory, sdk):
    service = service_factory(INVOICE_MIN=3, INVOICE_MAX=3)
    service.start()
    wait_for(lambda: len(emulator.invoices()) == 3, message="round 0")
    late, gone, paid = (invoice["id"] for invoice in emulator.invoices())
    now = datetime.datetime.now(datetime.timezone.utc)

    starkbank.invoice.update(late, due=now - datetime.timedelta(hours=1), expiration=datetime.timedelta(days=1))
    starkbank.invoice.update(gone, due=now - datetime.timedelta(hours=2), expiration=datetime.timedelta(minutes=1))
    emulator.pay(paid)

    wait_for(lambda: len(emulator.transfers()) == 1, message="the paid invoice's transfer")
    wait_for(lambda: service_settled(service, emulator), message="the service settled")
    statuses = {invoice["id"]: invoice["status"] for invoice in emulator.invoices()}
    assert (statuses[late], statuses[gone]) == ("overdue", "expired")
    assert dict(query(service, "select id, status from invoice where id in (?, ?)", (late, gone))) == {
        late: "overdue", gone: "expired"}
    assert query(service, "select invoice_id from credit") == [(paid,)]
    assert [t["tags"][1] for t in emulator.transfers()] == ["invoice-" + paid]
    invoices = status_json(service)["invoices"]
    assert (invoices["overdue"]["count"], invoices["expired"]["count"]) == (1, 1)
    assert service.stop() == 0
