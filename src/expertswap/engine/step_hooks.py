"""The engine's side of every forward, run by the step guard under the step lock."""

from __future__ import annotations

from collections.abc import Callable

from expertswap.engine.budget.controller import BudgetController
from expertswap.engine.moe.runtime import Runtime


class BetweenSteps:
    """Pending budgets land before a forward, the policy decides what it may load, the trace marks its steps."""

    def __init__(self, budget: BudgetController, runtime: Runtime) -> None:
        self.budget = budget
        self.runtime = runtime

    def before_step(self, is_prefill: bool, finish: Callable[[], None] | None = None) -> None:
        self.budget.apply_pending(finish)
        self.runtime.begin_step(is_prefill)

    def after_step(self, is_prefill: bool) -> None:
        self.runtime.end_step(is_prefill)

    def out_of_memory(self, error: BaseException) -> bool:
        return self.budget.shrink_after_oom(error)
