"""Plugin authoring and CLI polish: the template, policies from a file, options, --dry-run, extras."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpcore.cli import main
from dpcore.errors import ConfigError, PolicyDefinitionError
from dpcore.extras import extra_for, missing_extra
from dpcore.localpolicy import is_spec, load_spec
from dpcore.testing import PolicyHarness

POLICY_FILE = '''
from dpcore import hookimpl


class Second:
    """Always the second active rank."""

    def __init__(self, ctx, offset: int = 1) -> None:
        self.offset = int(offset)

    @hookimpl
    def select_rank(self, request, ctx):
        return ctx.active_ranks[self.offset % len(ctx.active_ranks)]
'''


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch):
    """main() configures logging to the current stderr, which is capsys's and closes with the
    test; later tests would log into a closed stream. The CLI tests leave logging alone."""
    monkeypatch.setattr("dpcore.log.configure", lambda *a, **k: None)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_version_and_bare_command_print_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    from dpcore import __version__

    assert capsys.readouterr().out.startswith(f"dpcore {__version__}")
    rc, out, _ = _cli(capsys)
    assert rc == 0 and "COMMAND" in out and "new-policy" in out


def test_new_policy_scaffolds_a_package_whose_tests_pass(tmp_path, capsys):
    rc, out, _ = _cli(capsys, "new-policy", "fewest_tokens", "--dir", str(tmp_path))
    assert rc == 0, out
    root = tmp_path / "dp-fewest-tokens"
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == {
        "pyproject.toml", "README.md", "dp_fewest_tokens/__init__.py", "tests/test_fewest_tokens.py"}
    pyproject = (root / "pyproject.toml").read_text()
    assert 'fewest_tokens = "dp_fewest_tokens:FewestTokensPolicy"' in pyproject
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=root,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": ""},
                          check=False)
    assert proc.returncode == 0 and "4 passed" in proc.stdout, proc.stdout + proc.stderr
    # Nothing is overwritten, and a bad name is refused before anything is written.
    assert _cli(capsys, "new-policy", "fewest_tokens", "--dir", str(tmp_path))[0] == 2
    rc, _, err = _cli(capsys, "new-policy", "Bad-Name", "--dir", str(tmp_path / "x"))
    assert rc == 2 and "lower case" in err and not (tmp_path / "x").exists()


def test_template_policy_does_not_herd_and_passes_over_its_limit(tmp_path, capsys, monkeypatch):
    _cli(capsys, "new-policy", "spread", "--dir", str(tmp_path))
    cls = load_spec(f"{tmp_path}/dp-spread/dp_spread/__init__.py")
    h = PolicyHarness(cls, dp_size=4)
    assert sorted(h.select(num_tokens=10) for _ in range(8)) == [0, 0, 1, 1, 2, 2, 3, 3]
    h = PolicyHarness(cls, dp_size=2, options={"max_tokens": 10})
    h.report(0, num_tokens=50)
    h.report(1, num_tokens=50)
    assert h.answer(num_tokens=1) is None


def test_a_policy_from_a_file_runs_in_serve_dry_run_with_options(tmp_path, capsys):
    f = tmp_path / "second.py"
    f.write_text(POLICY_FILE)
    rc, out, err = _cli(capsys, "serve", "--dry-run", "--json", "--load-balance-method", f"{f}:Second,round_robin",
                        "--policy-option", f"{f}:Second.offset=2")
    assert rc == 0, err
    desc = json.loads(out)
    assert desc["chain"] == [f"{f}:Second", "round_robin"]
    assert desc["options"] == {f"{f}:Second": {"offset": 2}}
    # The class may be left out when the file has exactly one.
    assert load_spec(str(f)).__name__ == "Second"


def test_policy_specs_are_told_apart_from_names_and_peers():
    assert is_spec("x.py") and is_spec("dir/x.py:Cls") and is_spec("pkg.mod:MyPolicy")
    assert not is_spec("round_robin") and not is_spec("peer:vllm") and not is_spec("ref:clairvoyant")


def test_bad_policy_files_give_one_line_with_the_cause(tmp_path):
    with pytest.raises(PolicyDefinitionError, match="does not exist"):
        load_spec(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\nraise RuntimeError('boom')\n")
    with pytest.raises(PolicyDefinitionError, match=r"boom.*broken\.py:2"):
        load_spec(str(broken))
    two = tmp_path / "two.py"
    two.write_text(POLICY_FILE + POLICY_FILE.replace("class Second", "class Third"))
    with pytest.raises(PolicyDefinitionError, match="2 policy classes"):
        load_spec(str(two))
    with pytest.raises(PolicyDefinitionError, match="no 'Nope'"):
        load_spec(f"{two}:Nope")


def test_policies_name_lists_options_with_types_and_defaults(capsys):
    rc, out, _ = _cli(capsys, "policies", "total_tokens", "--json")
    assert rc == 0
    detail = json.loads(out)
    assert detail["dist"] == "dp-load"
    opts = {o["name"]: o for o in detail["options"]}
    assert opts and all(o["type"] != "" and o["default"] for o in opts.values())
    rc, _, err = _cli(capsys, "policies", "no_such_policy")
    assert rc == 2 and "unknown load balance method" in err


def test_dry_run_refuses_what_serve_refuses_and_echoes_the_options(capsys):
    rc, _, err = _cli(capsys, "serve", "--dry-run", "--disaggregation-mode", "decode")
    assert rc == 2 and "PD decode needs the prefill dp size" in err
    rc, _, err = _cli(capsys, "serve", "--dry-run", "--max-message-bytes", "10")
    assert rc == 2 and "--max-message-bytes" in err
    rc, out, err = _cli(capsys, "serve", "--dry-run", "--load-balance-method", "total_tokens",
                        "--policy-option", "total_tokens.queue_weight=8", "--heartbeat-timeout", "5")
    assert rc == 0, err
    assert "queue_weight=8" in out and "--heartbeat-timeout:" in out and "5.0" in out


def test_missing_optional_modules_name_their_extra():
    assert extra_for("numpy.linalg") == "sim" and extra_for("uvicorn") == "http"
    assert extra_for("dpcore.soak") == "bench" and extra_for("json") is None
    err = missing_extra(ModuleNotFoundError("No module named 'numpy'", name="numpy"), "dpcore simulate")
    assert isinstance(err, ConfigError) and "pip install 'dpcore[sim]'" in str(err)


def test_a_missing_sample_trace_names_the_demo_extra(monkeypatch, tmp_path):
    import dpcore
    from dpcore import extras

    monkeypatch.setattr(dpcore, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(extras.MissingExtraError, match=r"dpcore\[demo\]"):
        extras.sample_trace()
    assert Path(extras.__file__).exists()
