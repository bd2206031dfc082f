"""The methods `sera run` compares, as data: which stages an iteration t >= 2 runs and which models it uses.

Every method trains iteration 1 the same way (pi_1 from pi_0 on the offline training split, reference pi_0),
so their reports share a first row; they differ from iteration 2 on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    select: bool            # t >= 2: score the offline data with (pi_{t-1}, pi_{t-2}) and keep the top k1
    bootstrap: bool         # t >= 2: generate N responses per prompt with pi_{t-1} and keep the top k2 pairs
    ensemble: bool          # t >= 3: IRM_t = lambda * IRM_{t-1} + (1 - lambda) * IRM_now (Eq. 7)
    max_iterations: int | None = None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sera", "SeRA: sample selection + preference bootstrapping with the IRM ensemble",
           select=True, bootstrap=True, ensemble=True),
    Method("sera-select", "SeRA without bootstrapping (k2 = 0): sample selection only",
           select=True, bootstrap=False, ensemble=True),
    Method("iterative-dpo", "DPO on all offline data each iteration, reference updated to the previous policy",
           select=False, bootstrap=False, ensemble=False),
    Method("dpo", "one DPO iteration on all offline data, reference = the SFT policy",
           select=False, bootstrap=False, ensemble=False, max_iterations=1),
)}


def method(name: str) -> Method:
    return METHODS[name]
