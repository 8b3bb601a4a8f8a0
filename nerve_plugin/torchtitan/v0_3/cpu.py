"""CPU mode's one 0.3.0-specific adaptation: causal SDPA in place of FlexAttention.

torchtitan 0.3.0's language models attend with FlexAttention (``attn_backend="sdpa"`` is refused), which has no
CPU backward in torch 2.13. On a machine without a GPU, ``use_causal_sdpa`` swaps each block's
``attention.inner_attention`` for ``CausalSDPA``: plain causal attention over the whole sequence. That is the
debug configs' mask for unpacked text; with documents packed into one sequence FlexAttention would mask across
document boundaries and SDPA does not, so a warning says so. (The other CPU adaptations are 0.2.2's:
../cpu_mode.py.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger


class CausalSDPA(nn.Module):
    """FlexAttention's call (q, k, v in B, L, N, H; out the same), computed by causal SDPA."""

    def forward(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **kwargs):
        if isinstance(q, DTensor):
            # Under TP the heads are sharded and attention is per head: each rank's own heads, exactly (CPU SDPA
            # has no DTensor sharding rule).
            local = self.forward(q.to_local(), k.to_local(), v.to_local(), scale=scale, enable_gqa=enable_gqa)
            return DTensor.from_local(local, q.device_mesh, q.placements, run_check=False)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
        return out.transpose(1, 2)


def use_causal_sdpa(model: nn.Module) -> int:
    """On a machine without a GPU, CausalSDPA for every FlexAttention in ``model``; how many were swapped."""
    if torch.cuda.is_available():
        return 0
    from torchtitan.models.common.attention import FlexAttention

    swapped = 0
    for module in model.modules():
        inner = getattr(module, "inner_attention", None)
        if isinstance(inner, FlexAttention):
            module.inner_attention = CausalSDPA()
            swapped += 1
    if swapped:
        logger.warning(
            f"nerve CPU mode: {swapped} FlexAttention modules (no CPU backward) run as causal SDPA, which does not "
            f"mask across packed documents"
        )
    return swapped
