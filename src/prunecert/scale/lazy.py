"""`LazyRegions`: a region list that builds each region when asked, so a 10,000-region run does not
hold 10,000 regions (about 30 KB each for a 28x28 box) in memory at once: chunks build theirs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar, overload

T = TypeVar("T")


class LazyRegions(Sequence[T]):
    """`n` regions; item i is `make(i)`, built on every access (cheap: a data-set row and a box)."""

    def __init__(self, n: int, make: Callable[[int], T]):
        self._n, self._make = int(n), make

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(self._n))]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._make(index)
