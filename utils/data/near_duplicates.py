"""Near duplicates among a data set's images by perceptual hash (utils/data/validation.py): the pairs within a
Hamming distance, found by multi-index hashing, and each image's nearest near duplicate.

The images of one hash value (copies of a placeholder photo, blank frames, one picture saved at several sizes) are
searched as one: every pair of such a crowd is within any distance, so searching them one by one yielded all its
pairs (a crowd of 4,000: 8 million pairs, 54 s, each kept in a set; 10,000 would be 50 million, ~6 GB).
"""

from __future__ import annotations

import heapq

import numpy as np


def near_duplicates(hashes: np.ndarray, names: list[str], max_distance: int):
    """(links, nearest) for images of 64-bit perceptual *hashes* (np.uint64) and file *names* (distinct): *links*,
    (i, j) pairs of image positions whose union joins every two images within *max_distance* bits of each other;
    *nearest*, for each image with a near duplicate, (distance, name) of its nearest (ties: first by name), as
    the smallest over every pair of the search would give it.

    Per image a record, not per pair: looking for an image's nearest among its group's members was quadratic in
    the group (a chain of 8,000 burst photos, each near the next only: 64 million steps)."""
    values, inverse = np.unique(hashes, return_inverse=True)
    members: list[list[int]] = [[] for _ in values]
    for index, value in enumerate(inverse.reshape(-1).tolist()):
        members[value].append(index)
    firsts = [heapq.nsmallest(2, (names[i] for i in group)) for group in members]  # nearest of its own value
    links = [(group[0], i) for group in members for i in group[1:]]
    best: dict[int, tuple[int, str]] = {}  # per hash value: the nearest image of another value
    for u, v, distance in _hamming_pairs(values, max_distance):
        links.append((members[u][0], members[v][0]))
        for value, other in ((u, v), (v, u)):
            found = (distance, firsts[other][0])
            if value not in best or found < best[value]:
                best[value] = found
    nearest = {}
    for value, group in enumerate(members):
        for i in group:
            found = [best[value]] if value in best else []
            if len(group) > 1:
                found.append((0, firsts[value][names[i] == firsts[value][0]]))
            if found:
                nearest[i] = min(found)
    return links, nearest


def _block_pairs(hashes: np.ndarray, index: np.ndarray, max_distance: int, max_cells: int = 1 << 22):
    """(i, j, distance) for all pairs of *index* (positions into *hashes*) within *max_distance*, i < j,
    comparing row blocks against the rest so that no block holds more than *max_cells* distances."""
    sub = hashes[index]
    n = len(sub)
    block = max(1, max_cells // max(n, 1))
    for start in range(0, n, block):
        rows = sub[start:start + block]
        distances = np.bitwise_count(rows[:, None] ^ sub[None, start:])  # only columns >= start
        for r, c in zip(*np.nonzero(distances <= max_distance)):
            a, b = start + int(r), start + int(c)
            if a < b:
                yield int(index[a]), int(index[b]), int(distances[r, c])


def _hamming_pairs(hashes: np.ndarray, max_distance: int):
    """Yield (i, j, distance) for i < j with Hamming distance <= max_distance, each pair once.

    Multi-index hashing instead of all n^2 comparisons: the 64 bits are cut into
    max_distance + 1 bands, and two hashes that differ in at most max_distance bits agree
    exactly on at least one band (pigeonhole), so only hashes sharing a band value are
    compared. Near-linear for photo collections (100k images: seconds, not n^2 = 10^10).
    """
    n = len(hashes)
    if n < 2 or max_distance < 0:
        return
    if max_distance >= 16 or n <= 2048:  # bands too narrow to help, or too few hashes to bother
        yield from _block_pairs(hashes, np.arange(n), max_distance)
        return
    bands = max_distance + 1
    edges = [round(64 * b / bands) for b in range(bands + 1)]
    seen = set()
    for low, high in zip(edges, edges[1:]):
        keys = (hashes >> np.uint64(low)) & np.uint64((1 << (high - low)) - 1)
        order = np.argsort(keys, kind="stable")
        boundaries = np.flatnonzero(np.diff(keys[order])) + 1
        for group in np.split(order, boundaries):
            if len(group) < 2:
                continue
            for i, j, distance in _block_pairs(hashes, np.sort(group), max_distance):
                if (i, j) not in seen:
                    seen.add((i, j))
                    yield i, j, distance
