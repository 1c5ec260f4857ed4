"""YAML as users write it, read strictly: a key given twice in one mapping is an error naming both
lines (PyYAML keeps the last silently: a second ``train:`` section would replace the first), and
aliases (``*name``) are refused, so that no file can expand into more than it spells out (an
"alias bomb" of a few lines expands to billions of values when anything walks it). Values in
messages are shown cut (:func:`shown`)."""

from __future__ import annotations

from typing import Any

import yaml

SHOWN_CHARACTERS = 120


def shown(value: Any) -> str:
    """``repr(value)``, cut to about SHOWN_CHARACTERS with the full length said."""
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[:SHOWN_CHARACTERS - 20]}... ({len(text):,} characters)"


class _StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases are not accepted (*{event.anchor[:40]}); write the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = first_line.get(key)
            except TypeError:  # unhashable: the base class says so, with its mark
                break
            line = key_node.start_mark.line + 1
            if earlier is not None:
                lines = f"lines {earlier} and {line}" if earlier != line else f"line {line}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {shown(key)} appears twice in one mapping ({lines}); keep one", key_node.start_mark)
            first_line[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` without duplicate keys or aliases; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
