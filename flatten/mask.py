"""Masking of annotated PII fields, applied to the parsed event before any sink.

Pure Python, no Beam. The ParseEnvelope step builds one :class:`Masker` per
partner in ``DoFn.setup`` and calls :meth:`Masker.mask_doc` on every parsed
document *before* envelope extraction and flattening, and
:meth:`Masker.protect_payload` / :meth:`Masker.protect_unparsed` on every
dead-letter payload, so no raw annotated value reaches any output or log.

Annotation paths address the ORIGINAL nested JSON: ``.`` between keys, ``*``
any one key, ``[]`` every element of a list (``user.*.ssn``,
``accounts[].number``, ``tags[]``). Matching is deliberately generous, because
a miss leaks PII: a path key matches a JSON key when they are equal *or* normalise
to the same column name (``SSN`` matches ``ssn``, ``e-mail`` matches ``e_mail``);
a key step that meets a list applies to every element of the list, as if ``[]``
were written. When several annotations hit the same value the strongest policy
wins: drop > redact > hash > tokenize. ``null`` values stay ``null``. A
container nested more than 200 levels below an annotated path is dropped rather
than inspected (bounded recursion; never passed through unmasked).

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
from typing import Any, Optional, Sequence

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flatten.infer import JsonTextError, to_json_text
from flatten.names import normalize_key
from flatten.options import ColumnAnnotation, PiiPolicy

__all__ = ["MaskKeyError", "load_mask_key", "Masker", "ENC_PREFIX", "DEV_KEY"]

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


def _parse_path(path: str) -> list[tuple[str, str]]:
    """``"a.*.b[]"`` -> ``[("key","a"), ("star",""), ("key","b"), ("items","")]``."""
    steps: list[tuple[str, str]] = []
    for seg in path.split("."):
        n = 0
        while seg.endswith("[]"):
            seg, n = seg[:-2], n + 1
        if seg == "*":
            steps.append(("star", ""))
        elif seg:
            steps.append(("key", normalize_key(seg)))
        elif not n:
            raise ValueError(f"invalid column path {path!r}")
        steps.extend([("items", "")] * n)
    return steps


class _Node:
    __slots__ = ("keys", "star", "items", "policy", "keep_last", "fn")

    def __init__(self) -> None:
        self.keys: dict[str, _Node] = {}
        self.star: Optional[_Node] = None
        self.items: Optional[_Node] = None
        self.policy: Optional[PiiPolicy] = None
        self.keep_last = 4
        self.fn: Any = None  # compiled policy: value -> masked value (or _DROPPED)


class Masker:
    """Applies a partner's column annotations. Build once (``DoFn.setup``); thread-compatible."""

    def __init__(self, annotations: Sequence[ColumnAnnotation], key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) < _MIN_KEY:
            raise MaskKeyError(f"masking key must be at least {_MIN_KEY} bytes")
        self._annotations = tuple(annotations)
        self.has_rules = bool(self._annotations)
        k = bytes(key)
        self._hash = _Hmac(hmac.digest(k, b"headwater/hash/v1", "sha256"))
        self._tok = _Hmac(hmac.digest(k, b"headwater/tokenize/v1", "sha256"))
        self._aead = AESGCM(hmac.digest(k, b"headwater/dead-letter-aes256/v1", "sha256"))
        self._root = _Node()
        for a in self._annotations:
            node = self._root
            for kind, name in _parse_path(a.path):
                if kind == "key":
                    node = node.keys.setdefault(name, _Node())
                elif kind == "star":
                    node.star = node.star or _Node()
                    node = node.star
                else:
                    node.items = node.items or _Node()
                    node = node.items
            if node.policy is None or _STRENGTH[a.pii] > _STRENGTH[node.policy]:
                node.policy, node.keep_last = a.pii, a.keep_last
        self._compile_fns(self._root)
        # (nodes, object keys) -> [(key, policy fn or None, nodes)] for keys that match any node
        self._match_cache: dict[tuple, list] = {}
        self._el_nodes: dict[tuple, tuple] = {}

    def __repr__(self) -> str:  # never show key material
        return f"Masker(paths={self.masked_paths()!r})"

    def masked_paths(self) -> tuple[str, ...]:
        """The annotated paths, for logs and docs (no key material)."""
        return tuple(a.path for a in self._annotations)

    # ------------------------------------------------------------ documents
    def mask_doc(self, doc: dict) -> dict:
        """A new document with every annotated value masked; ``doc`` is not mutated.

        Unmodified sub-objects are shared with ``doc`` (copy on write), so treat
        both as immutable.
        """
        if not self.has_rules:
            return dict(doc)
        out = self._mask_dict(doc, (self._root,), 0)
        return dict(doc) if out is doc else out

    def _matches(self, d: dict, nodes: tuple) -> list:
        ck = (nodes, tuple(d))
        m = self._match_cache.get(ck)
        if m is None:
            m = []
            for k in ck[1]:
                hit = []
                nk = normalize_key(k) if type(k) is str else None
                for n in nodes:
                    c = n.keys.get(nk) if nk is not None else None
                    if c is not None:
                        hit.append(c)
                    if n.star is not None:
                        hit.append(n.star)
                if hit:
                    pol = None
                    for n in hit:
                        if n.policy is not None and (pol is None or _STRENGTH[n.policy] > _STRENGTH[pol.policy]):
                            pol = n
                    m.append((k, pol.fn if pol is not None else None, tuple(hit)))
            if len(self._match_cache) > 50_000:
                self._match_cache.clear()
            self._match_cache[ck] = m
        return m

    def _mask_dict(self, d: dict, nodes: tuple, depth: int) -> dict:
        out = None
        m = self._match_cache.get((nodes, tuple(d)))
        if m is None:
            m = self._matches(d, nodes)
        for k, fn, hit in m:
            v = d[k]
            if fn is not None:
                nv = fn(v)
            else:
                t = type(v)
                if t is dict or t is list:
                    nv = self._apply(v, hit, depth)
                else:
                    continue
            if nv is not v:
                if out is None:
                    out = dict(d)
                if nv is _DROPPED:
                    del out[k]
                else:
                    out[k] = nv
        return d if out is None else out

    def _apply(self, v: Any, hit: tuple, depth: int) -> Any:
        pol = None
        for n in hit:
            if n.policy is not None and (pol is None or _STRENGTH[n.policy] > _STRENGTH[pol.policy]):
                pol = n
        if pol is not None:
            return pol.fn(v)
        t = type(v)
        if t is dict or t is list:
            if depth >= _MAX_MASK_DEPTH:
                return _DROPPED  # too deep to inspect safely: never pass it through unmasked
            if t is dict:
                return self._mask_dict(v, hit, depth + 1)
            return self._mask_list(v, hit, depth + 1)
        return v

    def _mask_list(self, lst: list, nodes: tuple, depth: int) -> list:
        el_nodes = self._el_nodes.get(nodes)
        if el_nodes is None:
            el_nodes = self._el_nodes[nodes] = tuple(n.items for n in nodes if n.items is not None) + tuple(
                n for n in nodes if n.keys or n.star is not None)  # a key step meeting a list: every element
        if not el_nodes:
            return lst
        out = None
        for i, v in enumerate(lst):
            nv = self._apply(v, el_nodes, depth)
            if nv is not v:
                if out is None:
                    out = lst[:i]
            if out is not None and nv is not _DROPPED:
                out.append(nv)
        return lst if out is None else out

    # ------------------------------------------------------------- policies
    def _compile_fns(self, node: "_Node") -> None:
        if node.policy is not None:
            node.fn = self._policy_fn(node.policy, node.keep_last)
        children = [*node.keys.values(), node.star, node.items]
        for c in children:
            if c is not None:
                self._compile_fns(c)

    def _policy_fn(self, policy: PiiPolicy, keep_last: int) -> Any:
        """A specialised ``value -> masked value`` function (same results as :meth:`_policy`)."""
        if policy is PiiPolicy.DROP:
            return lambda v: _DROPPED
        if policy is PiiPolicy.HASH:
            h = self._hash
            return lambda v: None if v is None else h(_value_bytes(v)).hex()
        if policy is PiiPolicy.TOKENIZE:
            tk = self._tok
            return lambda v: None if v is None else "tok_" + tk(_canonical_bytes(v)).hex()[:32]
        return lambda v: None if v is None else _redact(v, keep_last)

    def _policy(self, v: Any, policy: PiiPolicy, keep_last: int) -> Any:
        if policy is PiiPolicy.DROP:
            return _DROPPED
        if v is None:
            return None
        if policy is PiiPolicy.HASH:
            return self._hash(_value_bytes(v)).hex()
        if policy is PiiPolicy.TOKENIZE:
            return "tok_" + self._tok(_canonical_bytes(v)).hex()[:32]
        return _redact(v, keep_last)

    def hash_value(self, v: Any) -> str:
        """The ``hash`` policy applied to one value (for joins and tests)."""
        return self._policy(v, PiiPolicy.HASH, 0)

    def tokenize_value(self, v: Any) -> str:
        """The ``tokenize`` policy applied to one value."""
        return self._policy(v, PiiPolicy.TOKENIZE, 0)

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
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return self.protect_unparsed(payload)
        if type(doc) is not dict:
            return self.protect_unparsed(payload)
        try:
            return orjson.dumps(self.mask_doc(doc))
        except orjson.JSONEncodeError:
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


def _canonical_bytes(v: Any) -> bytes:
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

