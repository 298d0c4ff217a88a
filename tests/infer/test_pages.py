"""The page allocator: reference counts, prefix lookup by chained keys, least-recently-released
eviction of cached pages, tail first."""

from llama_jax.infer.pages import PageAllocator, page_keys


def test_page_keys_chain_every_earlier_token():
    a = page_keys([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # the 7th token's page is not full
    assert page_keys([1, 2, 3, 4, 5, 6], 2)[:2] == a[:2]
    b = page_keys([9, 2, 3, 4], 2)
    assert b[0] != a[0] and b[1] != a[1]  # equal page tokens after a different first page
    assert page_keys([1, 2, 3, 4, 5, 6], 2, first=1, parent=a[0]) == a[1:]


def test_shared_pages_are_held_until_the_last_holder_releases_them():
    pages = PageAllocator(4)
    keys = page_keys(list(range(6)), 2)
    first = [pages.allocate() for _ in range(3)]
    for page, key in zip(first, keys):
        pages.register(page, key)
    assert pages.lookup(keys[:2] + [b"other"]) == first[:2]
    assert (pages.used, pages.available()) == (3, 1)
    pages.release(first)
    assert (pages.used, pages.cached, pages.available()) == (2, 1, 2)  # first[2] is only cached
    pages.release(first[:2])
    assert (pages.used, pages.cached, pages.available()) == (0, 3, 4)


def test_eviction_takes_the_free_pages_first_then_the_oldest_released_tail_first():
    pages = PageAllocator(5)
    a_keys, b_keys = page_keys([1] * 4, 2), page_keys([2] * 4, 2)
    a, b = [pages.allocate() for _ in range(2)], [pages.allocate() for _ in range(2)]
    for page, key in zip(a + b, a_keys + b_keys):
        pages.register(page, key)
    pages.release(a)
    pages.release(b)
    assert pages.allocate() == 4  # the one never used
    assert pages.allocate() == a[1]  # a's tail, released first of the oldest prefix
    assert pages.lookup(a_keys) == [a[0]]  # a's head is still cached
    assert pages.allocate() == b[1]
    assert pages.lookup(b_keys) == [b[0]]
    assert pages.allocate() is None  # every page is held


def test_grow_adds_free_pages_after_the_existing_ones_and_keeps_the_cache():
    pages = PageAllocator(3)
    held = [pages.allocate() for _ in range(2)]
    key, = page_keys([7, 7], 2)
    pages.register(held[0], key)
    pages.release(held[:1])  # cached, evictable
    pages.grow(2)
    assert (pages.num_pages, pages.available(), pages.used) == (5, 4, 1)
    assert [pages.allocate() for _ in range(3)] == [2, 3, 4]  # the old free page, then the new ones
    assert pages.lookup([key]) == [held[0]]
    assert pages.allocate() is None
