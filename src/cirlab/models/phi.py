"""Phi: the mapping network of projection-based zero-shot CIR (Pic2Word, SEARLE, LinCIR).

Phi turns an embedding (a CLIP image embedding at inference; for LinCIR a text embedding during
training) into one *pseudo-word*: a vector in the text encoder's token-embedding space, injected
at the ``$`` of "a photo of $ that {text}" (:func:`cirlab.models.backbone.inject_pseudo`).

* ``pic2word``: [Linear(d -> 512), Dropout(0.1), ReLU] x 2, Linear(512 -> token width)
  (google-research/composed_image_retrieval, ``IM2TEXT``);
* ``searle`` (SEARLE and LinCIR): Linear(p -> 4p)-GELU-Dropout(0.5)-Linear(4p -> 4p)-GELU-
  Dropout(0.5)-Linear(4p -> token width) (miccunifi/SEARLE, navervision/lincir ``Phi``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from .heads import read_head, save_head

Style = Literal["pic2word", "searle"]


class Phi(nn.Module):
    def __init__(self, style: Style, input_dim: int, token_dim: int, hidden_dim: int | None = None,
                 dropout: float | None = None):
        super().__init__()
        if style == "pic2word":
            hidden, p = hidden_dim or 512, 0.1 if dropout is None else dropout
            layers: list[nn.Module] = [nn.Linear(input_dim, hidden), nn.Dropout(p), nn.ReLU(),
                                       nn.Linear(hidden, hidden), nn.Dropout(p), nn.ReLU(), nn.Linear(hidden, token_dim)]
        elif style == "searle":
            hidden, p = hidden_dim or 4 * input_dim, 0.5 if dropout is None else dropout
            layers = [nn.Linear(input_dim, hidden), nn.GELU(), nn.Dropout(p), nn.Linear(hidden, hidden), nn.GELU(),
                      nn.Dropout(p), nn.Linear(hidden, token_dim)]
        else:
            raise ValueError(f"Phi style must be 'pic2word' or 'searle', got {style!r}")
        self.style, self.hidden_dim, self.dropout = style, hidden, p
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    @property
    def input_dim(self) -> int:
        return self.layers[0].in_features

    @property
    def token_dim(self) -> int:
        return self.layers[-1].out_features


def save_phi(phi: Phi, path: str | Path, backbone: str | None = None) -> Path:
    config = {"style": phi.style, "input_dim": phi.input_dim, "token_dim": phi.token_dim,
              "hidden_dim": phi.hidden_dim, "dropout": phi.dropout}
    return save_head(phi, path, "phi", config, backbone=backbone)


def load_phi(path: str | Path, backbone: str | None = None) -> Phi:
    config, state = read_head(path, "phi", backbone)
    phi = Phi(**config)
    phi.load_state_dict(state)
    return phi
