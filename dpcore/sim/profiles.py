"""Report profiles: which load-report fields the simulated ranks fill in.

A policy must be measured only on what a deployment gives it. ``sglang`` is exactly what
the SGLang adapter sends (``adapters/sglang/dpcore_sglang/convert.py``, from SGLang 0.5.23's
``LoadSnapshot``): requests running and waiting, tokens held, KV used and capacity, the
acknowledged dispatch; no prefill progress (``prefill_tokens = -1``). ``full`` adds the exact
prompt tokens still to compute. ``docs/reference/report-profiles.md`` lists them field by
field. A new profile is one more entry in :data:`PROFILES`.
"""

from __future__ import annotations

from attrs import frozen

from dpcore.errors import ConfigError


@frozen
class ReportProfile:
    """What a simulated load report carries.

    :ivar name: The ``--report-profile`` value.
    :ivar summary: One line for ``--help`` and the printed run parameters.
    :ivar has_prefill_tokens: Whether ``prefill_tokens`` carries the exact prompt tokens the
        rank is still computing (otherwise ``-1``, "the engine does not say").
    :ivar kv_events: Whether the ranks also publish KV events (stored/evicted blocks of their
        real cache), taken with each load report and delivered with the same delay.
    """

    name: str
    summary: str
    has_prefill_tokens: bool = False
    kv_events: bool = False

    def prefill_tokens(self, exact: int) -> int:
        return exact if self.has_prefill_tokens else -1


PROFILES: dict[str, ReportProfile] = {
    p.name: p
    for p in (
        ReportProfile("sglang", "what the SGLang adapter sends: requests, tokens, KV; no prefill progress"),
        ReportProfile("full", "every LoadReport field, with exact prefill progress", has_prefill_tokens=True),
        ReportProfile(
            "sglang-kv",
            "the sglang profile plus SGLang's KV events (--kv-events-config), delivered with the reports",
            kv_events=True,
        ),
    )
}
DEFAULT_PROFILE = "sglang"


def profile(name: str) -> ReportProfile:
    found = PROFILES.get(name)
    if found is None:
        raise ConfigError(f"unknown report profile {name!r}; choose one of {', '.join(PROFILES)}")
    return found
