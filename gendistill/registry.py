"""Named registries: a dict and a decorator, plus entries other packages add via entry points.

Another package adds an entry by declaring, in its own pyproject.toml::

    [project.entry-points."gendistill.plugins"]
    my_teacher = "my_pkg.teachers"   # importing the module runs its @register decorators
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, TypeVar

T = TypeVar("T")
_plugins_loaded = False


class Registry(dict):
    """A dict of name -> entry for one kind of thing ("render backend", "teacher", ...)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REG.register("name")` adds the decorated object under `name`."""

        def add(obj: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self[name] = obj
            return obj

        return add

    def get_entry(self, name: str):
        """The entry called `name`, loading plugin entry points first; a clear error if unknown."""
        load_plugins()
        if name not in self:
            known = ", ".join(sorted(self)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}")
        return self[name]


def load_plugins() -> None:
    """Import every module named in the `gendistill.plugins` entry-point group, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group="gendistill.plugins"):
        ep.load()
