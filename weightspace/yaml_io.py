"""The one way this project reads YAML: bounded, safe, and with errors that name the file.

    text = read_yaml_file("spec.yaml")                  # at most MAX_BYTES, UTF-8, or a SpecError
    data, node = load_yaml(text, "spec.yaml")           # one document: (data, its node tree)
    docs = load_yaml_documents(text, "stages.yaml")     # every document of a `---` stream

Every spec, zoo spec, multi-stage file, stored zoo.yaml, recorded recipe and command-line
YAML value goes through here, so each gets the same guarantees:

- PyYAML's safe loader (no Python objects), reading `1e-6` as a number as mergekit configs mean it;
- a key given twice in one mapping is refused, naming the key and both lines (PyYAML keeps the
  last one silently, so `merge_method: ties` then `merge_method: linear` would run linear);
- nesting deeper than MAX_DEPTH is refused before the recursive composer gets there;
- aliases may not grow a document past MAX_EXPANDED (values plus characters, counted as if
  every alias were written out), so an alias bomb ("billion laughs") is refused while it is
  read, in time linear in the file, and no later walk over the data (a duplicate check, a
  recipe written into metadata) can become exponential; an alias inside its own anchor
  (a self-containing list) is refused too;
- a file is read up to MAX_BYTES, never more, and must be UTF-8 text.

Every refusal is a SpecError: `FILE: line N: what is wrong`, one line, no file contents.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from weightspace.errors import SpecError

MAX_BYTES = 4 * 2**20
MAX_DEPTH = 100
MAX_EXPANDED = 8 * 2**20


class _Refused(Exception):
    def __init__(self, message: str, mark: yaml.Mark | None = None):
        super().__init__(message)
        self.message, self.mark = message, mark


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the checks of this module's docstring.

    Sizes are counted on the parser's events as the composer takes them: each scalar is
    1 + its length, each collection 1 + its contents, each alias the size of its anchor."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._open: list[list[Any]] = []        # [anchor, size] of each collection being read
        self._sizes: dict[str, int] = {}        # finished anchors -> expanded size
        self._total = 0

    def get_event(self):  # noqa: ANN201 - PyYAML's signature
        event = super().get_event()
        self._count(event)
        return event

    def _count(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.DocumentStartEvent):
            self._open, self._sizes, self._total = [], {}, 0
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(self._open) >= MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            self._open.append([event.anchor, 1])
            self._add(1, event, to_parent=False)
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, size = self._open.pop()
            if anchor is not None:
                self._sizes[anchor] = size
            if self._open:
                self._open[-1][1] += size
        elif isinstance(event, yaml.ScalarEvent):
            size = 1 + len(event.value)
            if event.anchor is not None:
                self._sizes[event.anchor] = size
            self._add(size, event)
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in self._open):
                raise _Refused(f"alias *{event.anchor} is inside its own anchor (a collection that "
                               f"contains itself)", event.start_mark)
            size = self._sizes.get(event.anchor)
            if size is not None:  # an undefined alias: the composer says so
                self._add(size, event)

    def _add(self, size: int, event: yaml.Event, to_parent: bool = True) -> None:
        if to_parent and self._open:
            self._open[-1][1] += size
        self._total += size
        if self._total > MAX_EXPANDED:
            how = f" by alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else ""
            raise _Refused(f"the document grows past {MAX_EXPANDED:,} values and characters{how}; "
                           f"aliases may not multiply a YAML file's size", event.start_mark)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: explicit keys override merged ones, as YAML means
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable: PyYAML's own error follows
                if first is not key_node:
                    a, b = first.start_mark.line + 1, key_node.start_mark.line + 1
                    where = f"lines {a} and {b}" if a != b else f"twice on line {a}"
                    raise _Refused(f"key {_short(key)!r} is given twice ({where}); keep one")
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to read integers of more than 4300 digits
            raise _Refused(f"an integer of {len(node.value):,} characters is too long to read",
                           node.start_mark) from None


YamlLoader.add_constructor("tag:yaml.org,2002:int", YamlLoader.construct_yaml_int)
YamlLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# YAML 1.1 (PyYAML) makes a float without a dot a string, so `epsilon: 1e-6` from a mergekit
# config would be refused
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _line(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}: " if mark is not None else ""


def load_yaml_documents(text: str, source: str) -> list[tuple[Any, yaml.Node | None]]:
    """Every document of a YAML stream, (data, node tree) each, empty ones included as (None, None)."""
    loader = None
    out: list[tuple[Any, yaml.Node | None]] = []
    try:
        loader = YamlLoader(text)  # (the reader checks for unprintable characters here)
        while loader.check_node():
            node = loader.get_node()
            out.append((loader.construct_document(node), node))
    except _Refused as e:
        raise SpecError(f"{source}: {_line(e.mark)}{e.message}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = e.problem or e.context or "cannot be read"
        raise SpecError(f"{source}: not valid YAML: {_line(mark)}{_short(what, 200)}") from None
    except yaml.reader.ReaderError as e:
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise SpecError(f"{source}: not valid YAML: character {e.position} is {char}, which YAML "
                        f"does not allow") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {_short(str(e).splitlines()[0], 200)}") from None
    except RecursionError:  # MAX_DEPTH is checked first; this is a last resort (a deep caller)
        raise SpecError(f"{source}: nested too deeply to read") from None
    finally:
        if loader is not None:
            loader.dispose()
    return out


def load_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The first document of a YAML text (data, node tree); (None, None) when it is empty.
    A second document is refused: a file meant as one spec holds one."""
    docs = load_yaml_documents(text, source)
    if len(docs) > 1:
        raise SpecError(f"{source}: holds {len(docs)} YAML documents (separated by ---); give one")
    return docs[0] if docs else (None, None)


def safe_load(text: str, source: str) -> Any:
    """The data of a one-document YAML text (a recorded recipe, a command-line value)."""
    return load_yaml(text, source)[0]


def read_yaml_file(path: str | Path, what: str = "spec") -> str:
    """The text of a YAML file: at most MAX_BYTES, UTF-8; a SpecError naming the file otherwise."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise SpecError(f"{p}: cannot read {what}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise SpecError(f"{p}: {what} is larger than {MAX_BYTES // 2**20} MiB; a YAML file this size "
                        f"is not a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SpecError(f"{p}: {what} is not UTF-8 text (byte {e.start}, line {line}: "
                        f"{e.reason}); save it as UTF-8") from None


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_EXPANDED", "YamlLoader", "load_yaml", "load_yaml_documents",
           "read_yaml_file", "safe_load"]
