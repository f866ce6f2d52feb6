"""Masking: policies, paths and wildcards, keys, dead-letter payload protection, no leaks to logs."""
import base64
import copy
import logging

import orjson
import pytest

from flatten.mask import DEV_KEY, ENC_PREFIX, Masker, MaskKeyError, load_mask_key
from flatten.options import ColumnAnnotation as A

KEY = b"k" * 32


def m(*anns):
    return Masker([A(path=p, pii=pol, **kw) for p, pol, kw in anns], KEY)


def test_policies_and_paths():
    masker = m(("user.*.ssn", "hash", {}), ("accounts[].number", "redact", {}), ("email", "tokenize", {}),
               ("tags[]", "drop", {}), ("user.card", "drop", {}), ("phone", "redact", {"keep_last": 2}))
    doc = {"user": {"a": {"ssn": "123-45-6789", "x": 1}, "b": {"SSN": 5}, "card": "4111"},
           "accounts": [{"number": "1234567890"}, {"number": 42}, None], "EMail": " A@x.com", "tags": [1, 2],
           "phone": "5551234", "other": "123-45-6789x"}
    before = copy.deepcopy(doc)
    out = masker.mask_doc(doc)
    assert doc == before and out is not doc
    assert out["user"]["a"]["ssn"] == masker.hash_value("123-45-6789") and len(out["user"]["a"]["ssn"]) == 64
    assert out["user"]["b"]["SSN"] == masker.hash_value(5)  # case-insensitive key match
    assert "card" not in out["user"]
    assert out["accounts"] == [{"number": "****7890"}, {"number": "****2"}, None]
    assert out["EMail"] == masker.tokenize_value("a@x.com") and out["EMail"].startswith("tok_")
    assert out["tags"] == []
    assert out["phone"] == "****34"
    assert out["other"] == "123-45-6789x"
    assert "123-45-6789" not in orjson.dumps(out).decode().replace("123-45-6789x", "")


def test_key_step_on_a_list_applies_to_every_element():
    out = m(("accounts.number", "hash", {}), ("a.b.c", "drop", {})).mask_doc(
        {"accounts": [{"number": "1"}, {"number": "2"}], "a": [[{"b": {"c": 1, "d": 2}}]]})
    assert all(len(x["number"]) == 64 for x in out["accounts"])
    assert out["a"] == [[{"b": {"d": 2}}]]


def test_policy_precedence_and_containers():
    masker = m(("u.*", "hash", {}), ("u.x", "drop", {}), ("o", "redact", {}))
    out = masker.mask_doc({"u": {"x": 1, "y": {"deep": "secret"}}, "o": {"a": 1}})
    assert "x" not in out["u"] and len(out["u"]["y"]) == 64 and out["o"] == "****"
    assert masker.mask_doc({"u": {"y": None}})["u"]["y"] is None


def test_tokens_join_across_tables_and_partners():
    a = Masker([A(path="email", pii="tokenize")], KEY)
    b = Masker([A(path="contact.mail", pii="tokenize")], KEY)
    t1 = a.mask_doc({"email": "Alice@Example.com"})["email"]
    t2 = b.mask_doc({"contact": {"mail": " alice@example.com "}})["contact"]["mail"]
    assert t1 == t2
    assert a.tokenize_value(123) == a.tokenize_value("123") == a.tokenize_value(123.0)
    assert Masker([A(path="email", pii="tokenize")], b"z" * 32).tokenize_value("alice@example.com") != t1
    assert a.hash_value("alice@example.com") != t1[4:]


def test_no_rules():
    masker = Masker([], KEY)
    doc = {"a": 1}
    assert not masker.has_rules and masker.mask_doc(doc) == doc and masker.mask_doc(doc) is not doc
    assert masker.protect_unparsed(b"{raw") == b"{raw" and masker.protect_payload(b"{raw") == b"{raw"


def test_protect_unparsed_encrypts_and_roundtrips():
    masker = m(("ssn", "hash", {}))
    raw = b'{"ssn": "123-45-6789", broken'
    enc = masker.protect_unparsed(raw)
    assert enc.startswith(ENC_PREFIX) and b"123-45-6789" not in enc
    assert b"123-45-6789" not in base64.b64decode(enc[len(ENC_PREFIX):])
    assert masker.decrypt_unparsed(enc) == raw
    with pytest.raises(MaskKeyError):
        Masker([A(path="ssn", pii="hash")], b"z" * 32).decrypt_unparsed(enc)


def test_protect_payload_masks_parseable_and_encrypts_the_rest():
    masker = m(("user.ssn", "drop", {}))
    assert orjson.loads(masker.protect_payload(b'{"user":{"ssn":"1","id":2}}')) == {"user": {"id": 2}}
    for bad in (b'[{"user":{"ssn":"1"}}]', b'{"user":', b"\xff\xfe"):
        assert masker.protect_payload(bad).startswith(ENC_PREFIX)


def test_load_mask_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HW_TEST_KEY", "s3cret-value-0123456789")
    assert load_mask_key("HW_TEST_KEY", None, False) == b"s3cret-value-0123456789"
    monkeypatch.setenv("HW_TEST_KEY", "base64:" + base64.b64encode(b"x" * 20).decode())
    assert load_mask_key("HW_TEST_KEY", None, False) == b"x" * 20
    monkeypatch.setenv("HW_TEST_KEY", "short-secret")
    with pytest.raises(MaskKeyError) as ei:
        load_mask_key("HW_TEST_KEY", None, False)
    assert "HW_TEST_KEY" in str(ei.value) and "short-secret" not in str(ei.value)
    monkeypatch.delenv("HW_TEST_KEY")
    f = tmp_path / "key"
    f.write_bytes(b"file-key-0123456789abcdef\n")
    assert load_mask_key("HW_TEST_KEY", str(f), False) == b"file-key-0123456789abcdef"
    with pytest.raises(MaskKeyError) as ei:
        load_mask_key("HW_TEST_KEY", str(tmp_path / "missing"), False)
    assert "missing" in str(ei.value)
    with pytest.raises(MaskKeyError) as ei:
        load_mask_key("HW_TEST_KEY", None, False)
    assert "HW_TEST_KEY" in str(ei.value)
    assert load_mask_key("HW_TEST_KEY", None, True) == DEV_KEY


def test_key_and_pii_never_in_repr_or_logs(caplog):
    caplog.set_level(logging.DEBUG)
    masker = m(("ssn", "hash", {}))
    text = repr(masker) + str(masker.__dict__.keys())
    assert "kkkk" not in text
    masker.mask_doc({"ssn": "123-45-6789"})
    masker.protect_payload(b'{"ssn": "123-45-6789"')
    assert "123-45-6789" not in caplog.text and "kkkk" not in caplog.text


def test_too_deep_under_annotated_path_is_dropped_not_leaked():
    nested: object = {"b": "secret"}
    for _ in range(300):
        nested = [nested]
    out = m(("a.b", "hash", {})).mask_doc({"a": nested})
    stack, seen = [out], []
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        else:
            seen.append(x)
    assert "secret" not in seen
    shallow = m(("a.b", "hash", {})).mask_doc({"a": [[{"b": "secret"}]]})
    assert shallow["a"][0][0]["b"] != "secret"


# ------------------------------------------------------------------ shape drift (issue 14)

SSN, PAN = "987-65-4321", "4111111111111111"
DRIFT = m(("user.ssn", "hash", {}), ("accounts[].number", "redact", {}))


def _leaves(x):
    stack, out = [x], []
    while stack:
        y = stack.pop()
        if isinstance(y, dict):
            stack.extend(y.values())
        elif isinstance(y, list):
            stack.extend(y)
        else:
            out.append(y)
    return out


@pytest.mark.parametrize("doc", [
    {"accounts": {"number": PAN}},  # an object where the annotation says list
    {"accounts": [[{"number": PAN}], [[{"number": PAN}]]]},  # lists of lists
    {"accounts": [{"number": [PAN, [PAN]]}]},  # a list (of lists) of scalars at the leaf
    {"accounts": {"number": {"full": PAN}}},  # an object at the leaf
    {"user": [{"ssn": SSN}, [{"ssn": SSN}]]},  # a list where the annotation says object
    {"user": {"ssn": [SSN, SSN]}, "USER": {"SSN": SSN}},
    {"user.ssn": SSN, "accounts.number": PAN},  # literal dotted keys: columns user_ssn / accounts_number
    {"user_ssn": SSN, "user__ssn": SSN, "User-SSN": SSN, "accounts__number": PAN, "accounts_number": [PAN]},
    {"user": {"ssn.": SSN}, "accounts": [{"number ": PAN, "Number": PAN}]},
])
def test_annotations_hold_under_shape_drift(doc):
    out = DRIFT.mask_doc(doc)
    text = orjson.dumps(out).decode()
    assert SSN not in text and PAN not in text and "4321" not in text.replace("****4321", "")
    assert all(v not in (SSN, PAN) for v in _leaves(out))


def test_drift_results_are_the_policies():
    out = DRIFT.mask_doc({"accounts": {"number": PAN}, "user.ssn": SSN, "accounts.number": [[PAN]],
                          "user": [[{"ssn": SSN}]]})
    assert out["accounts"] == {"number": "****1111"}
    assert out["user.ssn"] == DRIFT.hash_value(SSN) == out["user"][0][0]["ssn"]
    assert out["accounts.number"] == "****"  # a list where no [] was written: masked whole


def test_trailing_brackets_mask_element_by_element():
    masker = m(("tags[]", "redact", {"keep_last": 1}), ("codes", "redact", {"keep_last": 1}))
    out = masker.mask_doc({"tags": ["abcd", ["efgh"], {"x": "ijkl"}, None], "codes": ["abcd", "efgh"]})
    assert out["tags"] == ["****d", ["****h"], "****", None]
    assert out["codes"] == "****"  # no []: the list is one value
    assert masker.mask_doc({"tags": "abcd"})["tags"] == "****d"  # a scalar where the contract says list


def test_no_false_matches_on_other_names():
    doc = {"user": {"ssn_last4": "4321", "ssnx": 1}, "a": {"user": {"ssn": SSN}}, "users": {"ssn": SSN},
           "accounts": [{"numbers": PAN}], "account_number": PAN}
    assert DRIFT.mask_doc(doc) == doc


def test_star_matches_one_or_more_name_tokens():
    masker = m(("user.*.phone", "drop", {}))
    out = masker.mask_doc({"user": {"home": {"phone": 1}, "work_cell": {"phone": 2}, "a": {"b": {"phone": 3}},
                                    "phone": 4}, "user.x.phone": 5, "user_phone": 6})
    assert out == {"user": {"home": {}, "work_cell": {}, "a": {"b": {}}, "phone": 4}, "user_phone": 6}


def test_rules_are_public_and_strength_is_order_independent():
    a = m(("x", "redact", {"keep_last": 4}), ("X", "redact", {"keep_last": 1}), ("x", "hash", {}))
    b = m(("x", "hash", {}), ("X", "redact", {"keep_last": 1}), ("x", "redact", {"keep_last": 4}))
    assert a.mask_doc({"x": "abcdefgh"}) == b.mask_doc({"x": "abcdefgh"}) == {"x": "****h"}
    r = m(("accounts[].e-mail[]", "drop", {}), ("user.*.ssn", "hash", {})).rules()
    assert r[0].tokens == ("accounts", "e", "mail") and r[0].per_element
    assert r[1].tokens == ("user", None, "ssn") and not r[1].per_element
