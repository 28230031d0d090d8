"""Placeholder: the tiny family is being written."""
FAMILY = "tiny"
VARIANTS = {}


def matches(sd):
    return False
