"""The KV page allocator of the continuous-batching engine, with its prefix cache (host side only).

Pages are reference counted: a running sequence holds each page of its page table once, and a
page shared through the prefix cache is held by every sequence that reuses it. A full page whose
keys and values are written can be registered under the key of its tokens (`page_keys`: a hash
of every token up to the page's end, so equal keys mean equal contents at equal positions). When
its last holder lets go, a registered page is not freed but kept, evictable, in least-recently
released order; `allocate` takes a free page first and evicts the oldest of those otherwise.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np


def page_keys(tokens: Sequence[int], page_size: int, first: int = 0, parent: bytes = b"") -> list[bytes]:
    """Keys of the full pages first, first+1, ... of `tokens`; `parent` is page first-1's key."""
    keys = []
    for start in range(first * page_size, len(tokens) - page_size + 1, page_size):
        page = np.asarray(tokens[start:start + page_size], np.int64).tobytes()
        parent = hashlib.sha256(parent + page).digest()
        keys.append(parent)
    return keys


class PageAllocator:
    def __init__(self, num_pages: int, *, prefix_caching: bool = True):
        self.num_pages = num_pages
        self.prefix_caching = prefix_caching
        self.refs = np.zeros(num_pages, np.int32)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: page 0 is handed out first
        self._page_of: dict[bytes, int] = {}  # prefix key -> registered page
        self._key_of: dict[int, bytes] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # unheld, registered

    @property
    def used(self) -> int:
        """Pages held by at least one sequence."""
        return int(np.count_nonzero(self.refs))

    @property
    def cached(self) -> int:
        """Registered pages that no sequence holds (kept for reuse, evicted on demand)."""
        return len(self._evictable)

    def available(self) -> int:
        return len(self._free) + len(self._evictable)

    def grow(self, extra: int) -> None:
        """Add `extra` free pages, numbered after the existing ones."""
        self.refs = np.concatenate([self.refs, np.zeros(extra, np.int32)])
        self._free[:0] = range(self.num_pages + extra - 1, self.num_pages - 1, -1)  # handed out after the free ones
        self.num_pages += extra

    def allocate(self) -> int | None:
        """A page held once by the caller, or None when every page is held."""
        if self._free:
            page = self._free.pop()
        elif self._evictable:
            page, _ = self._evictable.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        return page

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The registered pages of the longest prefix of `keys`, each now held once more."""
        pages = []
        for key in keys if self.prefix_caching else ():
            page = self._page_of.get(key)
            if page is None:
                break
            self._evictable.pop(page, None)
            self.refs[page] += 1
            pages.append(page)
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """Hold pages that a sequence holds once more (the samples of one prompt share its full pages)."""
        for page in pages:
            self.refs[page] += 1

    def register(self, page: int, key: bytes) -> None:
        """Offer a held, full, written page to later sequences under `key` (a no-op when another
        page already holds those tokens)."""
        if self.prefix_caching and key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key

    def release(self, pages: Sequence[int]) -> None:
        """Let go of a sequence's pages (in page-table order). The tail is released first, so it
        is evicted first: a cached prefix loses its last pages before its first."""
        for page in reversed(pages):
            self.refs[page] -= 1
            if self.refs[page]:
                continue
            if page in self._key_of:
                self._evictable[page] = None
            else:
                self._free.append(page)


__all__ = ["PageAllocator", "page_keys"]
