"""``dpcore new-policy NAME``: a policy plugin distribution, ready to install and test.

It writes ``dp-NAME/`` with a ``pyproject.toml`` declaring the ``dpcore.policies`` entry
point, the package with a working policy (fewest tokens on the reconciled load, with an
option and a pass), a README, and tests on :class:`dpcore.testing.PolicyHarness`. Nothing
is overwritten.
"""

from __future__ import annotations

import argparse
import keyword
import re
from pathlib import Path
from string import Template

from dpcore.errors import ConfigError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_PYPROJECT = Template('''\
[build-system]
requires = ["hatchling>=1.20"]
build-backend = "hatchling.build"

[project]
name = "$dist"
version = "0.1.0"
description = "dpcore policy: $name"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["dpcore>=$dpcore_version"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points."dpcore.policies"]
$name = "$package:$cls"

[tool.hatch.build.targets.wheel]
packages = ["$package"]
''')

_INIT = Template('''\
"""dpcore policy `$name`: the rank holding the fewest tokens.

It reads the ledger's reconciled load: each rank's last load report plus every dispatch that
report has not acknowledged yet. So before any report arrives, and between reports, a burst of
requests still spreads over the ranks instead of piling onto the one that looked idle.
"""

from __future__ import annotations

from dpcore import PolicyContext, Request, hookimpl


class $cls:
    """Fewest tokens held (ties: fewer requests, then the lower rank).

    :param max_tokens: Pass (return ``None``, so the next policy in the chain decides) when
        even the least loaded rank holds more than this many tokens; 0 never passes.
    """

    def __init__(self, ctx: PolicyContext, max_tokens: int = 0) -> None:
        self.max_tokens = int(max_tokens)
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens!r}")

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int | None:
        ranks = ctx.active_ranks
        ledger = ctx.ledger
        best = min(ranks, key=lambda r: (ledger.tokens[r], ledger.requests[r], r))
        if self.max_tokens and ledger.tokens[best] > self.max_tokens:
            return None
        ctx.explain("$name", "fewest_tokens", {"tokens": ledger.tokens[best]})
        return best
''')

_TEST = Template('''\
from dpcore.testing import PolicyHarness

from $package import $cls


def test_spreads_a_burst_before_any_load_report():
    h = PolicyHarness($cls, dp_size=4)
    ranks = [h.select(num_tokens=100) for _ in range(8)]
    assert sorted(ranks) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_follows_the_reported_load():
    h = PolicyHarness($cls, dp_size=2)
    h.report(0, num_running=1, num_tokens=5_000)
    h.report(1, num_running=1, num_tokens=100)
    assert h.select(num_tokens=100) == 1


def test_skips_inactive_ranks():
    h = PolicyHarness($cls, dp_size=3)
    h.kill(0)
    assert {h.select(num_tokens=10) for _ in range(6)} == {1, 2}


def test_passes_when_every_rank_is_over_the_limit():
    h = PolicyHarness($cls, dp_size=2, options={"max_tokens": 1_000})
    h.report(0, num_running=1, num_tokens=5_000)
    h.report(1, num_running=1, num_tokens=5_000)
    assert h.answer(num_tokens=100) is None  # None: the next policy in the chain decides
''')

_README = Template('''\
# $dist

A dpcore policy plugin: `--load-balance-method $name`
sends each request to the rank that holds the fewest tokens, counting the dispatches its last
load report has not acknowledged yet.

```
pip install ./$dist
dpcore policies $name
dpcore serve --dry-run --load-balance-method $name,round_robin --policy-option $name.max_tokens=200000
```

Options: `max_tokens` (int, default 0): pass to the next policy in the chain when every rank
holds more than this many tokens; 0 never passes.

Test it (no sockets, the real ledger and hook calls):

```
pip install -e './$dist[test]'
pytest $dist/tests
```
''')


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_") if part) + "Policy"


def files_for(name: str) -> dict[str, str]:
    """Relative path -> content of the distribution for policy *name*."""
    if not _NAME.match(name) or keyword.iskeyword(name):
        msg = f"policy name {name!r}: use lower case letters, digits and underscores, starting with a letter"
        raise ConfigError(msg)
    from dpcore import __version__

    major_minor = ".".join(__version__.split(".")[:2])
    fields = {
        "name": name,
        "dist": "dp-" + name.replace("_", "-"),
        "package": "dp_" + name,
        "cls": _camel(name),
        "dpcore_version": major_minor,
    }
    return {
        "pyproject.toml": _PYPROJECT.substitute(fields),
        f"{fields['package']}/__init__.py": _INIT.substitute(fields),
        f"tests/test_{name}.py": _TEST.substitute(fields),
        "README.md": _README.substitute(fields),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the policy's name, as given to --load-balance-method (e.g. fewest_tokens)")
    p.add_argument("--dir", default=".", metavar="DIR", help="where to create dp-NAME/ (default: here)")


def run(args: argparse.Namespace) -> int:
    name = args.name.strip().lower()
    files = files_for(name)
    root = Path(args.dir) / ("dp-" + name.replace("_", "-"))
    if root.exists():
        msg = f"{root} already exists; choose another --dir or name (nothing was written)"
        raise ConfigError(msg)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"created {root}/ with policy {name!r}:")
    for rel in files:
        print(f"  {root / rel}")
    print("next:")
    print(f"  pip install -e '{root}[test]' && pytest {root}/tests")
    print(f"  dpcore serve --dry-run --load-balance-method {name}")
    return 0
