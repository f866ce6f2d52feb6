"""Masking of annotated PII fields, applied to the parsed event before any sink.

Pure Python, no Beam. The ParseEnvelope step builds one :class:`Masker` per
partner in ``DoFn.setup`` and calls :meth:`Masker.mask_doc` on every parsed
document *before* envelope extraction and flattening, and
:meth:`Masker.protect_payload` / :meth:`Masker.protect_unparsed` on every
dead-letter payload, so no raw annotated value reaches any output or log.

Annotation paths address the ORIGINAL nested JSON: ``.`` between keys, ``*``
any key(s), ``[]`` list elements (``user.*.ssn``, ``accounts[].number``,
``tags[]``). Matching is deliberately generous, because a miss leaks PII, and
holds when a partner's shapes drift (see :class:`Masker` and docs/flatten.md):
paths are compared as *name tokens* (keys normalised like column names, split on
``_``), so ``SSN`` matches ``ssn``, ``e-mail`` matches ``e_mail``, and a literal
dotted key ``"user.ssn"`` matches ``user.ssn``; lists are transparent wherever
they occur (``[]`` is optional; an object where the contract says list, arrays
of arrays, a scalar where it says list all match). When several annotations hit
the same value the strongest policy wins: drop > redact (fewest characters kept)
> hash > tokenize. ``null`` values stay ``null``. A container nested more than
200 levels below a live annotation path is dropped rather than inspected
(bounded recursion; never passed through unmasked).

Policies (all keyed from one secret; sub-keys are derived with HMAC so the hash,
token and encryption keys are independent):

* ``hash``: hex HMAC-SHA256 of the value's text (strings: UTF-8; numbers/bools:
  JSON text; objects/arrays: JSON with sorted keys).
* ``tokenize``: ``tok_`` + 32 hex digits of an HMAC of the *canonical* value
  (strings stripped and case-folded, ``123``/``123.0``/``"123"`` equal), so the
  same identity gets the same token in every table and every partner sharing
  the masking key.
* ``redact``: ``"****"`` followed by the last ``keep_last`` characters, but never
  more than half of the value (``"123-45-6789"`` -> ``"****6789"``); objects,
  arrays and bools become ``"****"``.
* ``drop``: the key is removed (list elements are removed from the list).
"""
from __future__ import annotations

import base64
import hmac
import os
from hashlib import sha256
from typing import Any, NamedTuple, Optional, Sequence

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flatten import jsonio
from flatten.infer import JsonTextError, to_json_text
from flatten.names import normalize_key
from flatten.options import ColumnAnnotation, PiiPolicy

__all__ = ["MaskKeyError", "load_mask_key", "decode_mask_key", "Masker", "MaskRule", "compile_rule", "canonical_bytes", "ENC_PREFIX",
           "DEV_KEY"]

ENC_PREFIX = b"enc:v1:"
#: Fixed development key (``allow_dev_key``); never for real data.
DEV_KEY = b"headwater-development-mask-key--NOT-SECRET"
_MIN_KEY = 16
_AAD = b"headwater/dead-letter/v1"
_REDACT = "****"
#: Containers nested deeper than this along an annotated path are dropped (bounded recursion).
_MAX_MASK_DEPTH = 200
_STRENGTH = {PiiPolicy.DROP: 4, PiiPolicy.REDACT: 3, PiiPolicy.HASH: 2, PiiPolicy.TOKENIZE: 1}


class MaskKeyError(RuntimeError):
    """The masking key is missing or unusable. Terminal (fails at launch); never contains the key."""


def load_mask_key(key_env: str, key_file: Optional[str], allow_dev_key: bool) -> bytes:
    """The masking key from ``$key_env``, else ``key_file``, else the dev key if allowed.

    The value may be raw text (its UTF-8 bytes are the key) or ``base64:<...>`` /
    ``hex:<...>``; surrounding whitespace is ignored; at least 16 bytes.
    """
    raw = os.environ.get(key_env)
    if raw is not None:
        return _decode_key(raw.encode("utf-8", "surrogateescape"), f"environment variable {key_env}")
    if key_file:
        try:
            with open(key_file, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise MaskKeyError(f"masking key file {key_file!r} cannot be read: {exc.strerror}") from None
        return _decode_key(data, f"masking key file {key_file!r}")
    if allow_dev_key:
        return DEV_KEY
    where = f"environment variable {key_env} is unset" + ("" if key_file else " and no key_file is configured")
    raise MaskKeyError(f"no masking key: {where} (masking.allow_dev_key is false)")


def _decode_key(data: bytes, origin: str) -> bytes:
    data = data.strip()
    try:
        if data.startswith(b"base64:"):
            data = base64.b64decode(data[7:], validate=True)
        elif data.startswith(b"hex:"):
            data = bytes.fromhex(data[4:].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise MaskKeyError(f"{origin}: key is not valid base64/hex") from None
    if len(data) < _MIN_KEY:
        raise MaskKeyError(f"{origin}: key is shorter than {_MIN_KEY} bytes")
    return data


#: Pattern tokens for ``*``: exactly one name token, then any number more (never a real token: those are [a-z0-9]+).
_ANY = "*"
_ANYSTAR = "**"


class MaskRule(NamedTuple):
    """One annotation compiled for matching (public: the compiled accelerator builds its matcher from these).

    ``tokens``: the path's name tokens, ``None`` for ``*`` (each key normalised by
    :func:`flatten.names.normalize_key`, then split on ``_``; ``[]`` markers removed);
    ``per_element``: the path ends in ``[]`` (a list found there is masked element by element).
    """

    path: str
    tokens: tuple
    policy: PiiPolicy
    keep_last: int
    per_element: bool


def compile_rule(a: ColumnAnnotation) -> MaskRule:
    """``"accounts[].number"`` -> tokens ``("accounts", "number")``; ``"user.*.e-mail[]"`` ->
    ``("user", None, "e", "mail")`` with ``per_element``. Raises ValueError for a path with no name."""
    steps = a.path.split(".")
    toks: list = []
    per_element = False
    for j, seg in enumerate(steps):
        n = 0
        while seg.endswith("[]"):
            seg, n = seg[:-2], n + 1
        if j == len(steps) - 1:
            per_element = n > 0
        if seg == "*":
            toks.append(None)
        elif seg:
            toks.extend(normalize_key(seg).split("_"))
        elif not n:
            raise ValueError(f"invalid column path {a.path!r}")
    if not toks:
        raise ValueError(f"invalid column path {a.path!r}: no key")
    return MaskRule(a.path, tuple(toks), a.pii, a.keep_last, per_element)


def _rank(rule: MaskRule) -> tuple:
    """Strongest policy first; among redactions the one keeping fewest characters (order-independent)."""
    return (_STRENGTH[rule.policy], -rule.keep_last if rule.policy is PiiPolicy.REDACT else 0)


class _State:
    """A set of positions in the annotation patterns, reached by the name tokens of a key path."""

    __slots__ = ("pos", "any", "whole", "next")

    def __init__(self, pos: frozenset, any_fn: Any, whole_fn: Any) -> None:
        self.pos = pos
        self.any = any_fn  # policy for a value that is not a list (None: no annotation ends here)
        self.whole = whole_fn  # policy for a list as a whole (None: look inside it)
        self.next: dict = {}  # raw key -> _State or None


_MISS = object()


class Masker:
    """Applies a partner's column annotations. Build once (``DoFn.setup``); thread-compatible.

    Matching (the specification; docs/flatten.md "Masking"): an annotation is a
    sequence of *name tokens* (each key normalised as a column-name segment, then
    split on ``_``). A value matches when the name tokens of the object keys on
    its way from the root spell the annotation, whatever containers are crossed:
    lists are transparent at every level (so ``[]`` in a path is optional, and an
    object where the contract says list, a list where it says object, and lists
    of lists all match), and key boundaries do not matter (``{"user.ssn": x}``,
    ``{"user_ssn": x}`` and ``{"user": {"ssn": x}}`` all flatten to the same
    or an equivalent column, and all match ``user.ssn``). ``*`` matches one or
    more tokens. A matched value is masked whole, except a list under an
    annotation ending in ``[]``, which is masked element by element.
    """

    def __init__(self, annotations: Sequence[ColumnAnnotation], key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) < _MIN_KEY:
            raise MaskKeyError(f"masking key must be at least {_MIN_KEY} bytes")
        self._annotations = tuple(annotations)
        self._rules = tuple(compile_rule(a) for a in self._annotations)
        self.has_rules = bool(self._rules)
        k = bytes(key)
        self._hash = _Hmac(hmac.digest(k, b"headwater/hash/v1", "sha256"))
        self._tok = _Hmac(hmac.digest(k, b"headwater/tokenize/v1", "sha256"))
        self._aead = AESGCM(hmac.digest(k, b"headwater/dead-letter-aes256/v1", "sha256"))
        self._ref = _Hmac(hmac.digest(k, b"headwater/payload-ref/v1", "sha256"))
        # patterns with ``*`` expanded to (one token, any number more)
        self._pats = [tuple(t for x in r.tokens for t in ((_ANY, _ANYSTAR) if x is None else (x,))) for r in self._rules]
        self._fns: dict = {}
        self._states: dict = {}
        self._start = self._state(self._closure({(i, 0) for i in range(len(self._rules))})) if self._rules else None
        # (state, object keys) -> [(key, next state)] for the keys that keep some pattern alive
        self._match_cache: dict[tuple, list] = {}

    def __repr__(self) -> str:  # never show key material
        return f"Masker(paths={self.masked_paths()!r})"

    def masked_paths(self) -> tuple[str, ...]:
        """The annotated paths, for logs and docs (no key material)."""
        return tuple(a.path for a in self._annotations)

    def rules(self) -> tuple[MaskRule, ...]:
        """The compiled annotations (what the compiled accelerator matches with)."""
        return self._rules

    def column_rule(self, column: str) -> Optional[MaskRule]:
        """The strongest annotation a flattened column name matches (``accounts__number``; child-table columns
        as ``<array path>__<column>``), by the same token rule as values; None when none does."""
        if not self.has_rules:
            return None
        st = self._step(self._start, column)
        done = [self._rules[r] for r, i in st.pos if i == len(self._pats[r])] if st is not None else []
        return max(done, key=_rank) if done else None

    # ------------------------------------------------------------ matching
    def _closure(self, pos: set) -> frozenset:
        stack = list(pos)
        while stack:
            r, i = stack.pop()
            p = self._pats[r]
            if i < len(p) and p[i] is _ANYSTAR and (r, i + 1) not in pos:
                pos.add((r, i + 1))
                stack.append((r, i + 1))
        return frozenset(pos)

    def _state(self, pos: frozenset) -> _State:
        st = self._states.get(pos)
        if st is None:
            done = [self._rules[r] for r, i in pos if i == len(self._pats[r])]
            whole = [r for r in done if not r.per_element]
            st = self._states[pos] = _State(pos, self._fn(max(done, key=_rank)) if done else None,
                                            self._fn(max(whole, key=_rank)) if whole else None)
        return st

    def _step(self, st: _State, key: Any) -> Optional[_State]:
        """The state after the key ``key`` (None: no annotation can match below it)."""
        nxt = st.next.get(key, _MISS)
        if nxt is _MISS:
            nxt = None
            if type(key) is str:
                pos: Any = st.pos
                for tok in normalize_key(key).split("_"):
                    new = set()
                    for r, i in pos:
                        p = self._pats[r]
                        if i < len(p):
                            t = p[i]
                            if t == tok or t is _ANY:
                                new.add((r, i + 1))
                            elif t is _ANYSTAR:
                                new.add((r, i))
                    pos = self._closure(new)
                    if not pos:
                        break
                if pos:
                    nxt = self._state(pos)
            if len(st.next) >= 10_000:
                st.next.clear()
            st.next[key] = nxt
        return nxt

    # ------------------------------------------------------------ documents
    def mask_doc(self, doc: dict) -> dict:
        """A new document with every annotated value masked; ``doc`` is not mutated.

        Unmodified sub-objects are shared with ``doc`` (copy on write), so treat
        both as immutable.
        """
        if not self.has_rules:
            return dict(doc)
        out = self._mask_dict(doc, self._start, 0)
        return dict(doc) if out is doc else out

    def _matches(self, d: dict, st: _State) -> list:
        ck = (st, tuple(d))
        m = self._match_cache.get(ck)
        if m is None:
            m = []
            for k in ck[1]:
                nxt = self._step(st, k)
                if nxt is not None:
                    m.append((k, nxt))
            if len(self._match_cache) > 50_000:
                self._match_cache.clear()
            self._match_cache[ck] = m
        return m

    def _mask_dict(self, d: dict, st: _State, depth: int) -> dict:
        out = None
        for k, nxt in self._matches(d, st):
            v = d[k]
            nv = self._apply(v, nxt, depth)
            if nv is not v:
                if out is None:
                    out = dict(d)
                if nv is _DROPPED:
                    del out[k]
                else:
                    out[k] = nv
        return d if out is None else out

    def _apply(self, v: Any, st: _State, depth: int) -> Any:
        t = type(v)
        if t is list:
            if st.whole is not None:
                return st.whole(v)
            if depth >= _MAX_MASK_DEPTH:
                return _DROPPED  # too deep to inspect safely: never pass it through unmasked
            return self._mask_list(v, st, depth + 1)
        if st.any is not None:
            return st.any(v)
        if t is dict:
            if depth >= _MAX_MASK_DEPTH:
                return _DROPPED
            return self._mask_dict(v, st, depth + 1)
        return v

    def _mask_list(self, lst: list, st: _State, depth: int) -> list:
        """Lists are transparent: every element is matched in the list's own state."""
        out = None
        for i, v in enumerate(lst):
            nv = self._apply(v, st, depth)
            if nv is not v and out is None:
                out = lst[:i]
            if out is not None and nv is not _DROPPED:
                out.append(nv)
        return lst if out is None else out

    # ------------------------------------------------------------- policies
    def _fn(self, rule: MaskRule) -> Any:
        key = (rule.policy, rule.keep_last if rule.policy is PiiPolicy.REDACT else 0)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._policy_fn(*key)
        return fn

    def _policy_fn(self, policy: PiiPolicy, keep_last: int) -> Any:
        """A specialised ``value -> masked value`` function (same results as :meth:`_policy`)."""
        if policy is PiiPolicy.DROP:
            return lambda v: _DROPPED
        if policy is PiiPolicy.HASH:
            h = self._hash
            return lambda v: None if v is None else h(_value_bytes(v)).hex()
        if policy is PiiPolicy.TOKENIZE:
            tk = self._tok
            return lambda v: None if v is None else "tok_" + tk(canonical_bytes(v)).hex()[:32]
        return lambda v: None if v is None else _redact(v, keep_last)

    def _policy(self, v: Any, policy: PiiPolicy, keep_last: int) -> Any:
        if policy is PiiPolicy.DROP:
            return _DROPPED
        if v is None:
            return None
        if policy is PiiPolicy.HASH:
            return self._hash(_value_bytes(v)).hex()
        if policy is PiiPolicy.TOKENIZE:
            return "tok_" + self._tok(canonical_bytes(v)).hex()[:32]
        return _redact(v, keep_last)

    def hash_value(self, v: Any) -> str:
        """The ``hash`` policy applied to one value (for joins and tests)."""
        return self._policy(v, PiiPolicy.HASH, 0)

    def tokenize_value(self, v: Any) -> str:
        """The ``tokenize`` policy applied to one value."""
        return self._policy(v, PiiPolicy.TOKENIZE, 0)

    def payload_ref(self, payload: bytes) -> str:
        """``hmac-sha256:<hex>`` of the raw payload bytes, keyed with a sub-key of the masking key: correlates
        a dead letter with its source message, but cannot be brute-forced (an unkeyed hash of a payload that is
        only an SSN or a card number can)."""
        return "hmac-sha256:" + self._ref(bytes(payload)).hex()

    # ------------------------------------------------------ dead letters
    def protect_unparsed(self, payload: bytes) -> bytes:
        """For a payload that could not be parsed: AES-256-GCM encrypted when
        the partner has annotations (``enc:v1:`` + base64(nonce || ciphertext)),
        else unchanged."""
        if not self.has_rules:
            return payload
        nonce = os.urandom(12)
        return ENC_PREFIX + base64.b64encode(nonce + self._aead.encrypt(nonce, bytes(payload), _AAD))

    def decrypt_unparsed(self, blob: bytes) -> bytes:
        """Inverse of :meth:`protect_unparsed` (operators replaying dead letters)."""
        if not blob.startswith(ENC_PREFIX):
            return blob
        try:
            raw = base64.b64decode(blob[len(ENC_PREFIX):], validate=True)
            return self._aead.decrypt(raw[:12], raw[12:], _AAD)
        except (ValueError, InvalidTag):
            raise MaskKeyError("dead-letter payload cannot be decrypted with this masking key") from None

    def protect_payload(self, payload: bytes) -> bytes:
        """Any dead-letter payload made safe to store: a JSON object is stored
        masked (orjson); anything else, or a masked object that cannot be
        re-encoded, is encrypted. Unchanged when there are no annotations."""
        if not self.has_rules:
            return payload
        try:
            doc = jsonio.loads(payload)
        except orjson.JSONDecodeError:
            return self.protect_unparsed(payload)
        if type(doc) is not dict:
            return self.protect_unparsed(payload)
        try:
            return jsonio.dumps(self.mask_doc(doc))
        except (orjson.JSONEncodeError, ValueError, RecursionError):
            return self.protect_unparsed(payload)


class _Hmac:
    """HMAC-SHA256 with the key schedule precomputed (about 1.5x faster than hmac.digest per call)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        k = key.ljust(64, b"\0")  # keys are 32 bytes (derived), below the block size
        self._inner = sha256(bytes(b ^ 0x36 for b in k))
        self._outer = sha256(bytes(b ^ 0x5C for b in k))

    def __call__(self, msg: bytes) -> bytes:
        i = self._inner.copy()
        i.update(msg)
        o = self._outer.copy()
        o.update(i.digest())
        return o.digest()


class _Dropped:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<dropped>"


_DROPPED: Any = _Dropped()


def _value_bytes(v: Any) -> bytes:
    t = type(v)
    if t is str:
        return v.encode("utf-8", "surrogatepass")
    if t is dict or t is list:
        return _container_bytes(v)
    return orjson.dumps(v) if (t is not int or -(2**63) <= v < 2**64) else str(v).encode()


def canonical_bytes(v: Any) -> bytes:
    """The text ``tokenize`` HMACs: strings stripped and case-folded, ``123``/``123.0``/``"123"`` equal."""
    t = type(v)
    if t is str:
        return b"s:" + v.strip().casefold().encode("utf-8", "surrogatepass")
    if t is bool:
        return b"b:true" if v else b"b:false"
    if t is int:
        return b"s:" + str(v).encode()
    if t is float:
        if v == v and v not in (float("inf"), float("-inf")) and v.is_integer():
            return b"s:" + str(int(v)).encode()
        return b"s:" + repr(v).encode()
    return b"j:" + _container_bytes(v)


def _container_bytes(v: Any) -> bytes:
    try:
        return to_json_text(v, sort_keys=True).encode("utf-8", "surrogatepass")
    except JsonTextError:
        # Too deep to encode: still deterministic and never the raw value.
        return b"<unencodable:" + type(v).__name__.encode() + b">"


def _redact(v: Any, keep_last: int) -> str:
    t = type(v)
    if t is str:
        s = v
    elif t is int or t is float:
        s = str(v)
    else:
        return _REDACT
    keep = min(keep_last, len(s) // 2)
    return _REDACT + s[len(s) - keep:] if keep else _REDACT



def decode_mask_key(data: bytes, origin: str) -> bytes:
    """Decode a key read from elsewhere (e.g. Secret Manager) with the same rules as ``load_mask_key``."""
    return _decode_key(data, origin)
