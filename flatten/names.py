"""BigQuery-legal column and table names for flattened JSON keys.

Pure functions, no Beam. The rules (also in docs/flatten.md):

* A key is NFKD-decomposed and combining marks are dropped (``"Émile"`` ->
  ``"emile"``); other non-ASCII letters/digits become ``u<hex>`` (``"名"`` ->
  ``"u540d"``); everything is lower-cased (BigQuery column names are
  case-insensitive); every run of other characters becomes one ``_``; leading
  and trailing ``_`` are stripped.
* Consequently a normalised *segment* never starts or ends with ``_`` and never
  contains ``__``: ``__`` is only ever the nesting separator, user keys can never
  produce the envelope columns (``_event_id``, ``_row_id`` ...) and never hit
  BigQuery's reserved prefixes (``_PARTITION``, ``_TABLE_``, ``_FILE_``,
  ``_ROW_TIMESTAMP``, ``__ROOT__``, ``_COLIDENTIFIER``, ``_CHANGE_*``), which all
  start with ``_``.
* An empty result (``""``, ``"_"``, ``"!!"``) becomes ``empty``; a result
  starting with a digit gets the prefix ``n_`` (``"1st"`` -> ``"n_1st"``); a
  segment that looks like a schema-evolution variant suffix (``v_string``,
  ``v_int64_repeated`` ...) gets the prefix ``k_`` so ``amount.v_string`` can
  never collide with the variant column ``amount__v_string``.
* Full names longer than :data:`MAX_NAME` characters are cut and suffixed with
  ``_`` + 8 hex digits of the SHA-256 of the full name (room is left for the
  variant suffix under BigQuery's 300-character limit).
* Collisions inside one object (``"User Name"`` and ``"user_name"``, ``"A"`` and
  ``"a"``) are resolved independently of key order: the key that is already in
  normal form keeps the name, otherwise the smallest raw key (code-point order)
  does; every other colliding key gets ``_`` + 8 hex digits of the SHA-256 of
  its raw text. A key that collides with nothing always keeps its plain name.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

__all__ = ["MAX_NAME", "normalize_key", "resolve_keys", "join_name", "short_hash"]

#: Longest column/table name produced; BigQuery allows 300 and the longest
#: variant suffix (``__v_timestamp_repeated``) is 22 characters.
MAX_NAME = 272

_LEGAL = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*\Z")
_VARIANT_SEG = re.compile(r"v_(?:bool|int64|float64|numeric|string|timestamp|date|json)(?:_repeated)?\Z")
_ASCII_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

_cache: dict[str, str] = {}
_CACHE_MAX = 200_000


def short_hash(text: str, n: int = 8) -> str:
    """First ``n`` hex digits of SHA-256 of ``text`` (surrogates tolerated)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def _slow_normalize(key: str) -> str:
    out: list[str] = []
    for ch in unicodedata.normalize("NFKD", key):
        if ch in _ASCII_ALNUM:
            out.append(ch.lower())
        elif unicodedata.combining(ch):
            continue
        elif ch.isalnum():
            out.append(f"_u{ord(ch):04x}_")
        else:
            out.append("_")
    s = re.sub(r"_+", "_", "".join(out)).strip("_")
    if not s:
        return "empty"
    if s[0].isdigit():
        s = "n_" + s
    return s


def normalize_key(key: str) -> str:
    """Normalise one JSON key to a legal name segment (cached)."""
    r = _cache.get(key)
    if r is not None:
        return r
    if _LEGAL.match(key):
        r = key
    else:
        r = _slow_normalize(key)
    if _VARIANT_SEG.match(r):
        r = "k_" + r
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = r
    return r


def join_name(prefix: str, seg: str) -> str:
    """``prefix__seg`` (or ``seg`` at the top), shortened deterministically past MAX_NAME."""
    name = prefix + "__" + seg if prefix else seg
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9].rstrip("_") + "_" + short_hash(name)
    return name


def resolve_keys(keys: tuple[str, ...]) -> list[str]:
    """Normalised, collision-free segments for the keys of one object (same order)."""
    norm = [normalize_key(k) for k in keys]
    if len(set(norm)) == len(norm):
        return norm
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(norm):
        groups.setdefault(n, []).append(i)
    taken = {n for n in groups}
    losers: list[int] = []
    for n, idxs in groups.items():
        if len(idxs) == 1:
            continue
        exact = [i for i in idxs if keys[i] == n]
        winner = exact[0] if exact else min(idxs, key=lambda i: keys[i])
        losers.extend(i for i in idxs if i != winner)
    # Resolve losers in raw-key order so the outcome never depends on key order.
    for i in sorted(losers, key=lambda i: keys[i]):
        n, h = norm[i], hashlib.sha256(keys[i].encode("utf-8", "surrogatepass")).hexdigest()
        for width in (8, 16, 64):
            cand = f"{n}_{h[:width]}"
            if cand not in taken:
                break
        else:  # pragma: no cover - needs a SHA-256 collision
            j = 2
            while f"{n}_{h}_{j}" in taken:
                j += 1
            cand = f"{n}_{h}_{j}"
        taken.add(cand)
        norm[i] = cand
    return norm
