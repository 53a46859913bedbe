"""YAML read from users (experiment files, sites.yml, stages files, a run's settings), bounded.

PyYAML's safe loader builds no objects but plain ones, yet aliases let a few hundred bytes
stand for billions of values: ``b: [*a, *a, ...]`` nine levels deep ("billion laughs"),
or merge keys ``<<: [*a, *a]`` that copy whole mappings. Parsing keeps them shared and
fast; what comes after (a message's repr, a deepcopy, a JSON dump, merging) walks every
copy, and took 40 s and 3 GB before a MemoryError in the issue that found it (#23).

So the document is measured as composed, before any value is built: its node count and its
characters (every scalar weighs its length, keys included), with every alias counted as the
whole subtree it stands for. Counting nodes alone lets one 100 KB string aliased 9000 times
(``b: [*x, *x, ...]``) pass as 9000 values and expand to a gigabyte. Above
defaults.YAML_MAX_NODES values or defaults.YAML_MAX_CHARS characters, or an alias inside the
node it names, or brackets nested over MAX_FLOW_DEPTH deep, or block nesting deeper than
Python's recursion allows, is a :class:`YamlTooLarge` (a yaml.YAMLError, so the callers' ``except yaml.YAMLError``
already turns it into their one-line "not valid YAML" message). Ordinary anchors and
aliases (a shared block reused a few times) still load.
"""

from __future__ import annotations

import yaml

from . import defaults as D


class YamlTooLarge(yaml.YAMLError):
    """A YAML document that expands beyond the node limit, refers to itself, or nests too deeply."""


class YamlValueError(yaml.YAMLError):
    """A scalar PyYAML's constructors cannot turn into a value: an integer of more than 4300 digits (Python's
    limit on converting text to int) or a date such as 2024-13-45. They raise a plain ValueError, which the
    callers' ``except yaml.YAMLError`` would not catch."""


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_expanded_size(root, limit: int, char_limit: int | None = None) -> int:
    """The nodes *root* stands for with every alias expanded; YamlTooLarge above *limit* nodes, above
    *char_limit* characters of scalars (None: no character bound) or on a cycle.

    Shared nodes (aliases) are measured once and counted at each use, so the walk costs the
    document's own size, not the expansion's; iterative, so deep nesting cannot overflow the stack.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, characters) once expanded
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            children = [sizes[id(child)] for child in _children(node)]
            size = 1 + sum(nodes for nodes, _ in children)
            chars = len(node.value) if isinstance(node, yaml.ScalarNode) else sum(chars for _, chars in children)
            if size > limit:
                raise YamlTooLarge(f"the value starting at line {_line(node)} expands to more than {limit:,} values "
                                   "once its aliases (*name) are expanded; write the values out instead")
            if char_limit is not None and chars > char_limit:
                raise YamlTooLarge(f"the value starting at line {_line(node)} expands to more than {char_limit:,} "
                                   "characters once its aliases (*name) are expanded; write the values out instead")
            sizes[key] = (size, chars)
            continue
        if key in sizes:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise YamlTooLarge(f"the alias at line {_line(child)} refers to a value that contains it "
                                   "(a recursive alias)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)][0]


def _line(node) -> int | str:
    return node.start_mark.line + 1 if node.start_mark else "?"


MAX_FLOW_DEPTH = D.YAML_MAX_FLOW_DEPTH  # brackets nested deeper are refused as they are scanned


class BoundedMixin:
    """Checks each composed document's expanded size before a value is constructed from it,
    and the nesting of [ ] and { } as they are scanned."""

    max_nodes = D.YAML_MAX_NODES
    max_chars = D.YAML_MAX_CHARS

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_FLOW_DEPTH:
            raise YamlTooLarge(f"brackets nested more than {MAX_FLOW_DEPTH} deep at line {self.line + 1}")
        super().fetch_flow_collection_start(TokenClass)

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            check_expanded_size(node, self.max_nodes, self.max_chars)
        return node


class BoundedSafeLoader(BoundedMixin, yaml.SafeLoader):
    """yaml.SafeLoader with the expanded-size bound."""


def load(text, Loader=BoundedSafeLoader, *, generated: bool = False):
    """The one YAML document in *text*, as yaml.load with *Loader* (any SafeLoader subclass; given one
    without the bound, e.g. a loader that refuses duplicate keys, it gets the bound added).

    *generated*: *text* is a file a program wrote that grows with the data (a workflow's catalogs
    list every input file), so the bounds are at least its own length: any size written out loads,
    but aliases still cannot expand it beyond what its text holds.
    """
    if not issubclass(Loader, yaml.SafeLoader):
        raise TypeError(f"{Loader.__name__} is not a yaml.SafeLoader: it could build arbitrary objects")
    if not issubclass(Loader, BoundedMixin):
        Loader = type(f"Bounded{Loader.__name__}", (BoundedMixin, Loader), {})
    if generated:
        Loader = type(Loader.__name__, (Loader,), {"max_nodes": max(Loader.max_nodes, len(text)),
                                                    "max_chars": max(Loader.max_chars, len(text))})
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass (module docstring)
    except RecursionError:
        raise YamlTooLarge("nested too deeply to be read (lists or mappings hundreds of levels deep)") from None
    except ValueError as problem:
        raise YamlValueError(f"a value cannot be read: {problem}") from None
