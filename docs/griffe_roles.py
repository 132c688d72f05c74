"""A griffe extension for the API pages: the docstrings' reST roles (``:func:`name```, ``:class:`~pkg.Cls```)
become Markdown code (the name, or its last part after ``~``), as a reader of the source sees them."""
from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`(~?)([\w.]+)`")


def markdown(text: str) -> str:
    return ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


class ReSTRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
