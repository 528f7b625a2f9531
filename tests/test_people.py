"""people: random payers with valid tax ids, checked against an independent check-digit implementation."""

import random
import re

import pytest

from stark_challenge.people import random_amount, random_cnpj, random_cpf, random_person, MAX_AMOUNT, MIN_AMOUNT
from stark_challenge.taxid import is_valid_tax_id, mask_tax_id


def reference_cpf_ok(cpf):
    """The CPF rule as Receita Federal publishes it, written out longhand."""
    d = [int(c) for c in cpf if c.isdigit()]
    if len(d) != 11 or len(set(d)) == 1:
        return False
    s1 = sum(d[i] * (10 - i) for i in range(9))
    v1 = (s1 * 10) % 11 % 10
    s2 = sum(d[i] * (11 - i) for i in range(10))
    v2 = (s2 * 10) % 11 % 10
    return d[9] == v1 and d[10] == v2


def reference_cnpj_ok(cnpj):
    d = [int(c) for c in cnpj if c.isdigit()]
    if len(d) != 14 or len(set(d)) == 1:
        return False
    w1 = [5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]
    w2 = [6] + w1
    r1 = sum(a * b for a, b in zip(d[:12], w1)) % 11
    r2 = sum(a * b for a, b in zip(d[:13], w2)) % 11
    return d[12] == (0 if r1 < 2 else 11 - r1) and d[13] == (0 if r2 < 2 else 11 - r2)


def test_random_cpfs_have_correct_check_digits_and_format():
    rng = random.Random(1)
    for _ in range(2000):
        cpf = random_cpf(rng)
        assert re.fullmatch(r"\d{3}\.\d{3}\.\d{3}-\d{2}", cpf)
        assert reference_cpf_ok(cpf)


def test_random_cnpjs_have_correct_check_digits_and_format():
    rng = random.Random(2)
    for _ in range(2000):
        cnpj = random_cnpj(rng)
        assert re.fullmatch(r"\d{2}\.\d{3}\.\d{3}/0001-\d{2}", cnpj)
        assert reference_cnpj_ok(cnpj)


def test_validation_agrees_with_the_reference_on_random_and_corrupted_ids():
    rng = random.Random(3)
    for _ in range(500):
        for good, reference in ((random_cpf(rng), reference_cpf_ok), (random_cnpj(rng), reference_cnpj_ok)):
            assert is_valid_tax_id(good)
            digits = [c for c in good]
            i = rng.choice([k for k, c in enumerate(digits) if c.isdigit()])
            digits[i] = str((int(digits[i]) + rng.randrange(1, 10)) % 10)
            bad = "".join(digits)
            assert is_valid_tax_id(bad) == reference(bad)


@pytest.mark.parametrize("tax_id", ["111.111.111-11", "00000000000", "123", "", "abc.def.ghi-jk", None, 12345678909])
def test_invalid_tax_ids_are_refused(tax_id):
    assert not is_valid_tax_id(tax_id)


def test_known_tax_ids_validate_formatted_or_bare():
    assert is_valid_tax_id("20.018.183/0001-80")  # Stark Bank S.A.
    assert is_valid_tax_id("20018183000180")
    assert not is_valid_tax_id("20.018.183/0001-81")


def test_people_are_mostly_individuals_with_some_companies():
    rng = random.Random(4)
    people = [random_person(rng) for _ in range(1000)]
    companies = [p for p in people if len([c for c in p.tax_id if c.isdigit()]) == 14]
    assert 100 < len(companies) < 350
    assert all(len(p.name.split()) >= 3 for p in people)
    assert all(is_valid_tax_id(p.tax_id) for p in people)


def test_amounts_are_integer_cents_within_bounds():
    rng = random.Random(5)
    amounts = [random_amount(rng) for _ in range(5000)]
    assert all(isinstance(a, int) and MIN_AMOUNT <= a <= MAX_AMOUNT for a in amounts)
    assert len(set(amounts)) > 500  # realistic spread, not a constant


def test_masking_hides_the_leading_and_check_digits():
    assert mask_tax_id("123.456.789-09") == "***.456.789-**"
    assert mask_tax_id("20.018.183/0001-80") == "**.018.183/****-**"
    assert mask_tax_id("12345678909") == "***456789**"
    assert mask_tax_id(None) == "***"
