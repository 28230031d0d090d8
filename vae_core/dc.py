"""Placeholder: the dc family is being written."""
FAMILY = "dc"
VARIANTS = {}


def matches(sd):
    return False
