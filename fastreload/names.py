"""Source names to model names: an explicit rename, or the common wrappers a
checkpoint's names carry (DataParallel's ``module.``, torch.compile's ``_orig_mod.``,
a missing or extra ``model.``) recognised without user glue."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from fastreload.errors import ReloadError
from fastreload.regions import Target

__all__ = ["Renamed", "detect_wrappers", "renamer"]

# A rename gives a name, a Target, or several Targets (one source into several regions).
Rename = Callable[[str], "str | Target | tuple[Target, ...]"] | Mapping[str, "str | Target | tuple[Target, ...]"]

# Prefixes that wrap a whole model and say nothing about its layout.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def renamer(rename: Rename | None) -> Callable[[str], str] | None:
    """A callable as it is; a dict of prefix replacements ({"module.": "", "": "model."})
    as a function applying the longest matching prefix, where a Target value is for
    the one source name of its key (fused and sharded targets, see regions.py)."""
    if rename is None or callable(rename):
        return rename
    if isinstance(rename, Mapping):
        targets = {k: v for k, v in rename.items() if isinstance(v, (Target, tuple))}
        prefixes = sorted(((k, v) for k, v in rename.items() if k not in targets),
                          key=lambda item: len(item[0]), reverse=True)

        def replace_prefix(name: str) -> str | Target:
            target = targets.get(name)
            if target is not None:
                return target
            for old, new in prefixes:
                if name.startswith(old):
                    return new + name[len(old):]
            return name

        return replace_prefix
    raise TypeError(f"rename is a callable or a dict of prefix replacements, got {type(rename).__name__}")


def _strip_wrappers(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _candidates() -> Iterator[tuple[str, Callable[[str], str]]]:
    yield "stripped wrapper prefixes (module., _orig_mod.)", _strip_wrappers
    yield "added 'model.'", lambda n: "model." + _strip_wrappers(n)
    yield "stripped 'model.'", lambda n: _strip_wrappers(n).removeprefix("model.")


def detect_wrappers(names, known: Callable[[str], bool]) -> tuple[str, Callable[[str], str]] | None:
    """The first common wrapper under which every one of `names` is a name the model
    knows, or None."""
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        return None  # names the model cannot have: unexpected under any wrapper
    for description, rename in _candidates():
        if names and all(known(rename(n)) for n in names):
            return description, rename
    return None


class Renamed(Mapping[str, torch.Tensor]):
    """A source mapping seen under new names. Two names renamed to one is an error.
    Names renamed to a region Target are left out of the mapping, in `regions` as
    (target, source name) pairs. The names are renamed on first use: a reload with
    a cached plan of this rename (renamed_plan.py) reads `source` directly."""

    def __init__(self, source: Mapping[str, torch.Tensor], rename: Callable[[str], str | Target]) -> None:
        self.source = source
        self.rename = rename
        self._renamed: tuple[dict[str, str], list[tuple[Target, str]]] | None = None

    def _names(self) -> tuple[dict[str, str], list[tuple[Target, str]]]:
        if self._renamed is not None:
            return self._renamed
        original: dict[str, str] = {}
        regions: list[tuple[Target, str]] = []
        clashes = []
        rename = self.rename
        for name in self.source:
            new = rename(name)
            if isinstance(new, tuple):  # one source into several regions
                regions += ((target, name) for target in new)
                continue
            if isinstance(new, Target):
                if not new.is_plain:
                    regions.append((new, name))
                    continue
                new = new.name
            if new in original:
                clashes.append(f"{original[new]!r} and {name!r} both become {new!r}")
            original[new] = name
        if clashes:
            raise ReloadError(reason=f"rename maps several source names to one: {'; '.join(clashes[:5])}")
        self._renamed = original, regions
        return self._renamed

    @property
    def regions(self) -> list[tuple[Target, str]]:
        return self._names()[1]

    def originals(self):
        """(new name, source name) of every name not renamed to a region."""
        return self._names()[0].items()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source[self._names()[0][name]]

    def original(self, name: str) -> torch.Tensor:
        """The source tensor under its own name."""
        return self.source[name]

    def __iter__(self):
        return iter(self._names()[0])

    def __len__(self) -> int:
        return len(self._names()[0])
