"""Brazilian tax ids (CPF and CNPJ): check digits and the canonical formatting.

Written for the emulator alone, independently of the service's own tax id code, so a
bug in one cannot hide the same bug in the other. Pure functions, no state.

A tax id is accepted bare (11 or 14 digits) or in its usual punctuation
("012.345.678-90", "20.018.183/0001-80"), as Stark Bank accepts both. Numbers made of
one repeated digit pass the check-digit arithmetic but are not valid ids.
"""

import re

__all__ = ["is_valid", "format_tax_id", "digits_of"]

_CPF = re.compile(r"^(\d{11}|\d{3}\.\d{3}\.\d{3}-\d{2})$")
_CNPJ = re.compile(r"^(\d{14}|\d{2}\.\d{3}\.\d{3}/\d{4}-\d{2})$")

# Weights from the Receita Federal rules: CPF counts down from 10 (then 11) for its two
# check digits; CNPJ cycles 5..2, 9..2 (then 6..2, 9..2).
_CNPJ_WEIGHTS_1 = (5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2)
_CNPJ_WEIGHTS_2 = (6,) + _CNPJ_WEIGHTS_1


def digits_of(tax_id):
    """Return only the digits of tax_id, as a string."""
    return re.sub(r"\D", "", tax_id)


def _cpf_ok(digits):
    numbers = [int(d) for d in digits]
    for size in (9, 10):
        total = sum(n * (size + 1 - i) for i, n in enumerate(numbers[:size]))
        if (total * 10) % 11 % 10 != numbers[size]:
            return False
    return True


def _cnpj_ok(digits):
    numbers = [int(d) for d in digits]
    for size, weights in ((12, _CNPJ_WEIGHTS_1), (13, _CNPJ_WEIGHTS_2)):
        remainder = sum(n * w for n, w in zip(numbers[:size], weights)) % 11
        if (0 if remainder < 2 else 11 - remainder) != numbers[size]:
            return False
    return True


def is_valid(tax_id):
    """Return True if tax_id is a CPF or CNPJ with correct check digits, bare or formatted."""
    if not isinstance(tax_id, str):
        return False
    digits = digits_of(tax_id)
    if len(set(digits)) == 1:
        return False
    if _CPF.match(tax_id):
        return _cpf_ok(digits)
    if _CNPJ.match(tax_id):
        return _cnpj_ok(digits)
    return False


def format_tax_id(tax_id):
    """Return a valid tax id in its punctuated form, as Stark Bank echoes it back."""
    d = digits_of(tax_id)
    if len(d) == 11:
        return "%s.%s.%s-%s" % (d[:3], d[3:6], d[6:9], d[9:])
    return "%s.%s.%s/%s-%s" % (d[:2], d[2:5], d[5:8], d[8:12], d[12:])
