"""Random-weight scGPT checkpoints in the published folder layout, built with the official code.

Shared by the comparison tests and ``benchmarks/embed_scgpt.py``. Needs the official ``scgpt``
package (0.2.4, installed with ``--no-deps``) and a ``torchtext`` stand-in on the path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ("<pad>", "<cls>", "<eoc>")


def official_args(*, d_model: int, nhead: int, d_hid: int, nlayers: int, **extra) -> dict:
    """A whole-human-style ``args.json`` at the given size."""
    args = {
        "embsize": d_model,
        "nheads": nhead,
        "d_hid": d_hid,
        "nlayers": nlayers,
        "n_layers_cls": 3,
        "dropout": 0.2,
        "pad_token": "<pad>",
        "pad_value": -2,
        "mask_value": -1,
        "n_bins": 51,
        "max_seq_len": 1200,
        "MVC": True,
        "input_style": "binned",
        "input_emb_style": "continuous",
    }
    return {**args, **extra}


def with_specials(genes) -> dict[str, int]:
    """``{gene: id}`` for ``genes`` with the specials appended, as the pretraining script does."""
    vocab = {g: i for i, g in enumerate(genes)}
    for special in SPECIALS:
        vocab.setdefault(special, len(vocab))
    return vocab


def official_model(vocab: dict[str, int], args: dict, *, seed: int = 0, randomize: bool = False):
    """The official ``TransformerModel`` built as ``scgpt.tasks.embed_data`` builds it (torch path).

    ``randomize`` draws every parameter afresh, so layers differ and norms and biases are not
    trivial (torch's encoder otherwise deep-copies one layer).
    """
    from scgpt.model import TransformerModel

    torch.manual_seed(seed)
    model = TransformerModel(
        ntoken=len(vocab),
        d_model=args["embsize"],
        nhead=args["nheads"],
        d_hid=args["d_hid"],
        nlayers=args["nlayers"],
        nlayers_cls=args["n_layers_cls"],
        n_cls=1,
        vocab=vocab,
        dropout=args["dropout"],
        pad_token=args["pad_token"],
        pad_value=args["pad_value"],
        do_mvc=True,
        do_dab=False,
        use_batch_labels=False,
        domain_spec_batchnorm=False,
        explicit_zero_prob=False,
        use_fast_transformer=False,
        fast_transformer_backend="flash",
        pre_norm=False,
    )
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.randn_like(p) * 0.2)
                if "norm" in name and name.endswith("weight"):
                    p.add_(1.0)
    return model.eval()


def checkpoint_layout(state_dict, layout: str = "flash", *, flag_dim: int | None = None) -> dict:
    """Rename a torch-layout state dict into a published layout.

    ``flash`` is the whole-human file (``self_attn.Wqkv.*``), ``flash2`` the unreleased
    ``self_attn._impl.*`` naming, ``ddp`` the flash naming under a ``module.`` prefix, ``torch``
    leaves names as they are. ``cls_decoder.*`` is dropped (the published file has none) and a
    ``flag_encoder.weight`` is added when ``flag_dim`` is given.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith("cls_decoder."):
            continue
        if layout == "flash":
            k = k.replace("self_attn.in_proj_", "self_attn.Wqkv.")
        elif layout == "flash2":
            k = k.replace("self_attn.in_proj_", "self_attn._impl.Wqkv.")
            k = k.replace("self_attn.out_proj.", "self_attn._impl.out_proj.")
        elif layout == "ddp":
            k = "module." + k.replace("self_attn.in_proj_", "self_attn.Wqkv.")
        elif layout != "torch":
            raise ValueError(layout)
        out[k] = v.clone()
    if flag_dim is not None:
        out["flag_encoder.weight"] = torch.randn(2, flag_dim)
    return out


def write_folder(path, state_dict, args: dict, vocab: dict[str, int]) -> Path:
    """Write ``args.json``, ``vocab.json`` and ``best_model.pt`` into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "args.json").write_text(json.dumps(args))
    (path / "vocab.json").write_text(json.dumps(vocab))
    torch.save(state_dict, path / "best_model.pt")
    return path


def official_folder(path, genes, *, d_model=32, nhead=4, d_hid=None, nlayers=2, seed=0):
    """Build a random official model over ``genes`` and save it as a published folder.

    Returns ``(folder, official_model, vocab)``.
    """
    args = official_args(d_model=d_model, nhead=nhead, d_hid=d_hid or d_model, nlayers=nlayers)
    vocab = with_specials(genes)
    model = official_model(vocab, args, seed=seed)
    state = checkpoint_layout(model.state_dict(), "flash", flag_dim=d_model)
    return write_folder(path, state, args, vocab), model, vocab


def load_official(folder):
    """Load a folder written by :func:`official_folder` back into the official model."""
    args = json.loads((Path(folder) / "args.json").read_text())
    vocab = json.loads((Path(folder) / "vocab.json").read_text())
    model = official_model(vocab, args)
    state = torch.load(Path(folder) / "best_model.pt", weights_only=True)
    state = {k.replace("self_attn.Wqkv.", "self_attn.in_proj_"): v for k, v in state.items()}
    state.pop("flag_encoder.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("cls_decoder.") for k in missing), (
        missing,
        unexpected,
    )
    return model.eval(), vocab, args
