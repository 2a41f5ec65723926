import sqlalchemy as sa
import pytest

from iot2ml.auth.store import Devices, Keys
from iot2ml.core.catalog import Catalog, metadata
from iot2ml.core.errors import AlreadyExists, InvalidInput, NotFound, Transient

_notes = sa.Table(
    "test_notes", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
)


def test_a_module_declares_its_table_and_keeps_it_through_the_public_api(catalog_url):
    cat = Catalog(catalog_url)
    cat.register(_notes)
    cat.register(_notes)  # again: nothing happens
    v0 = cat.version()
    with cat.begin() as conn:
        conn.execute(_notes.insert().values(id=1, text="kept"))
        cat.bump(conn)
    with pytest.raises(RuntimeError), cat.begin() as conn:
        conn.execute(_notes.insert().values(id=2, text="rolled back"))
        cat.bump(conn)
        raise RuntimeError("the block failed")
    with cat.connect() as conn:
        assert conn.execute(sa.select(_notes.c.text)).scalars().all() == ["kept"]
    assert cat.version() == v0 + 1  # the failed block's bump was rolled back with it
    again = Catalog(catalog_url)  # another process: the table and the counter are there
    again.register(_notes)
    assert again.version() == v0 + 1
    again.close()
    cat.close()


def test_an_unreachable_catalog_is_transient_and_names_the_url_without_password():
    with pytest.raises(Transient, match=r"catalog postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x is unreachable"):
        Catalog("postgresql://u:secret@127.0.0.1:1/x")


def test_devices_types_and_keys_round_trip(catalog_url):
    cat = Catalog(catalog_url)
    devices, keys = Devices(cat), Keys(cat)
    v0 = devices.version()
    token = devices.add_device("pump-7", "pump")
    assert devices.version() > v0
    assert devices.device_for_token(token).device_id == "pump-7"
    assert devices.device_for_token("nope") is None
    assert [d.device_id for d in devices.list_devices()] == ["pump-7"]
    assert [user for user, _ in devices.broker_users()] == ["pump-7"]
    with pytest.raises(AlreadyExists, match="--rotate"):
        devices.add_device("pump-7", "pump")
    new = devices.add_device("pump-7", "pump", rotate=True)
    assert devices.device_for_token(token) is None and devices.device_for_token(new) is not None
    devices.remove_device("pump-7")
    assert devices.device_for_token(new) is None
    assert devices.get_device("pump-7").active is False
    assert devices.device_types() == {"pump-7": "pump"}  # revoked devices keep their type for late messages
    assert list(devices.broker_users()) == []
    with pytest.raises(NotFound):
        devices.remove_device("pump-7")

    before = keys.catalog.version()
    key = keys.add_key("ci", "reader")
    assert keys.key_role(key) == ("ci", "reader") and keys.list_keys() == [("ci", "reader")]
    assert devices.version() > before  # one counter: the API notices new keys like new devices
    with pytest.raises(InvalidInput, match="role"):
        keys.add_key("x", "root")
    with pytest.raises(AlreadyExists, match="API key 'ci' exists"):
        keys.add_key("ci", "admin")
    keys.set_key("admin", "i2m_chosen", "admin")
    assert keys.key_role("i2m_chosen") == ("admin", "admin")
    keys.remove_key("ci")
    assert keys.key_role(key) is None

    devices.add_type("wine", "ph:float, batch_id:string")
    assert devices.get_type("wine").schema == {"ph": "float", "batch_id": "string"}
    assert [t.name for t in devices.list_types()] == ["pump", "wine"]
    with pytest.raises(NotFound, match="no device type 'beer'"):
        devices.get_type("beer")
    cat.close()


def test_tokens_are_stored_hashed(catalog_url):
    cat = Catalog(catalog_url)
    token = Devices(cat).add_device("s1", "pollution")
    key = Keys(cat).add_key("k")
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
    devices = Devices(Catalog(f"sqlite:///{tmp_path / 'c.db'}"))
    with pytest.raises(InvalidInput, match="letters, digits"):
        devices.add_device(bad, "pump")


def test_bad_type_names_are_refused(tmp_path):
    devices = Devices(Catalog(f"sqlite:///{tmp_path / 'c.db'}"))
    with pytest.raises(InvalidInput, match="reserved"):
        devices.add_device("d1", "raw")
    with pytest.raises(InvalidInput, match="lower-case"):
        devices.add_device("d1", "Pump-Type")
