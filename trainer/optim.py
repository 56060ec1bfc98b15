"""The optimizers (--optimizer adamw | muon) and the warmup + cosine learning-rate schedule.

adamw: AdamW on everything; matrices decay, norms and biases do not.

muon: Muon (torch.optim.Muon: momentum, then the update orthogonalised by a Newton-Schulz iteration; Jordan et al.
2024, "Muon: An optimizer for hidden layers in neural networks") on the 2-D weight matrices inside the decoder layers
(attention and MLP projections), and AdamW on the rest: the token embedding (which is also the tied LM head), an
untied lm_head, a reward model's score head, norms and biases. That is the split of nanochat and the modded-nanogpt
speedruns: orthogonalised updates suit hidden matrices, not a lookup table or a classifier.

Both are one torch.optim.Optimizer object (MuonAdamW wraps the two), so everything that takes an optimizer works
unchanged: state_dict / load_state_dict (checkpoints and --resume), torch.distributed.checkpoint's get_state_dict /
set_state_dict (--fsdp), zero_grad, GradScaler, and the loop's schedule, which sets every group's "lr". A Muon group
carries "lr_scale" = --muon_lr / --learning_rate and steps with lr x lr_scale, so one schedule drives both halves and
Muon keeps its own, larger peak rate (0.02 by default, as in Keller Jordan's runs).
"""

import math

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")
MUON_LR = 0.02  # Muon's peak learning rate (the original Muon runs use 0.02-0.05 with the "original" lr adjustment)


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, device: torch.device,
                    betas: tuple[float, float] = (0.9, 0.95), optimizer: str = "adamw",
                    muon_lr: float = MUON_LR) -> torch.optim.Optimizer:
    """AdamW (matrices decay; norms and biases do not), or with optimizer="muon" a MuonAdamW: Muon on the decoder
    layers' 2-D matrices at muon_lr, AdamW on the rest at learning_rate. Frozen weights are left out."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if optimizer == "muon" and is_hidden_matrix(name, p)]
    taken = {id(p) for p in hidden}
    rest = [p for _, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every tensor in one pass, on CPU as on CUDA: far faster than the foreach loop and equal
    # to it within fp32 rounding (figures in docs/performance.md).
    adamw = dict(lr=learning_rate, betas=betas, fused=device.type in ("cuda", "cpu"))
    if not hidden:
        return torch.optim.AdamW([g for g in groups if g["params"]], **adamw)
    muon_groups = [{"params": hidden, "weight_decay": weight_decay, "lr_scale": muon_lr / learning_rate}]
    return MuonAdamW(muon_groups, [g for g in groups if g["params"]], muon=dict(lr=muon_lr), adamw=adamw)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a decoder layer (q/k/v/o, gate/up/down, a LoRA A or B, a router): what Muon updates."""
    return param.dim() == 2 and ".layers." in f".{name}"


class MuonAdamW(torch.optim.Optimizer):
    """Muon on some parameter groups, AdamW on the others, as one optimizer.

    It holds a torch.optim.Muon and a torch.optim.AdamW and shares their parameter groups and their state with its
    own: `param_groups` is Muon's groups then AdamW's (the same dicts), `state` one dict for both (their parameters
    are disjoint). So the base class's state_dict / load_state_dict / zero_grad are the usual ones, and step() lets
    each half update its own groups with its own algorithm. A group with "lr_scale" steps at lr x lr_scale.
    """

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], muon: dict, adamw: dict):
        self.muon = torch.optim.Muon(muon_groups, **muon)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        self.muon_groups = len(self.muon.param_groups)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        """Point both halves at this optimizer's groups and state (again after load_state_dict replaced them)."""
        self.muon.param_groups = self.param_groups[:self.muon_groups]
        self.adamw.param_groups = self.param_groups[self.muon_groups:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        """The saved state and hyperparameters, but this run's lr_scale (its --muon_lr, as lr is this run's
        schedule's)."""
        scales = [group.get("lr_scale") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, scale in zip(self.param_groups, scales):
            if scale is not None:
                group["lr_scale"] = scale
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        schedule_lrs = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        try:
            self.muon.step()
            self.adamw.step()
        finally:
            for group, lr in zip(self.param_groups, schedule_lrs):
                group["lr"] = lr
        return loss


def lr_at(step: int, total_steps: int, learning_rate: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then a cosine from learning_rate down to min_lr."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * progress))
