"""Stark Bank invoicing service: issues invoices on a schedule, forwards credited money.

Importing the package starts nothing; ``python -m stark_challenge`` does (see ``__main__``).
"""

__version__ = "0.1.0"
