"""Placeholder: the asym family is being written."""
FAMILY = "asym"
VARIANTS = {}


def matches(sd):
    return False
