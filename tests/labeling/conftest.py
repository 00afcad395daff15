import pytest
from labeling_helpers import make_pairs
from starlette.testclient import TestClient

from preftune.labeling.app import create_app
from preftune.labeling.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "labels.sqlite", overlap=1)
    s.add_pairs(make_pairs(6))
    yield s
    s.close()


@pytest.fixture
def alice(store):
    """(annotator token, TestClient logged in through the login link's button)."""
    token = store.add_annotator("alice")
    client = TestClient(create_app(store))
    assert client.post("/login", params={"token": token}, follow_redirects=False).status_code == 303
    return token, client
