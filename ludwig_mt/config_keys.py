"""The one check of every key in a task YAML: Ludwig 0.17.10's schema accepts unknown keys silently.

``trainer.epochz: 3`` trains for Ludwig's default 3 epochs without a word (its JSON schema leaves
``additionalProperties`` open and its config classes drop what they do not declare). So the project checks the
whole YAML against a committed snapshot of the keys Ludwig's own LLM schema declares,
``ludwig_mt/ludwig_llm_keys.json``, derived from ``ludwig.config_validation.validation.get_schema("llm")`` by
:func:`key_tree` and regenerated with ``python -m ludwig_mt.config --write-key-schema`` (a test checks the snapshot
is what the installed Ludwig gives). Keys the project itself adds join :data:`PROJECT_SECTIONS`, not the snapshot.

A node of the tree is ``True`` (any keys below: a free-form mapping such as ``backend`` in Ludwig 0.17.10) or a
mapping with ``keys`` (name -> node), ``items`` (the node of a list's elements) and ``cases`` (discriminator field
-> its default and value -> node: the keys of ``trainer`` depend on ``trainer.type``, a feature's on its
``type``); ``None`` is a leaf.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ludwig_mt.errors import WorkflowError
from ludwig_mt.io import atomic_write_text
from ludwig_mt.strategies import declared_backend

KEY_SCHEMA_FILE = Path(__file__).resolve().parent / "ludwig_llm_keys.json"

Node = Any  # None (a leaf), True (any keys below) or {"keys": {...}, "items": node, "cases": {...}}

#: top-level sections the project reads itself (not Ludwig), with their key trees; merged over Ludwig's snapshot.
#: The ``backend:`` section (issue #18) is one: Ludwig 0.17.10 takes any mapping there, so :func:`check_keys` hands
#: it to :func:`ludwig_mt.strategies.declared_backend`, which knows its keys and values (DeepSpeed's own keys pass).
PROJECT_SECTIONS: dict[str, Node] = {}


# ----------------------------------------------------------------------------------- building the tree (once)
def merge(a: Node, b: Node) -> Node:
    """The union of two nodes: every key either allows, and ``True`` (anything) wins. Pure."""
    if a is None or b is None:
        return b if a is None else a
    if a is True or b is True:
        return True
    out: dict[str, Any] = {}
    keys = {**a.get("keys", {})}
    for name, node in b.get("keys", {}).items():
        keys[name] = merge(keys[name], node) if name in keys else node
    if keys:
        out["keys"] = keys
    items = merge(a.get("items"), b.get("items"))
    if items is not None:
        out["items"] = items
    cases: dict[str, Any] = {}
    for source in (a.get("cases", {}), b.get("cases", {})):
        for field, case in source.items():
            into = cases.setdefault(field, {"default": case.get("default"), "by": {}})
            if into["default"] is None:
                into["default"] = case.get("default")
            for value, node in case["by"].items():
                into["by"][value] = merge(into["by"].get(value), node)
    if cases:
        out["cases"] = cases
    return out


def _discriminator(condition: Mapping[str, Any]) -> tuple[str, Any] | None:
    """``{"properties": {"type": {"const": "lora"}}}`` -> ``("type", "lora")``; None for other conditions."""
    props = condition.get("properties") or {}
    if len(props) == 1:
        (field, rule), = props.items()
        if isinstance(rule, Mapping) and "const" in rule:
            return field, rule["const"]
    return None


def key_tree(schema: Mapping[str, Any]) -> Node:
    """The key tree of a JSON schema (Ludwig's: inlined, no ``$ref``): properties, list items, ``oneOf``/``anyOf``
    branches merged, ``allOf`` ``if type == X then ...`` kept as cases of the discriminator. Pure."""
    if not isinstance(schema, Mapping):
        return None
    node: Node = None
    kinds = schema.get("type")
    kinds = set(kinds) if isinstance(kinds, list) else {kinds}
    props = schema.get("properties")
    if isinstance(props, Mapping) and props:
        node = merge(node, {"keys": {name: key_tree(sub) for name, sub in props.items()}})
    if isinstance(schema.get("items"), Mapping):
        items = key_tree(schema["items"])
        if items is not None:
            node = merge(node, {"items": items})
    for branch in (schema.get("oneOf") or []) + (schema.get("anyOf") or []):
        node = merge(node, key_tree(branch))
    for part in [schema] + list(schema.get("allOf") or []):
        found = _discriminator(part.get("if") or {}) if "then" in part else None
        if found is None:
            if part is not schema:
                node = merge(node, key_tree(part))
            continue
        field, value = found
        default = ((props or {}).get(field) or {}).get("default")
        then = key_tree(part["then"]) or {}
        node = merge(node, {"cases": {field: {"default": default, "by": {str(value): then}}}})
    if node is None and "object" in kinds and schema.get("additionalProperties", True) is not False:
        return True  # a mapping without declared keys: free-form
    return node


def ludwig_key_tree() -> Node:
    """The key tree of the installed Ludwig's JSON schema for LLM configs."""
    from ludwig.config_validation.validation import get_schema

    return key_tree(get_schema(model_type="llm"))


def write_key_schema(path: Path = KEY_SCHEMA_FILE) -> Path:
    """Regenerate the committed snapshot from the installed Ludwig (after an upgrade of Ludwig)."""
    import ludwig

    tree = ludwig_key_tree()
    atomic_write_text(path, json.dumps({"ludwig": ludwig.__version__, "tree": tree}, sort_keys=True, indent=1) + "\n")
    return path


def load_key_schema(path: Path = KEY_SCHEMA_FILE) -> Node:
    """The committed snapshot with :data:`PROJECT_SECTIONS` merged in (no Ludwig import: cheap)."""
    tree = json.loads(path.read_text(encoding="utf-8"))["tree"]
    keys = dict(tree.get("keys", {}))
    keys.update(PROJECT_SECTIONS)
    return {**tree, "keys": keys}


# ------------------------------------------------------------------------------------------------ checking
def allowed_here(value: Mapping[str, Any], node: Node) -> Node:
    """The node for the mapping ``value``: its own keys, plus those of the case its discriminators select (every
    case when the value names none known: Ludwig's schema then rejects the value itself)."""
    here = {"keys": node.get("keys", {})}
    for field, case in node.get("cases", {}).items():
        chosen = value.get(field, case.get("default"))
        if chosen is not None and str(chosen) in case["by"]:
            here = merge(here, case["by"][str(chosen)])
        else:
            for sub in case["by"].values():
                here = merge(here, sub)
    return here


def unknown_keys(value: Any, node: Node, path: str = "") -> list[tuple[str, list[str]]]:
    """Every key of ``value`` the tree ``node`` does not declare: (dotted path, the keys allowed there). Pure."""
    if node is None or node is True:
        return []
    found: list[tuple[str, list[str]]] = []
    if isinstance(value, Mapping):
        here = allowed_here(value, node)
        if here is True:
            return []
        keys = here.get("keys", {})
        for name, sub in value.items():
            where = f"{path}.{name}" if path else str(name)
            if name not in keys:
                found.append((where, sorted(keys)))
            else:
                found.extend(unknown_keys(sub, keys[name], where))
    elif isinstance(value, list) and node.get("items") is not None:
        for i, element in enumerate(value):
            found.extend(unknown_keys(element, node["items"], f"{path}[{i}]"))
    return found


def check_keys(config: Mapping[str, Any], source: str, tree: Node | None = None) -> None:
    """Refuse a config with a key Ludwig 0.17.10's LLM schema does not declare (nor the project adds): one line
    naming the first such key, a close match if there is one, and the fix."""
    problems = unknown_keys(config, load_key_schema() if tree is None else tree)
    if not problems:
        declared_backend(config, source)  # the project's own section: its keys and values, one line each
        return
    where, allowed = problems[0]
    name = where.rsplit(".", 1)[-1].split("[")[0]
    close = difflib.get_close_matches(name, allowed, n=1)
    fix = f"rename it to '{close[0]}'" if close else \
        f"remove it (keys there: {', '.join(allowed[:12])}{', ...' if len(allowed) > 12 else ''})"
    more = f" ({len(problems) - 1} more unknown key(s))" if len(problems) > 1 else ""
    raise WorkflowError(f"{source}: unknown key '{where}'{more}, which Ludwig 0.17.10 would ignore silently. "
                        f"Fix: {fix}")
