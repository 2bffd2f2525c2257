"""`--help` of every command: its own keys, and every config key with its default and the doc under its field.

The docs are read from the field docstrings of kdsearch/config/schema.py (the one place they are written), so the help
cannot drift from the config; a key that names a registry entry lists the entries registered (kdsearch.methods).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Sequence

from kdsearch.config import schema as config_module
from kdsearch.config.parse import flatten
from kdsearch.config.schema import Config

HELP_FLAGS = ("-h", "--help", "help")


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def _docs_under_fields(node: ast.ClassDef) -> dict[str, str]:
    docs = {}
    for field, after in zip(node.body, node.body[1:], strict=False):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal under that field in `cls`'s source (its doc, on one line)."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(node, ast.ClassDef)
    return _docs_under_fields(node)


def _field_docs() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the doc under that field, for every class of the config schema."""
    tree = ast.parse(inspect.getsource(config_module))
    return {(node.name, name): doc for node in tree.body if isinstance(node, ast.ClassDef)
            for name, doc in _docs_under_fields(node).items()}


def _owners(cls: type = Config, prefix: str = "") -> dict[str, tuple[str, str]]:
    """Dotted config key -> (the dataclass that declares it, its field name)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[str, str]] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_owners(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (cls.__name__, f.name)
    return out


def shown(value: object) -> str:
    """A default as it is typed on the command line."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def registered_names() -> dict[str, list[str]]:
    """Config keys whose value names a registry entry -> the names registered now, so that a new method's name
    shows in --help without a docstring to update."""
    from kdsearch.methods.bridges import BRIDGES
    from kdsearch.methods.bridges.ted import ACTIVATIONS, FILTERS
    from kdsearch.methods.layer_maps import LAYER_MAPS
    from kdsearch.methods.losses import DISTANCES, LOGIT_LOSSES, RELATION_LOSSES

    return {"distill.layer_map": LAYER_MAPS.names(), "distill.bridge": ["auto", *BRIDGES.names()],
            "distill.distance": DISTANCES.names(), "distill.logit_loss": LOGIT_LOSSES.names(),
            "ted.filter": FILTERS.names(), "ted.activation": ACTIVATIONS.names(),
            "relation.loss": RELATION_LOSSES.names()}


def config_reference(indent: str = "  ", columns: int = 118) -> str:
    """Every config key as `key=default  doc` (the doc wrapped under itself, then the registered names where the
    value names a registry entry), in the order of config.py."""
    docs, owners, names = _field_docs(), _owners(), registered_names()
    keys = [f"{key}={shown(default)}" for key, default in flatten(Config()).items()]
    width = max(map(len, keys)) + 2
    hang = " " * (len(indent) + width)
    lines = []
    for (key, owner), typed in zip(owners.items(), keys, strict=True):
        doc = docs.get(owner, "") + (f" One of: {', '.join(names[key])}." if key in names else "")
        head = f"{indent}{typed:<{width}}"
        lines += textwrap.wrap(doc, columns, initial_indent=head, subsequent_indent=hang) if doc else [head.rstrip()]
    return "\n".join(lines)


def command_help(usage: str, about: str, own: Sequence[tuple[str, str]], *, config_keys: bool = True) -> str:
    """The help of one command: usage line, what it does, its own keys, then (optionally) every config key."""
    width = max((len(k) for k, _ in own), default=0) + 2
    parts = [usage, "", about]
    if own:
        parts += ["", "keys:"]
        for key, text in own:
            parts += textwrap.wrap(text, 118, initial_indent=f"  {key:<{width}}",
                                   subsequent_indent=" " * (width + 2)) if text else [f"  {key}"]
    if config_keys:
        parts += ["", "config keys (key=value; the same names as the search spaces and the MLflow params;",
                  "config=<file.yaml> reads a file of them first, e.g. a best student's kdsearch_config.yaml):",
                  config_reference()]
    return "\n".join(parts)
