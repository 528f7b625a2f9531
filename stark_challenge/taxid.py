"""Tax ids: the check digits of Brazilian CPF and CNPJ numbers, their validation, and their masking in logs.

Pure; imports nothing from the package (``config``, ``logs``, ``events`` and
``people`` use it).

>>> is_valid_tax_id("20.018.183/0001-80"), mask_tax_id("123.456.789-09")
(True, '***.456.789-**')
"""

import re

__all__ = ["is_valid_tax_id", "mask_tax_id", "cpf_digits", "cnpj_digits"]


def _check_digit(digits, weights):
    remainder = sum(d * w for d, w in zip(digits, weights)) % 11
    return 0 if remainder < 2 else 11 - remainder


def cpf_digits(base):
    first = _check_digit(base, range(10, 1, -1))
    second = _check_digit(base + [first], range(11, 1, -1))
    return base + [first, second]


def cnpj_digits(base):
    weights = [5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2]
    first = _check_digit(base, weights)
    second = _check_digit(base + [first], [6] + weights)
    return base + [first, second]


def is_valid_tax_id(tax_id):
    """Return True if ``tax_id`` is a CPF or CNPJ with correct check digits, formatted or bare."""
    if not isinstance(tax_id, str) or not re.fullmatch(r"[0-9./\- ]+", tax_id):
        return False
    digits = [int(c) for c in tax_id if c.isdigit()]
    if len(digits) == 11:
        return len(set(digits)) > 1 and cpf_digits(digits[:9]) == digits
    if len(digits) == 14:
        return len(set(digits)) > 1 and cnpj_digits(digits[:12]) == digits
    return False


def mask_tax_id(tax_id):
    """Return ``tax_id`` with all but its middle digits hidden, for logs: ***.456.789-** ."""
    if not isinstance(tax_id, str):
        return "***"
    digits = [c for c in tax_id if c.isdigit()]
    keep = range(3, 9) if len(digits) == 11 else range(2, 8) if len(digits) == 14 else range(0)
    out, i = [], 0
    for c in tax_id:
        if c.isdigit():
            out.append(c if i in keep else "*")
            i += 1
        else:
            out.append(c)
    return "".join(out)
