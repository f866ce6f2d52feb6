"""Bad contracts fail before any pipeline is built, naming the partner and the field."""
import copy
from pathlib import Path

import pytest
import yaml

from ingest.contract import ContractError, load_contract, parse_contract
from ingest.preflight import preflight

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "headwater.yaml"


def raw():
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_contract_loads():
    c = load_contract(EXAMPLE)
    assert [p.name for p in c.partners] == ["acme_bank", "orbit_offers", "nimbus_pay"]
    assert not c.streaming
    assert c.partner("acme_bank").table.clustering == ("_user_id", "event__type")


@pytest.mark.parametrize("mutate,expected", [
    (lambda r: r["partners"][0]["table"].update(partition_granularity="WEEK"), "partner 'acme_bank': table.partition_granularity"),
    (lambda r: r["partners"][1]["columns"][0].update(pii="scramble"), "partner 'orbit_offers': columns[0].pii"),
    (lambda r: r["partners"][0]["aggregates"][0]["metrics"].append({"name": "s", "fn": "sum"}), "needs 'column'"),
    (lambda r: r["partners"][0]["aggregates"][0].update(emit_every="soon"), "partner 'acme_bank': aggregates[0].emit_every"),
    (lambda r: r["partners"][2]["sources"][0].update(kind="ftp"), "partner 'nimbus_pay': sources[0]"),
    (lambda r: r["partners"][2]["sources"].__setitem__(0, {"kind": "kafka", "group_id": "g"}), "exactly one of 'topics' or 'topic_pattern'"),
    (lambda r: r["partners"][2]["sources"].__setitem__(0, {"kind": "pubsub", "subscription": "nope"}), "partner 'nimbus_pay': sources[0].subscription"),
    (lambda r: r["partners"][1].update(name="acme_bank"), "duplicate partner names"),
    (lambda r: r["partners"][0]["table"].update(clustering=["a", "b", "c", "d", "e"]), "table.clustering"),
    (lambda r: r["partners"][0].update(surprise=1), "partner 'acme_bank': surprise"),
    (lambda r: r["partners"][0]["envelope"].update(user_id=""), "partner 'acme_bank': envelope.user_id"),
])
def test_invalid_contract_names_partner_and_field(mutate, expected):
    r = copy.deepcopy(raw())
    mutate(r)
    with pytest.raises(ContractError) as e:
        parse_contract(r, "test.yaml")
    assert expected in str(e.value), str(e.value)


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("partners: [\n")
    with pytest.raises(ContractError, match="invalid YAML"):
        load_contract(bad)
    with pytest.raises(ContractError, match="cannot read"):
        load_contract(tmp_path / "missing.yaml")


def test_preflight_names_missing_files_key_and_reserved_tables(tmp_path, monkeypatch):
    monkeypatch.delenv("HEADWATER_MASK_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # the example's relative file patterns must match nothing here
    r = raw()
    r["masking"] = {"key_env": "HEADWATER_MASK_KEY", "key_file": str(tmp_path / "nokey")}
    r["partners"][1]["table"]["name"] = "dead_letters"
    r["partners"][0]["columns"].append({"path": "event.occurred_at", "pii": "redact"})
    with pytest.raises(ContractError) as e:
        preflight(parse_contract(r))
    msg = str(e.value)
    assert "masking:" in msg and "nokey" in msg
    assert "partner 'orbit_offers': table.name" in msg
    assert "partner 'acme_bank': columns[5].path" in msg
    assert "partner 'acme_bank': sources[0].pattern: no file matches" in msg
