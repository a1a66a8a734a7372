"""What users set up instead of this package, as they set it up: the baselines the demo and the benchmarks measure.

* the **gradient-hook recipe**: the whole table trainable, a hook zeroing every other row's gradient,
  AdamW over the whole table, then the frozen rows restored (weight decay moves them otherwise);
* **PEFT's trainable tokens** (``TrainableTokensConfig``): a K-row delta merged into a V x D copy per call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def keep_gradient_rows(weight: nn.Parameter, reserved_ids) -> Tensor:
    """Make ``weight`` trainable with a hook that zeroes every row's gradient but ``reserved_ids``; returns the row
    mask."""
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
    mask[torch.as_tensor(reserved_ids, device=weight.device)] = True
    weight.register_hook(lambda g: g * mask)
    return mask


def hook_recipe(weight: nn.Parameter, reserved_ids, lr: float = 1e-3, weight_decay: float = 0.01):
    """(AdamW over the whole table, ``restore()``): the gradient-hook recipe, frozen rows restored after each step."""
    mask = keep_gradient_rows(weight, reserved_ids)
    frozen = weight.detach().clone()  # weight decay moves every row: keep them to restore

    def restore() -> None:
        with torch.no_grad():
            torch.where(mask, weight, frozen, out=weight)

    return torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay), restore


def peft_trainable_tokens(model: nn.Module, module_name: str, reserved_ids) -> nn.Module:
    """``model`` wrapped by PEFT's trainable tokens on its submodule ``module_name`` (the embedding), for
    ``reserved_ids``."""
    import peft

    ids = torch.as_tensor(reserved_ids).tolist()
    return peft.get_peft_model(model, peft.TrainableTokensConfig(target_modules=[module_name], token_indices=ids))
