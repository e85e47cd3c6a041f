from __future__ import annotations

import re
import sys
import textwrap

import pytest

from dpcore import discovery
from dpcore.errors import ConfigError, DuplicatePolicyError, PolicyDefinitionError, UnknownPolicyError
from dpcore.manager import PolicyManager
from dpcore.testing import fake_entry_points


def _make_dist(root, dist, version, module, entry_points: dict[str, str], summary="a policy"):
    """A real installed-distribution layout (dist-info) on a sys.path entry."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\nSummary: {summary}\n"
    )
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[dpcore.policies]\n{eps}\n")
    (root / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            from dpcore import hookimpl

            class Policy:
                def __init__(self, ctx):
                    pass

                @hookimpl
                def select_rank(self, request, ctx):
                    return 0
            """
        )
    )


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_listing_imports_nothing(on_path):
    _make_dist(on_path, "dp-alpha", "1.2", "dp_alpha_mod", {"alpha": "dp_alpha_mod:Policy"}, "alpha summary")
    infos = discovery.available()
    assert infos["alpha"].dist == "dp-alpha"
    assert infos["alpha"].version == "1.2"
    assert infos["alpha"].summary == "alpha summary"
    assert "dp_alpha_mod" not in sys.modules


def test_only_the_selected_policy_is_imported(on_path):
    _make_dist(on_path, "dp-alpha", "1.0", "dp_alpha_sel", {"alpha": "dp_alpha_sel:Policy"})
    _make_dist(on_path, "dp-beta", "1.0", "dp_beta_sel", {"beta": "dp_beta_sel:Policy"})
    m = PolicyManager.from_method("alpha", dp_size=2)
    assert m.chain == ("alpha",)
    assert "dp_alpha_sel" in sys.modules
    assert "dp_beta_sel" not in sys.modules


def test_duplicate_name_names_both_distributions(on_path):
    _make_dist(on_path / "a", "dp-one", "1.0", "dp_one_mod", {"clash": "dp_one_mod:Policy"})
    _make_dist(on_path / "b", "dp-two", "1.0", "dp_two_mod", {"clash": "dp_two_mod:Policy"})
    sys.path.insert(0, str(on_path / "a"))
    sys.path.insert(0, str(on_path / "b"))
    try:
        with pytest.raises(DuplicatePolicyError, match="dp-one.*dp-two|dp-two.*dp-one") as exc:
            PolicyManager.from_method("clash", dp_size=2)
        assert set(exc.value.dists) == {"dp-one", "dp-two"}
        assert set(discovery.available()["clash"].dist.split(" + ")) == {"dp-one", "dp-two"}
    finally:
        sys.path.remove(str(on_path / "a"))
        sys.path.remove(str(on_path / "b"))


def test_unknown_name_lists_installed_and_closest(monkeypatch):
    fake_entry_points(monkeypatch, {"round_robin": "dp_round_robin:RoundRobinPolicy"})
    with pytest.raises(UnknownPolicyError) as exc:
        PolicyManager.from_method("round-robbin", dp_size=2)
    msg = str(exc.value)
    assert "installed policies: round_robin" in msg
    assert "did you mean 'round_robin'?" in msg
    assert "pip install" in msg and "dpcore policies" in msg


def test_unknown_name_says_how_to_get_the_first_party_policies(monkeypatch):
    fake_entry_points(monkeypatch, {"round_robin": "dp_round_robin:RoundRobinPolicy"})
    with pytest.raises(UnknownPolicyError, match=re.escape(discovery.INSTALL_HINT)):
        PolicyManager.from_method("cache_aware", dp_size=2)


def test_auto_resolving_to_a_missing_policy_says_why(monkeypatch):
    fake_entry_points(
        monkeypatch, {"round_robin": "dp_round_robin:RoundRobinPolicy"}, roles={"auto.prefill": "follow_bootstrap_room"}
    )
    with pytest.raises(UnknownPolicyError, match="PD prefill") as exc:
        PolicyManager.from_method("auto", dp_size=2, disaggregation_mode="prefill")
    assert "auto -> follow_bootstrap_room" in str(exc.value) and discovery.INSTALL_HINT in str(exc.value)


def test_presets_mean_what_the_distributions_declare(monkeypatch):
    fake_entry_points(
        monkeypatch,
        {"fake": "dpcore.testing:FakePolicy", "other": "dpcore.testing:FakePolicy"},
        roles={"auto.null": "fake", "auto.decode": "FAKE", "roadmap.null": "other"},
    )
    assert PolicyManager.from_method("auto", dp_size=2).chain == ("fake",)
    assert PolicyManager.from_method("auto", dp_size=2, disaggregation_mode="decode").chain == ("fake",)
    assert PolicyManager.from_method("roadmap", dp_size=2).chain == ("other",)
    with pytest.raises(ConfigError, match="none does; name a policy instead"):
        PolicyManager.from_method("auto", dp_size=2, disaggregation_mode="prefill")


def test_a_preset_two_distributions_claim_is_refused(monkeypatch):
    from importlib.metadata import EntryPoint

    fake_entry_points(monkeypatch, {"fake": "dpcore.testing:FakePolicy", "other": "dpcore.testing:FakePolicy"})
    both = [EntryPoint("auto.null", v, discovery.ROLES_GROUP) for v in ("fake", "other")]
    monkeypatch.setattr(discovery, "_role_entry_points", lambda: both)
    with pytest.raises(ConfigError, match="ambiguous in no PD disaggregation: 'fake' .* and 'other'"):
        PolicyManager.from_method("auto", dp_size=2)


def test_entry_point_that_fails_to_import(monkeypatch):
    fake_entry_points(monkeypatch, {"ghost": "no_such_module_anywhere:Policy"})
    with pytest.raises(PolicyDefinitionError, match="could not be imported"):
        PolicyManager.from_method("ghost", dp_size=2)


def test_fake_entry_points_load_testing_fake(monkeypatch):
    fake_entry_points(monkeypatch, {"fake": "dpcore.testing:FakePolicy"})
    m = PolicyManager.from_method("FAKE", dp_size=3, options={"fake": {"rank": 2}})
    assert m.route(__import__("dpcore").Request(rid="a")) == 2


def test_first_party_policies_are_installed():
    names = set(discovery.available())
    assert {"round_robin", "follow_bootstrap_room", "total_requests", "total_tokens", "cache_aware"} <= names
    assert discovery.available()["total_tokens"].dist == "dp-load"
