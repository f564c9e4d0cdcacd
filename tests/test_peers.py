"""`peers.require`: a missing peer skips its test (fails under CI's JAXLRP_REQUIRE_PEERS=1), dotted
names included; a peer that is installed but broken is an error."""

import pytest

import peers


def test_an_installed_dotted_name_is_imported():
    assert peers.require("json.decoder").__name__ == "json.decoder"


@pytest.mark.parametrize("name", ["no_such_peer", "no_such_peer.explicit.functional", "json.no_such_module"])
def test_a_missing_module_or_parent_skips(monkeypatch, name):
    monkeypatch.delenv("JAXLRP_REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="is not installed"):
        peers.require(name)


def test_a_missing_module_fails_where_ci_requires_the_peers(monkeypatch):
    monkeypatch.setenv("JAXLRP_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match="no_such_peer is not installed"):
        peers.require("no_such_peer.explicit.functional")


def test_a_broken_installed_peer_is_an_error(monkeypatch, tmp_path):
    (tmp_path / "broken_peer").mkdir()
    (tmp_path / "broken_peer" / "__init__.py").write_text("import a_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("JAXLRP_REQUIRE_PEERS", raising=False)
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing"):
        peers.require("broken_peer.sub")
