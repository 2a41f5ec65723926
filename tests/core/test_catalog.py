import sqlalchemy as sa
import pytest

from iot2ml.core.catalog import Catalog
from iot2ml.core.errors import AlreadyExists, InvalidInput, NotFound


def test_devices_types_and_keys_round_trip(catalog_url):
    cat = Catalog(catalog_url)
    v0 = cat.version()
    token = cat.add_device("pump-7", "pump")
    assert cat.version() > v0
    assert cat.device_for_token(token).device_id == "pump-7"
    assert cat.device_for_token("nope") is None
    assert [d.device_id for d in cat.list_devices()] == ["pump-7"]
    with pytest.raises(AlreadyExists, match="--rotate"):
        cat.add_device("pump-7", "pump")
    new = cat.add_device("pump-7", "pump", rotate=True)
    assert cat.device_for_token(token) is None and cat.device_for_token(new) is not None
    cat.remove_device("pump-7")
    assert cat.device_for_token(new) is None
    assert cat.get_device("pump-7").active is False
    assert cat.device_types() == {"pump-7": "pump"}  # revoked devices keep their type for late messages
    assert list(cat.broker_users()) == []
    with pytest.raises(NotFound):
        cat.remove_device("pump-7")

    key = cat.add_key("ci", "reader")
    assert cat.key_role(key) == ("ci", "reader")
    with pytest.raises(InvalidInput, match="role"):
        cat.add_key("x", "root")

    cat.add_type("wine", "ph:float, batch_id:string")
    assert cat.get_type("wine").schema == {"ph": "float", "batch_id": "string"}
    cat.close()


def test_tokens_are_stored_hashed(catalog_url):
    cat = Catalog(catalog_url)
    token = cat.add_device("s1", "pollution")
    key = cat.add_key("k")
    engine = sa.create_engine(cat.url)
    with engine.connect() as conn:
        dump = repr(conn.execute(sa.text("SELECT * FROM devices")).all())
        dump += repr(conn.execute(sa.text("SELECT * FROM api_keys")).all())
    engine.dispose()
    assert token not in dump and key not in dump
    assert "$2b$" in dump  # bcrypt for the broker
    cat.close()


@pytest.mark.parametrize("bad", ["a/b", "a.b", "a b", "", "x" * 200, "dev*"])
def test_bad_device_ids_are_refused_with_the_rule(tmp_path, bad):
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    with pytest.raises(InvalidInput, match="letters, digits"):
        cat.add_device(bad, "pump")


def test_bad_type_names_are_refused(tmp_path):
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    with pytest.raises(InvalidInput, match="reserved"):
        cat.add_device("d1", "raw")
    with pytest.raises(InvalidInput, match="lower-case"):
        cat.add_device("d1", "Pump-Type")
