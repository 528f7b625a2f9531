"""logs.redact against the plain form of its patterns: each secret pattern runs only on text holding
a word every match contains, and tax ids are found by scanning runs of digits and separators; both
must hide exactly what the plain patterns, run on every line, hide."""

import random
import re

from stark_challenge import logs
from stark_challenge.taxid import mask_tax_id

# The tax-id pattern as first written: a lookbehind, then the four shapes.
PLAIN_TAX_ID = re.compile(
    r"(?<![\d./-])(?:\d{3}\.\d{3}\.\d{3}-\d{2}|\d{2}\.\d{3}\.\d{3}/\d{4}-\d{2}|\d{11}|\d{14})(?![\d./-]?\d)"
)
SHAPES = ["123.456.789-01", "12.345.678/0001-90", "12345678901", "12345678901234", "https://u:pw@host/",
          "HTTP://a:b@c", "x://:@", "Authorization: Basic abc"]


def plain_redact(text):
    for pattern, replacement, _ in logs._SECRETS:
        text = pattern.sub(replacement, text)
    return PLAIN_TAX_ID.sub(lambda m: mask_tax_id(m.group(0)), text)


def noise(rng, n):
    return "".join(rng.choice("0123456789./-: @abh٣") for _ in range(rng.randint(0, n)))


def test_redact_hides_what_the_plain_patterns_hide():
    rng = random.Random(5)
    texts = [noise(rng, 6) + rng.choice(SHAPES) + noise(rng, 6) if rng.random() < 0.5 else noise(rng, 40)
             for _ in range(30000)]
    texts += ["transfer sent: invoice 5123456789012345, amount 123456, fee 234, transfer 123222 cents",
              "0" * 11, "0" * 14, "0" * 12, "a12345678901b", "1.123.456.789-01", "123.456.789-012"]
    changed = 0
    for text in texts:
        assert logs.redact(text) == plain_redact(text), text
        changed += logs.redact(text) != text
    assert changed > 5000  # the cases do reach the patterns
