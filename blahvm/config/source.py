"""Read YAML into plain values while remembering where each value stood in the file.

PyYAML's node graph carries line numbers; its constructed objects do not. So we compose the
node graph ourselves and build plain dicts, lists and scalars, keeping a side table
``path -> line`` for error messages and the scalar's text as written (quantities are parsed
from that text, not from YAML 1.1's guesses: ``1:30`` is not the integer 90 to us).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import attrs
import yaml

Path = Tuple[Any, ...]

# A config is small; this bounds alias expansion ("billion laughs") and absurd inputs.
MAX_NODES = 100_000
MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 50  # a site config nests about 5 deep; this keeps building it far from Python's recursion limit

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "int", "float", "bool", "null"))


class SourceError(Exception):
    """The file is not readable YAML; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.line = line


@attrs.frozen
class Document:
    """Plain values plus where they came from."""

    data: Any
    lines: Dict[Path, int]  # 1-based line of each value and mapping key
    texts: Dict[Path, str]  # a plain scalar's text as written
    duplicates: Tuple[Tuple[Path, int], ...] = ()  # keys given twice (the first one counts)


def parse_yaml(text: str) -> Document:
    if len(text) > MAX_BYTES:
        raise SourceError(f"file is larger than {MAX_BYTES // 1024 // 1024} MiB; is it really a site config?")
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        raise SourceError(f"not valid YAML: {error.problem or error.context}", line) from None
    except yaml.YAMLError as error:
        raise SourceError(f"not valid YAML: {error}") from None
    except (ValueError, UnicodeError, RecursionError) as error:
        raise SourceError(f"not valid YAML: {error}") from None
    builder = _Builder()
    data = builder.build(node, ()) if node is not None else None
    return Document(data=data, lines=builder.lines, texts=builder.texts, duplicates=tuple(builder.duplicates))


class _Builder:
    def __init__(self) -> None:
        self.lines: Dict[Path, int] = {}
        self.texts: Dict[Path, str] = {}
        self.duplicates: List[Tuple[Path, int]] = []
        self.count = 0
        self.enclosing: List[yaml.Node] = []  # the nodes being built around the current one
        self.constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise SourceError(f"more than {MAX_NODES} values (aliases expanded); refusing to read it")
        line = node.start_mark.line + 1
        if node in self.enclosing:  # ``a: &a [*a]``: an alias inside the value it names
            raise SourceError("an alias refers to a value that contains it", line)
        if len(self.enclosing) >= MAX_DEPTH:
            raise SourceError(f"values nested more than {MAX_DEPTH} deep; refusing to read it", line)
        self.lines.setdefault(path, line)
        if node.tag not in _PLAIN_TAGS:
            raise SourceError(f"unsupported tag {node.tag!r}", line)
        self.enclosing.append(node)
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            return self._scalar(node, path)
        finally:
            self.enclosing.pop()

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict:
        result: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise SourceError("merge keys (<<) are not supported", key_node.start_mark.line + 1)
            if not isinstance(key_node, yaml.ScalarNode):
                raise SourceError("a mapping key must be a plain name", key_node.start_mark.line + 1)
            key = key_node.value  # keys are names: taken as written (``yes:`` is "yes", not True)
            if key in result:
                self.duplicates.append((path + (key,), key_node.start_mark.line + 1))
                continue
            self.lines[path + (key,)] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, path + (key,))
        return result

    def _scalar(self, node: yaml.ScalarNode, path: Path | None) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as error:
            raise SourceError(f"cannot read value {node.value!r}: {error}", node.start_mark.line + 1) from None
        if path is not None and not node.style:  # plain, unquoted
            self.texts[path] = node.value
        return value
