"""YAML read from users (experiment files, sites.yml, stages files, a run's settings), bounded.

PyYAML's safe loader builds no objects but plain ones, yet aliases let a few hundred bytes
stand for billions of values: ``b: [*a, *a, ...]`` nine levels deep ("billion laughs"),
or merge keys ``<<: [*a, *a]`` that copy whole mappings. Parsing keeps them shared and
fast; what comes after (a message's repr, a deepcopy, a JSON dump, merging) walks every
copy, and took 40 s and 3 GB before a MemoryError in the issue that found it (#23).

So the document is measured as composed, before any value is built: its node count with
every alias counted as the whole subtree it stands for. Above defaults.YAML_MAX_NODES,
or an alias inside the node it names, or brackets nested over MAX_FLOW_DEPTH deep, or block
nesting deeper than Python's recursion allows,
is a :class:`YamlTooLarge` (a yaml.YAMLError, so the callers' ``except yaml.YAMLError``
already turns it into their one-line "not valid YAML" message). Ordinary anchors and
aliases (a shared block reused a few times) still load.
"""

from __future__ import annotations

import yaml

from . import defaults as D


class YamlTooLarge(yaml.YAMLError):
    """A YAML document that expands beyond the node limit, refers to itself, or nests too deeply."""


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_expanded_size(root, limit: int) -> int:
    """The nodes *root* stands for with every alias expanded; YamlTooLarge above *limit* or on a cycle.

    Shared nodes (aliases) are measured once and counted at each use, so the walk costs the
    document's own size, not the expansion's; iterative, so deep nesting cannot overflow the stack.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            size = 1 + sum(sizes[id(child)] for child in _children(node))
            if size > limit:
                line = node.start_mark.line + 1 if node.start_mark else "?"
                raise YamlTooLarge(f"the value starting at line {line} expands to more than {limit:,} values once "
                                   "its aliases (*name) are expanded; write the values out instead")
            sizes[key] = size
            continue
        if key in sizes:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                line = child.start_mark.line + 1 if child.start_mark else "?"
                raise YamlTooLarge(f"the alias at line {line} refers to a value that contains it (a recursive alias)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


# Brackets nested deeper than this are refused as they are scanned: PyYAML's scanner does work in
# proportion to the depth for every token, so 5000 "[" cost 3 s and a file of them hours, and its
# composer recurses once per level (Python's stack ends near 1000).
MAX_FLOW_DEPTH = 100


class BoundedMixin:
    """Checks each composed document's expanded size before a value is constructed from it,
    and the nesting of [ ] and { } as they are scanned."""

    max_nodes = D.YAML_MAX_NODES

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_FLOW_DEPTH:
            raise YamlTooLarge(f"brackets nested more than {MAX_FLOW_DEPTH} deep at line {self.line + 1}")
        super().fetch_flow_collection_start(TokenClass)

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            check_expanded_size(node, self.max_nodes)
        return node


class BoundedSafeLoader(BoundedMixin, yaml.SafeLoader):
    """yaml.SafeLoader with the expanded-size bound."""


def load(text, Loader=BoundedSafeLoader):
    """The one YAML document in *text*, as yaml.load with *Loader* (any SafeLoader subclass; given one
    without the bound, e.g. a loader that refuses duplicate keys, it gets the bound added)."""
    if not issubclass(Loader, yaml.SafeLoader):
        raise TypeError(f"{Loader.__name__} is not a yaml.SafeLoader: it could build arbitrary objects")
    if not issubclass(Loader, BoundedMixin):
        Loader = type(f"Bounded{Loader.__name__}", (BoundedMixin, Loader), {})
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass (module docstring)
    except RecursionError:
        raise YamlTooLarge("nested too deeply to be read (lists or mappings hundreds of levels deep)") from None
