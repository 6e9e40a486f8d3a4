"""The CLIP4Cir Combiner, and its all-pairs evaluation for Bi-BLIP4CIR's reversed loss.

The Combiner fuses an image feature and a text feature into one L2-normalised query feature:
a learned residual MLP on the two projections, plus a learned convex mix of the raw inputs.
State-dict keys match the official checkpoints except two prefixes: the official
``text_projection_layer`` / ``image_projection_layer`` are ``text_proj`` / ``image_proj`` here
(``combiner_layer``, ``output_layer`` and ``dynamic_scalar.{0,3}`` are the same).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .heads import read_head, save_head


class Combiner(nn.Module):
    """CLIP4Cir Combiner (feature dim d, projection P, hidden H), as in the official code:

    ``p_t = Dropout(ReLU(text_proj(t)))``, ``p_i = Dropout(ReLU(image_proj(i)))``, ``x = [p_t, p_i]``;
    ``lam = dynamic_scalar(x)`` (Linear 2P->H, ReLU, Dropout, Linear H->1, Sigmoid);
    ``out = normalize(output_layer(Dropout(ReLU(combiner_layer(x)))) + lam * t + (1 - lam) * i)``.
    """

    def __init__(self, feature_dim: int, projection_dim: int, hidden_dim: int, dropout: float = 0.5):
        super().__init__()
        self.text_proj = nn.Linear(feature_dim, projection_dim)
        self.image_proj = nn.Linear(feature_dim, projection_dim)
        self.text_dropout = nn.Dropout(dropout)
        self.image_dropout = nn.Dropout(dropout)
        self.combiner_layer = nn.Linear(2 * projection_dim, hidden_dim)
        self.combiner_dropout = nn.Dropout(dropout)
        self.output_layer = nn.Linear(hidden_dim, feature_dim)
        self.dynamic_scalar = nn.Sequential(
            nn.Linear(2 * projection_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1), nn.Sigmoid(),
        )
        self.logit_scale = 100.0  # fixed, not learned (CLIP4Cir)

    def _project(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        return self.image_dropout(F.relu(self.image_proj(image))), self.text_dropout(F.relu(self.text_proj(text)))

    def _head(self, hidden: Tensor, gate: Tensor, image: Tensor, text: Tensor) -> Tensor:
        """Everything after the first layers on the concatenation, from their pre-activations."""
        residual = self.output_layer(self.combiner_dropout(F.relu(hidden)))
        lam = self.dynamic_scalar[1:](gate)
        return F.normalize(residual + lam * text + (1 - lam) * image, dim=-1)

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        """Composed query feature (B, d), L2-normalised ("combine_features")."""
        image_p, text_p = self._project(image, text)
        x = torch.cat((text_p, image_p), -1)  # official order: text first
        return self._head(self.combiner_layer(x), self.dynamic_scalar[0](x), image, text)

    def pair_logits(
        self,
        targets: Tensor,
        back_text: Tensor,
        refs: Tensor,
        chunk_size: int | None = None,
        checkpoint_chunks: bool = False,
    ) -> Tensor:
        """Bi-BLIP4CIR stage II reversed logits ``[i, j] = scale * <combine(T_j, t_i), normalize(R_i)>`` (B, B).

        The official code calls the Combiner on B*B repeated rows. Here the projections run once
        per item, and the first layers on the concatenation are split column-wise:
        ``W [p_t_i, p_T_j] + b = (W_t p_t_i + b) + W_T p_T_j``, two (B, H) products broadcast-added
        to the (B, B, H) pre-activation, which is unavoidable since the ReLU must see every pair.
        Only the layers after it run per pair. That removes the per-pair 2P x H products, the
        bulk of the cost. ``chunk_size`` rows i at a time bound the forward's peak memory;
        ``checkpoint_chunks`` also recomputes each chunk in backward, so training memory is bounded too.

        Dropout: the official naive call draws the projection dropout masks per repeated row, i.e.
        per pair; here they are drawn per item and shared by its B pairs. Each pair's marginal
        distribution, hence the expected loss, is the same; only the correlation across pairs differs.
        The later dropouts act per pair in both. Eval mode (or dropout 0) gives identical results.

        In-batch only: under DDP these logits (and the loss) are local to each rank.
        """
        image_p, text_p = self._project(targets, back_text)
        p = text_p.shape[-1]

        def split(layer: nn.Linear) -> tuple[Tensor, Tensor]:
            # Both column blocks in one batched product: (2, B, P) @ (2, P, H). Slicing the weight
            # instead costs a zero-filled full-size gradient per slice in backward.
            blocks = layer.weight.view(len(layer.weight), 2, p).permute(1, 2, 0)
            text_part, image_part = torch.stack((text_p, image_p)) @ blocks
            return text_part + layer.bias, image_part

        comb_t, comb_i = split(self.combiner_layer)
        gate_t, gate_i = split(self.dynamic_scalar[0])
        refs = F.normalize(refs, dim=-1)

        def rows(comb_t: Tensor, gate_t: Tensor, text: Tensor, ref: Tensor) -> Tensor:
            out = self._head(comb_t[:, None] + comb_i, gate_t[:, None] + gate_i, targets, text[:, None])
            return (out * ref[:, None]).sum(-1)

        step = chunk_size or len(targets)
        chunks = []
        for s in range(0, len(targets), step):
            args = (comb_t[s : s + step], gate_t[s : s + step], back_text[s : s + step], refs[s : s + step])
            chunks.append(checkpoint(rows, *args, use_reentrant=False) if checkpoint_chunks else rows(*args))
        return self.logit_scale * torch.cat(chunks)


def save_combiner(combiner: Combiner, path: str | Path, backbone: str | None = None) -> Path:
    """Write the Combiner as a head folder (weights + sizes + the fingerprint of the backbone whose
    features it composes)."""
    config = {"feature_dim": combiner.text_proj.in_features, "projection_dim": combiner.text_proj.out_features,
              "hidden_dim": combiner.combiner_layer.out_features, "dropout": combiner.text_dropout.p,
              "logit_scale": combiner.logit_scale}
    return save_head(combiner, path, "combiner", config, backbone=backbone)


def load_combiner(path: str | Path, backbone: str | None = None) -> Combiner:
    """Rebuild a Combiner from its folder alone (no training code or run config needed);
    ``backbone``: the fingerprint of the backbone it is used with, checked against the folder's."""
    config, state = read_head(path, "combiner", backbone)
    scale = config.pop("logit_scale", 100.0)
    combiner = Combiner(**config)
    combiner.load_state_dict(state)
    combiner.logit_scale = scale
    return combiner
