"""Format conversion as data: every family keeps tables of key renames and tensor fixes; this applies them.

A rename table is a list of ``(regex, replacement)`` pairs applied in order to every key. A replacement may
use ``\\1``-style groups and ``{rev:N}``, the reversed index ``rev_count - 1 - group N`` (ldm numbers the
decoder's up blocks from the highest resolution, diffusers from the lowest).
A tensor-fix table is a list of ``(regex on the new key, function(tensor) -> tensor)`` pairs.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import torch

Renames = Iterable[tuple[str, str]]
TensorFixes = Iterable[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]


def squeeze_linear(t: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv weight (out, in, 1, 1) as a Linear weight (out, in)."""
    return t[:, :, 0, 0] if t.ndim == 4 else t


def rename_key(key: str, renames: Renames, rev_count: int | None = None) -> str:
    for pattern, template in renames:
        def expand(m: re.Match, template=template) -> str:
            t = re.sub(r"\{rev:(\d+)\}", lambda r: str(rev_count - 1 - int(m.group(int(r.group(1))))), template)
            return m.expand(t)
        key = re.sub(pattern, expand, key)
    return key


def rename_keys(sd: Mapping[str, torch.Tensor], renames: Renames, tensor_fixes: TensorFixes = (),
                rev_count: int | None = None) -> dict[str, torch.Tensor]:
    renames, tensor_fixes = list(renames), list(tensor_fixes)
    out = {}
    for key, value in sd.items():
        new = rename_key(key, renames, rev_count)
        for pattern, fix in tensor_fixes:
            if re.search(pattern, new):
                value = fix(value)
        out[new] = value
    return out


def replace_substrings(sd: Mapping[str, torch.Tensor], table: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Ordered plain-substring replacement on every key (the efficientvit -> diffusers recipe)."""
    table = list(table)
    out = {}
    for key, value in sd.items():
        for find, repl in table:
            key = key.replace(find, repl)
        out[key] = value
    return out


class WeightParts(tuple):
    """State dicts of several files that together make one model (a TAESD encoder file and decoder file)."""
