"""Random but realistic payers: Brazilian names, valid CPF/CNPJ tax ids, invoice amounts.

Pure functions of a ``random.Random`` passed in, so tests can seed them. The tax
ids' check digits come from ``taxid``.

>>> import random
>>> from stark_challenge.taxid import is_valid_tax_id
>>> is_valid_tax_id(random_cpf(random.Random(7)))
True
"""

from typing import NamedTuple

from .taxid import cnpj_digits, cpf_digits

__all__ = [
    "Person",
    "random_person",
    "random_cpf",
    "random_cnpj",
    "random_amount",
]

FIRST_NAMES = (
    "Ana", "Beatriz", "Bruna", "Camila", "Carla", "Daniela", "Fernanda", "Gabriela",
    "Helena", "Isabela", "Juliana", "Larissa", "Leticia", "Luana", "Mariana", "Patricia",
    "Renata", "Sofia", "Tatiana", "Vitoria", "Andre", "Bruno", "Carlos", "Diego",
    "Eduardo", "Felipe", "Gabriel", "Gustavo", "Henrique", "Joao", "Jose", "Lucas",
    "Marcelo", "Mateus", "Pedro", "Rafael", "Ricardo", "Rodrigo", "Thiago", "Vinicius",
)
LAST_NAMES = (
    "Almeida", "Alves", "Araujo", "Barbosa", "Cardoso", "Carvalho", "Castro", "Costa",
    "Dias", "Ferreira", "Gomes", "Lima", "Martins", "Melo", "Moreira", "Nascimento",
    "Oliveira", "Pereira", "Ribeiro", "Rocha", "Rodrigues", "Santos", "Silva", "Souza",
    "Teixeira", "Vieira",
)
COMPANY_WORDS = (
    "Aurora", "Horizonte", "Ipe", "Jacaranda", "Mantiqueira", "Paineira", "Serra Azul",
    "Tiete", "Vale Verde", "Atlantica", "Cerrado", "Pampa",
)
COMPANY_KINDS = ("Comercio", "Servicos", "Tecnologia", "Alimentos", "Logistica", "Engenharia")
COMPANY_SUFFIXES = ("Ltda", "S.A.", "ME", "EIRELI")

# One payer in CNPJ_SHARE is a company: most invoices go to people, some to firms.
CNPJ_SHARE = 0.2
# Amounts in cents: R$ 10.00 to R$ 2,000.00, skewed towards small bills.
MIN_AMOUNT = 10_00
MAX_AMOUNT = 2_000_00


class Person(NamedTuple):
    """A payer of an invoice."""

    name: str
    tax_id: str  # formatted CPF (000.000.000-00) or CNPJ (00.000.000/0000-00)


def random_cpf(rng):
    """Return a random valid CPF, formatted as 000.000.000-00.

    A CPF whose eleven digits are all the same passes the check-digit test but is
    invalid, so such bases are redrawn.
    """
    while True:
        base = [rng.randrange(10) for _ in range(9)]
        if len(set(base)) > 1:
            break
    d = "".join(map(str, cpf_digits(base)))
    return f"{d[0:3]}.{d[3:6]}.{d[6:9]}-{d[9:]}"


def random_cnpj(rng):
    """Return a random valid CNPJ of a head office (branch 0001), formatted as 00.000.000/0001-00."""
    while True:
        root = [rng.randrange(10) for _ in range(8)]
        if len(set(root)) > 1:
            break
    d = "".join(map(str, cnpj_digits(root + [0, 0, 0, 1])))
    return f"{d[0:2]}.{d[2:5]}.{d[5:8]}/{d[8:12]}-{d[12:]}"


def random_person(rng):
    """Return a random Person: usually an individual with a CPF, sometimes a company with a CNPJ."""
    if rng.random() < CNPJ_SHARE:
        name = " ".join(
            (rng.choice(COMPANY_WORDS), rng.choice(COMPANY_KINDS), rng.choice(COMPANY_SUFFIXES))
        )
        return Person(name, random_cnpj(rng))
    middle = rng.choice(LAST_NAMES)
    last = rng.choice([n for n in LAST_NAMES if n != middle])
    return Person(f"{rng.choice(FIRST_NAMES)} {middle} {last}", random_cpf(rng))


def random_amount(rng):
    """Return a random invoice amount in integer cents, between MIN_AMOUNT and MAX_AMOUNT.

    Drawn log-uniformly, then rounded to whole reais most of the time, as real bills are.
    """
    value = int(MIN_AMOUNT * (MAX_AMOUNT / MIN_AMOUNT) ** rng.random())
    if rng.random() < 0.7:
        value -= value % 100
    return max(MIN_AMOUNT, min(MAX_AMOUNT, value))
