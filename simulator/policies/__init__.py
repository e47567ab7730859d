"""Policies behind three interfaces, chosen by name in the config:

- scheduling (`policies.scheduling`): order of the waiting queue, preemption victim;
- KV retention (`policies.retention`): what happens to a program's blocks at call end and
  during the tool gap;
- routing (`policies.routing`): which instance serves a call.

Each registry maps a name to a class; registering a name twice is an error.
"""

from __future__ import annotations


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type] = {}

    def register(self, name: str):
        def deco(cls):
            if name in self._classes:
                raise ValueError(f"{self.kind} policy '{name}' registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls
        return deco

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            from ..config import ConfigError
            raise ConfigError(f"unknown {self.kind} policy '{name}' (known: {', '.join(sorted(self._classes))})") from None

    def names(self) -> list[str]:
        return sorted(self._classes)
