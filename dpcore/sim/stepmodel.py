"""How long one DP-attention forward step takes: the pinned step-time model.

Pure Python on purpose (no numpy, no matplotlib): the simulator's engine and the mock engine
ranks both import it, so the demo and ``dpcore simulate`` run the same mechanics.

What SGLang 0.5.23 does, and what this module takes from it:

* **Lockstep.** Before every forward pass each DP-attention rank all-gathers
  ``[num_tokens, num_tokens_for_logprob, can_cuda_graph, is_extend_in_batch, ...]``
  (``sglang/srt/managers/scheduler_components/dp_attn.py``: ``prepare_mlp_sync_batch_raw`` and
  ``MLPSyncBatchInfo.all_gather``). If any rank has tokens, a rank with nothing to do runs an
  *idle batch* (``need_idle_batch = max(global_num_tokens) > 0``), so every rank takes part in
  every step and the MoE layers run over the gathered tokens. A step therefore lasts as long as
  the slowest rank's attention work plus the shared MoE part.
* **CUDA graphs only when every rank decodes or idles.** ``can_run_decode_cuda_graph`` is the
  ``min`` over ranks of each rank's vote (``MLPSyncBatchInfo.all_gather``), and a rank votes yes
  only when its batch is decode, idle or absent (``_local_decode_cuda_graph_vote``). One rank's
  prefill makes the whole step run eagerly: :attr:`StepModel.graph_loss_s`.
* **Per-rank chunk budget.** With DP attention, ``handle_data_parallelism``
  (``sglang/srt/arg_groups/parallel_hook.py``) sets ``chunked_prefill_size //= attn_dp_size``
  and multiplies ``schedule_conservativeness`` by 0.3. The default ``chunked_prefill_size`` on
  an 80 GB GPU (H100) is 8192 (``sglang/srt/arg_groups/memory_hook.py``,
  GPU-memory defaults), so dp 8 gives 1,024 tokens per rank per step.
* **Prefill before decode, no mixing.** ``Scheduler.get_next_batch_to_run``
  (``sglang/srt/managers/scheduler.py``) runs a new prefill batch when there is one and decodes
  otherwise; mixing decode into a prefill batch needs ``--enable-mixed-chunk`` (off unless
  given). An extend batch (``PrefillAdder`` in ``sglang/srt/managers/schedule_policy.py``) packs
  waiting requests until ``rem_chunk_tokens`` is spent; a prompt longer than what is left is
  chunked and continues first in the next extend batch (``add_chunked_req``).

Calibration: the SGLang team's DeepSeek-V3 deployment (LMSYS blog, 2025-05-05, "Deploying
DeepSeek with PD Disaggregation and Large-scale Expert Parallelism on 96 H100 GPUs": DP
attention + EP, 8×H100 per node) reports **52.3k input tokens/s** per prefill node and **22.3k
output tokens/s** per decode node at 2,000-token inputs, with an inter-token latency around
100 ms. Per GPU (one DP rank), that is 6,538 prefill tokens/s and 2,788 decode tokens/s; at a
100 ms step, about 279 running requests per rank. The constants below reproduce those two
operating points (see :func:`calibration`); how the per-token time splits between a rank's own
attention and the shared MoE is not published, and is stated as an assumption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from attrs import field, frozen

#: LMSYS blog 2025-05-05: input tokens/s per 8-GPU prefill node, 2k-token inputs.
LMSYS_PREFILL_TOKENS_PER_NODE_S = 52_300
#: LMSYS blog 2025-05-05: output tokens/s per 8-GPU decode node, 2k-token inputs.
LMSYS_DECODE_TOKENS_PER_NODE_S = 22_300
#: LMSYS blog 2025-05-05 (limitations): inter-token latency around 100 ms.
LMSYS_ITL_S = 0.100
GPUS_PER_NODE = 8


def _positive(_inst: object, attr: object, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{attr.name} must be a positive number, got {value!r}")  # type: ignore[attr-defined]


def _non_negative(_inst: object, attr: object, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{attr.name} must be a number >= 0, got {value!r}")  # type: ignore[attr-defined]


def _positive_int(_inst: object, attr: object, value: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{attr.name} must be an integer >= 1, got {value!r}")  # type: ignore[attr-defined]


@frozen
class StepTime:
    """One lockstep step.

    :ivar duration_s: Wall time of the step, the same for every rank.
    :ivar work_s: Each rank's own (attention) work in the step; ``0.0`` for an idle rank.
    :ivar graph: Whether the step ran with CUDA graphs (no rank extended).
    :ivar gathered_tokens: Tokens all ranks contributed to the MoE layers.
    """

    duration_s: float
    work_s: tuple[float, ...]
    graph: bool
    gathered_tokens: int

    @property
    def waste_s(self) -> float:
        """Rank-seconds spent idle or padded while the slowest rank finished its work."""
        top = max(self.work_s, default=0.0)
        return sum(top - w for w in self.work_s)


@frozen
class StepModel:
    """Step time of a DP-attention group: ``overhead + graph loss (if any rank extends) +
    slowest rank's attention work + MoE over the gathered tokens / dp``.

    Every field is per rank (one GPU), in seconds, and valid for any dp size.

    :ivar overhead_s: Fixed time of every step run with CUDA graphs: the all-gather, the
        scheduler, sampling. Range > 0. Set with :attr:`decode_s_per_request` so that a
        balanced decode step at 279 requests per rank takes the LMSYS 100 ms.
    :ivar graph_loss_s: Extra fixed time of a step that cannot use CUDA graphs because some
        rank extends (eager kernel launches). Range >= 0. Not published; an assumption of the
        order of a 61-layer model's launch overhead.
    :ivar extend_s_per_token: A rank's own work (attention and dense layers) per prompt token
        it extends. Range > 0. 40% of the LMSYS prefill time per token (assumed split).
    :ivar decode_s_per_request: A rank's own attention work per decoding request. Range > 0.
    :ivar moe_s_per_token: The shared MoE part per gathered token, spread over the dp ranks
        (expert parallelism). Range > 0. 60% of the LMSYS prefill time per token.
    :ivar chunked_prefill_size: SGLang's global ``--chunked-prefill-size``; each rank's
        budget is ``chunked_prefill_size // dp_size`` (at least 1). Range >= 1.
    """

    overhead_s: float = field(default=0.020, validator=_positive)
    graph_loss_s: float = field(default=0.015, validator=_non_negative)
    extend_s_per_token: float = field(default=61.2e-6, validator=_positive)
    decode_s_per_request: float = field(default=194.9e-6, validator=_positive)
    moe_s_per_token: float = field(default=91.8e-6, validator=_positive)
    chunked_prefill_size: int = field(default=8192, validator=_positive_int)

    def chunk_budget(self, dp_size: int) -> int:
        """Prompt tokens one rank may extend per step (SGLang divides the global size by dp)."""
        return max(self.chunked_prefill_size // dp_size, 1)

    def rank_work_s(self, extend_tokens: int, decode_requests: int) -> float:
        """One rank's own work in a step: an extend batch if *extend_tokens* > 0, else a
        decode batch of *decode_requests*, else an idle batch (0)."""
        if extend_tokens > 0:
            return extend_tokens * self.extend_s_per_token
        return decode_requests * self.decode_s_per_request

    def step(self, extend_tokens: Sequence[int], decode_requests: Sequence[int]) -> StepTime:
        """The step all ranks run together; rank ``i`` extends ``extend_tokens[i]`` tokens
        (prefill first: its decode requests then wait) or decodes ``decode_requests[i]``.

        Raises :class:`ValueError` when the sequences differ in length or hold a negative
        count. With no tokens anywhere there is no step (duration 0).
        """
        if len(extend_tokens) != len(decode_requests):
            msg = f"one entry per rank: {len(extend_tokens)} extend counts, {len(decode_requests)} decode counts"
            raise ValueError(msg)
        work = []
        gathered = 0
        extending = False
        for e, d in zip(extend_tokens, decode_requests):
            if e < 0 or d < 0:
                raise ValueError(f"token and request counts must be >= 0, got extend {e}, decode {d}")
            if e > 0:
                extending = True
                gathered += e
                work.append(e * self.extend_s_per_token)
            else:
                gathered += d
                work.append(d * self.decode_s_per_request)
        if not gathered:
            return StepTime(0.0, tuple(work), True, 0)
        n = len(work)
        duration = (
            self.overhead_s
            + (self.graph_loss_s if extending else 0.0)
            + max(work)
            + self.moe_s_per_token * gathered / n
        )
        return StepTime(duration, tuple(work), not extending, gathered)

    def step_time_s(self, extend_tokens: Sequence[int], decode_requests: Sequence[int]) -> float:
        """Just the duration of :meth:`step`."""
        return self.step(extend_tokens, decode_requests).duration_s

    def rows(self, dp_size: int) -> list[tuple[str, str, str]]:
        """(parameter, value, source) for the printed report."""
        return [
            ("step overhead", f"{self.overhead_s * 1e3:g} ms", "LMSYS 2025-05-05 decode point (ITL 100 ms)"),
            ("CUDA-graph loss", f"{self.graph_loss_s * 1e3:g} ms while any rank extends", "assumed; "
             "graphs need every rank decode/idle (SGLang dp_attn.py)"),
            ("extend work", f"{self.extend_s_per_token * 1e6:g} us per prompt token per rank",
             "LMSYS 52.3k in tok/s per node, 40% of it (assumed split)"),
            ("decode work", f"{self.decode_s_per_request * 1e6:g} us per running request per rank",
             "LMSYS 22.3k out tok/s per node at 100 ms ITL"),
            ("MoE", f"{self.moe_s_per_token * 1e6:g} us per gathered token / dp", "LMSYS prefill, 60% (assumed)"),
            ("chunk budget", f"{self.chunk_budget(dp_size):,} tokens per rank "
             f"({self.chunked_prefill_size:,} / dp {dp_size})", "SGLang parallel_hook.py handle_data_parallelism"),
        ]  # fmt: skip


def calibration(model: StepModel | None = None) -> dict[str, float]:
    """The two LMSYS operating points as the model reproduces them, per 8-GPU node.

    ``prefill_tokens_per_node_s``: every rank extends 16,384-token batches (large prefill
    batches, as a PD prefill node runs); ``decode_tokens_per_node_s`` and ``decode_itl_s``:
    every rank decodes the batch that fills a 100 ms step at the LMSYS rate.
    """
    m = model or StepModel()
    dp = GPUS_PER_NODE
    big = 16_384
    prefill = m.step_time_s([big] * dp, [0] * dp)
    batch = round(LMSYS_DECODE_TOKENS_PER_NODE_S / GPUS_PER_NODE * LMSYS_ITL_S)
    decode = m.step_time_s([0] * dp, [batch] * dp)
    return {
        "prefill_tokens_per_node_s": big * dp / prefill,
        "decode_batch_per_rank": float(batch),
        "decode_itl_s": decode,
        "decode_tokens_per_node_s": batch * dp / decode,
    }
