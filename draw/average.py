"""An exponential moving average of a model's weights, kept beside the trained weights (`--ema DECAY`).

After the n-th optimizer step, with decay d and the weights p_1 .. p_n after each step:
    a_n = d a_{n-1} + (1 - d) p_n,  a_0 = 0          (one foreach lerp per step: no host sync, so a
                                                     CUDA-graph step captures it with the rest)
    average_n = a_n / (1 - d^n) = sum_k w_k p_k,     w_k = (1 - d) d^(n-k) / (1 - d^n),  sum_k w_k = 1
a weighted mean of every step's weights that leans on the last ~1 / (1 - d) steps. Dividing by 1 - d^n
(as Adam debiases its moments) makes it the weights themselves after one step, not (1 - d) of them, so an
evaluation early in a run sees no pull towards zero. The checkpoint holds a_n and n, so a resumed run
continues the same sum bit for bit.
"""

import torch
import torch.nn as nn

from draw.config import check_decay


class WeightAverage:
    """The running sum a_n of `model`'s parameters and its count n (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = check_decay(decay)
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.sums = [torch.zeros_like(p, requires_grad=False) for p in self.params]  # a_0 = 0
        self.updates = 0  # n, counted on the host (`counted`), once per optimizer step

    @torch.no_grad()
    def update(self) -> None:
        """a_n = a_{n-1} + (1 - d) (p_n - a_{n-1}): after the optimizer step, inside the step (capturable)."""
        torch._foreach_lerp_(self.sums, [p.detach() for p in self.params], 1 - self.decay)

    def counted(self) -> None:
        """n += 1: once per step that ran `update` (a replayed CUDA graph runs it without Python)."""
        self.updates += 1

    @torch.no_grad()
    def weights(self) -> dict[str, torch.Tensor]:
        """{parameter name: average_n} (a_n / (1 - d^n)); before any step, the model's own weights."""
        if self.updates == 0:
            return {name: p.detach().clone() for name, p in zip(self.names, self.params)}
        return _debiased(dict(zip(self.names, self.sums)), self.decay, self.updates)

    @torch.no_grad()
    def copy_into(self, model: nn.Module) -> nn.Module:
        """model (built like the averaged one) with its parameters set to the average; returned."""
        params = [p for _, p in model.named_parameters()]
        if self.updates == 0:
            torch._foreach_copy_(params, [p.detach() for p in self.params])
        else:
            torch._foreach_copy_(params, self.sums)
            torch._foreach_mul_(params, _scale(self.decay, self.updates))
        return model

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "sums": {name: a.detach().cpu() for name, a in zip(self.names, self.sums)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if check_decay(state["decay"]) != self.decay:
            raise ValueError(f"the saved weight average has decay {state['decay']}, this run {self.decay}")
        check_names_and_shapes(state["sums"], dict(zip(self.names, self.sums)))
        for name, a in zip(self.names, self.sums):
            a.copy_(state["sums"][name])
        self.updates = int(state["updates"])


def check_names_and_shapes(sums: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """A saved average's sums against the parameters they average: the same names and shapes, else ValueError."""
    if set(sums) != set(params):
        raise ValueError(f"the saved weight average holds {sorted(set(sums) ^ set(params))} where the model's "
                         "parameters differ")
    wrong = [name for name, p in params.items() if tuple(sums[name].shape) != tuple(p.shape)]
    if wrong:
        raise ValueError(f"the saved weight average's {', '.join(wrong)} do not have the parameters' shapes")


def _scale(decay: float, updates: int) -> float:
    """1 / (1 - d^n): a_n's debiasing factor (d^n in float64, then one rounding)."""
    return 1 / (1 - decay**updates)


def _debiased(sums: dict[str, torch.Tensor], decay: float, updates: int) -> dict[str, torch.Tensor]:
    scale = _scale(decay, updates)
    return {name: a * scale for name, a in sums.items()}


def averaged_weights(state: dict) -> dict[str, torch.Tensor] | None:
    """{parameter name: average_n} from a saved WeightAverage.state_dict() (a checkpoint's "average"), or
    None when it holds no step yet."""
    updates = int(state["updates"])
    return _debiased(state["sums"], check_decay(state["decay"]), updates) if updates > 0 else None
