"""Data-parallel lockstep: the ranks of one vLLM engine serving a mixture-of-experts model.

With `--data-parallel-size` > 1 on a MoE model, vLLM runs one engine core per rank
(`DPEngineCoreProc`, vllm/v1/engine/core.py) and keeps them in step: every MoE layer
all-gathers the tokens of all ranks for the experts and reduce-scatters the results
(expert parallel), so no rank can finish a forward pass before the others reach the same
layer, and a rank with nothing scheduled runs a dummy batch (`execute_dummy_batch`) while
any rank still has requests, so that the collectives line up. Before each forward the ranks
also agree on the token count, padding every rank to the largest (vllm/v1/worker/dp_utils.py,
`coordinate_batch_across_dp`, when CUDA graphs are on).

Modelled here: the group's ranks start every step together; each rank schedules its own
batch (its own scheduler and KV cache, as in vLLM); the step lasts as long as the slowest
rank's step, and every rank's step ends then. A rank with nothing to run takes a dummy step
(it adds nothing to the duration: a dummy batch costs no more than the busiest rank's step).
A request that reaches a rank mid-step waits for the next common step.

What the expert-parallel layers see: the tokens of all ranks (`ep_tokens`, passed to the
latency model). When every rank's batch fits a CUDA graph (at most `pad_max_tokens` tokens;
vLLM's default capture limit is min(2·max_num_seqs, 512), vllm/config/vllm.py) the ranks
are padded to the largest: ranks × the largest count. A larger batch runs without CUDA
graphs and unpadded (`should_dp_pad` is false when the synced CUDA-graph mode is NONE): the
sum of the ranks' tokens, an idle rank's dummy batch counting one.

Not modelled: vLLM keeps stepping dummy batches for up to `dp_sync_interval` steps after the
last request everywhere finished (it checks for global work only every few steps); a
request arriving then waits for that dummy step to end. The group instead goes idle at once.
"""

from __future__ import annotations


class LockstepGroup:
    """Instances (data-parallel ranks) that step together. Each member's `group` points here;
    an idle member woken by new work wakes the group, and each active member reports the end
    of its part of a step with `step_done`."""

    def __init__(self, loop, members, pad_max_tokens: int = 0):
        if len(members) < 2:
            raise ValueError("a lockstep group needs at least two instances")
        self.loop = loop
        self.members = list(members)
        for m in self.members:
            if m.group is not None:
                raise ValueError(f"instance {m.index} is already in a lockstep group")
            m.group = self
        self.pad_max_tokens = int(pad_max_tokens)
        self.busy = False
        self._pending = 0
        self.num_steps = 0
        # per member index: steps it ran a dummy batch in, and the time it waited for slower ranks
        self.dummy_steps = {m.index: 0 for m in self.members}
        self.stretched_s = {m.index: 0.0 for m in self.members}

    def wake(self, now: float) -> None:
        """A member got work: start a common step unless one is under way."""
        if not self.busy:
            self._start(now)

    def step_done(self, now: float) -> None:
        """An active member finished its part of the current step (its outputs are out)."""
        self._pending -= 1
        if self._pending == 0:
            self._start(now)

    def ep_tokens(self, tokens: list[int]) -> int:
        """Tokens the expert-parallel layers see in a step whose active ranks schedule
        `tokens` (the other members run one-token dummy batches)."""
        idle = len(self.members) - len(tokens)
        if max(tokens) <= self.pad_max_tokens:
            return len(self.members) * max(tokens)
        return sum(tokens) + idle

    def _start(self, now: float) -> None:
        self.busy = True  # scheduling can wake a member (a pin released): no nested start
        outs = []
        for m in self.members:
            out = m.schedule_step(now)
            if out is not None:
                outs.append((m, out))
        if not outs:
            self.busy = False
            return
        n_ep = self.ep_tokens([out.num_scheduled_tokens for _, out in outs])
        plans = [(m, out, m.price_step(out, n_ep)) for m, out in outs]
        dur = max(d for _, _, d in plans)
        self._pending = len(plans)
        self.num_steps += 1
        active = {m.index for m, _, _ in plans}
        for m in self.members:
            if m.index not in active:
                self.dummy_steps[m.index] += 1
        for m, out, d in plans:
            self.stretched_s[m.index] += dur - d
            m.run_step(out, now, dur)
