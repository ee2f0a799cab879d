"""cellformers: single-cell transformer foundation models on the command line.

Models are given by registered name (``cellformers list``), an official checkpoint folder, a
folder written by ``model.save`` (or ``cellformers convert``), or a Hugging Face repository id.
"""

from __future__ import annotations

import argparse
import os
import sys

_CHUNK = 2048  # cells per progress-bar step (results do not depend on it)


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


# ---------------------------------------------------------------------------------- parser
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellformers",
        description=__doc__.splitlines()[0],
        epilog="Run `cellformers COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def data_command(name: str, help: str, *, model_help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("input", metavar="IN.h5ad", help="cells to process (raw counts)")
        p.add_argument("--model", "-m", required=True, metavar="NAME|DIR", help=model_help)
        p.add_argument("--output", "-o", required=True, metavar="OUT.h5ad", help="file to write")
        p.add_argument("--layer", help="layer of IN holding the counts (default: X)")
        p.add_argument(
            "--gene-key", help="var column holding gene names/Ensembl IDs (default: var_names)"
        )
        p.add_argument("--batch-size", type=int, default=64, help="cells per forward pass")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
        p.add_argument(
            "--backed", action="store_true", help="read IN backed (cells stream from disk)"
        )
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        return p

    model_help = "registered name, checkpoint folder, saved model folder or Hugging Face id"
    embed = data_command(
        "embed", "write cell embeddings into obsm of a copy of IN", model_help=model_help
    )
    embed.add_argument("--key-added", help="obsm key (default: X_<family>, e.g. X_scgpt)")
    annotate = data_command(
        "annotate",
        "predict cell types with a fine-tuned model into obs of a copy of IN",
        model_help="fine-tuned model: saved model folder, checkpoint folder or registered name",
    )
    annotate.add_argument("--key-added", default="cf_celltype", help="obs column for labels")
    annotate.add_argument(
        "--unknown-threshold",
        type=float,
        help="label cells whose best class probability is below this as unknown",
    )
    perturb = data_command(
        "perturb",
        "in-silico perturbation: write cells x perturbations embedding shifts to OUT",
        model_help=model_help,
    )
    perturb.add_argument("--genes", nargs="+", required=True, help="genes, each on its own")
    perturb.add_argument("--mode", default="delete", choices=("delete", "knockdown", "overexpress"))
    perturb.add_argument("--factor", type=float, help="knockdown fraction / overexpression factor")

    info = sub.add_parser(
        "info",
        help="describe a model: family, files, size, vocabulary, coverage of a data file",
        description="Describe a model without loading the network. Registered names are "
        "described from the registry (only their vocabulary file is downloaded).",
    )
    info.add_argument("model", metavar="NAME|DIR")
    info.add_argument("--data", metavar="FILE.h5ad", help="report the vocabulary coverage of FILE")
    info.add_argument("--gene-key", help="var column of FILE holding the gene names")

    sub.add_parser("list", help="list the registered pretrained models")

    convert = sub.add_parser(
        "convert",
        help="load an official checkpoint and write it as a saved cellformers model",
        description="Load an official checkpoint (folder, file or registered name) for the "
        "genes of a reference data file and write it with model.save (loadable with "
        "Model.load and by the other commands).",
    )
    convert.add_argument("model", metavar="NAME|DIR")
    convert.add_argument("--output", "-o", required=True, metavar="OUTDIR")
    convert.add_argument("--data", required=True, metavar="REF.h5ad", help="reference cells")
    convert.add_argument("--layer")
    convert.add_argument("--gene-key")
    convert.add_argument("--overwrite", action="store_true")

    demo = sub.add_parser(
        "demo",
        help="pretrain a small scGPT on scanpy's PBMC data, embed, plot a UMAP and compare with PCA",
    )
    demo.add_argument("--outdir", default="cellformers_demo", help="folder for the UMAP image")
    demo.add_argument("--minutes", type=float, default=1.0, help="wall-time cap of the whole run")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cellformers")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0"


# ---------------------------------------------------------------------------------- helpers
def _read(path: str, *, backed: bool):
    import anndata as ad

    if not os.path.isfile(path):
        raise CLIError(f"input file {path} does not exist")
    return ad.read_h5ad(path, backed="r" if backed else None)


def _same_file(args) -> bool:
    return os.path.abspath(args.input) == os.path.abspath(args.output)


def _check_output(args) -> None:
    """Refuse to replace an existing output (other than the input) without --overwrite."""
    if os.path.exists(args.output) and not args.overwrite and not _same_file(args):
        raise CLIError(f"{args.output} exists; pass --overwrite to replace it")


def _copy_input(args) -> None:
    """Copy IN to OUT: outputs are then added to OUT without rewriting the rest of the file."""
    import shutil

    if not _same_file(args):
        shutil.copyfile(args.input, args.output)


def _elem_io():
    """``(write_elem, read_elem)`` of anndata (``anndata.io`` from 0.11, before in experimental)."""
    try:
        from anndata.io import read_elem, write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem, write_elem
    return write_elem, read_elem


def _write_elements(path: str, group: str, elements: dict) -> None:
    """Write ``elements`` into group ``group`` (``obsm``, ``obs`` ...) of an ``.h5ad`` file."""
    import h5py

    write_elem, _ = _elem_io()
    with h5py.File(path, "a") as f:
        for key, value in elements.items():
            where = f"{group}/{key}" if group else key
            if where in f:
                del f[where]
            write_elem(f, where, value)


def _saved_model(folder: str):
    """Load a folder written by ``model.save``, or return `None` for another folder.

    The model is loaded on a few stand-in cells with its registered genes and categories, so that
    any data, whatever its genes and columns, is then read as query data (as in Python).
    """
    from . import model as models

    try:
        registry = models.SCGPT.load_registry(folder)
    except Exception:  # not a saved model (or an unreadable one)
        return None
    cls = getattr(models, registry["model_name"], None)
    if cls is None:
        raise CLIError(f"{folder} holds a saved {registry['model_name']}, not a cellformers model")
    return cls.load(folder, adata=_stand_in_cells(registry))


def _stand_in_cells(registry: dict):
    """Cells with the registered genes, layer and ``obs`` columns (every category once)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    fields = registry["field_registries"]
    genes = np.asarray(fields["X"]["state_registry"]["column_names"]).astype(str)
    columns = {}
    for field in fields.values():
        state, where = field["state_registry"], field.get("data_registry", {})
        key = state.get("original_key", where.get("attr_key"))
        if where.get("attr_name") == "obs" and key and not key.startswith("_scvi"):
            columns[key] = state.get("categorical_mapping")
    n = max([len(c) for c in columns.values() if c is not None] + [1])
    X = sp.csr_matrix(
        (np.ones(n, np.float32), (np.arange(n), np.arange(n) % len(genes))), shape=(n, len(genes))
    )
    cells = ad.AnnData(X=X, var=pd.DataFrame(index=genes))
    for key, categories in columns.items():
        cells.obs[key] = np.resize(np.asarray(categories), n) if categories is not None else 1.0
    setup = registry["setup_args"]
    if setup.get("layer"):
        cells.layers[setup["layer"]] = X.copy()
    if setup.get("gene_key"):
        cells.var[setup["gene_key"]] = genes
    return cells


def _official_model_class(path: str):
    """Return the model class of an official checkpoint layout, or `None`."""
    from . import model as models

    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "args.json")):
            return models.SCGPT
        if os.path.isfile(os.path.join(path, "config.json")):
            return models.Geneformer
    return None


def _load_model(args, adata):
    """Set up ``adata`` and load the model named by ``args.model`` for it."""
    from . import model as models
    from .pretrained import PRETRAINED, resolve_pretrained
    from .pretrained._registry import FAMILY_CLASSES

    spec = args.model
    setup = {"layer": args.layer, "gene_key": args.gene_key}
    if spec in PRETRAINED:
        cls = getattr(models, FAMILY_CLASSES[PRETRAINED[spec].family])
        cls.setup_anndata(adata, **setup)
        return cls.from_pretrained(spec, adata)
    path, _ = resolve_pretrained(spec)
    path = os.fspath(path)
    model = _saved_model(path) if os.path.isdir(path) else None
    if model is not None:
        given = {k: v for k, v in setup.items() if v is not None}
        if given:  # the data's own setup, else the model's
            type(model).setup_anndata(adata, **(model._query_setup_args(adata) | given))
        return model
    cls = _official_model_class(path)
    if cls is None:
        raise CLIError(
            f"cannot tell the model family of {spec}: expected a registered name (cellformers "
            "list), a folder written by model.save, a Geneformer folder (config.json) or an "
            "scGPT folder (args.json); for scFoundation and scBERT files use their registered "
            "names or the Python API (gene list arguments)"
        )
    cls.setup_anndata(adata, **setup)
    return cls.from_pretrained(path, adata)


def _family(model) -> str:
    return type(model).__name__.lower()


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="cells", disable=quiet, file=sys.stderr)


def _load(args):
    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    _check_output(args)
    adata = _read(args.input, backed=args.backed)
    model = _load_model(args, adata)
    if args.device != "cpu":
        model.to_device(args.device)
    return adata, model


# ---------------------------------------------------------------------------------- commands
def _embed(args) -> None:
    import numpy as np

    adata, model = _load(args)
    key = args.key_added or f"X_{_family(model)}"
    parts = []
    with _progress(adata.n_obs, "embedding", args.quiet) as bar:
        for start in range(0, adata.n_obs, _CHUNK):
            idx = np.arange(start, min(start + _CHUNK, adata.n_obs))
            parts.append(
                model.get_latent_representation(adata, indices=idx, batch_size=args.batch_size)
            )
            bar.update(len(idx))
    embedding = np.concatenate(parts)
    if adata.isbacked:
        adata.file.close()
    _copy_input(args)
    _write_elements(args.output, "obsm", {key: embedding})
    print(f"Wrote obsm[{key!r}] ({embedding.shape[0]} x {embedding.shape[1]}) to {args.output}")


def _annotate(args) -> None:
    import h5py

    from .tl import annotate

    _, read_elem = _elem_io()
    if args.unknown_threshold is not None and not 0 <= args.unknown_threshold <= 1:
        raise CLIError("--unknown-threshold must be a probability in [0, 1]")
    adata, model = _load(args)
    if not getattr(model.module, "n_labels", 0):
        raise CLIError(
            f"{args.model} has no classification head; fine-tune it first "
            "(model.train(mode='finetune')) and save it"
        )
    annotate(
        adata,
        model,
        key_added=args.key_added,
        unknown_threshold=args.unknown_threshold,
        batch_size=args.batch_size,
    )
    new = adata.obs[[args.key_added, f"{args.key_added}_probability"]].copy()
    if adata.isbacked:
        adata.file.close()
    _copy_input(args)
    with h5py.File(args.output, "r") as f:
        obs = read_elem(f["obs"])
    for column in new:
        obs[column] = new[column].to_numpy()
    _write_elements(args.output, "", {"obs": obs})
    counts = new[args.key_added].value_counts()
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"Wrote obs[{args.key_added!r}] to {args.output}: {summary}")


def _perturb(args) -> None:
    if _same_file(args):
        raise CLIError("perturb writes a new AnnData (cells x perturbations); choose another -o")
    adata, model = _load(args)
    out = model.perturb(
        adata, genes=args.genes, mode=args.mode, factor=args.factor, batch_size=args.batch_size
    )
    out.write_h5ad(args.output)
    print(
        f"Wrote {out.n_obs} cells x {out.n_vars} perturbations to {args.output}; mean shift: "
        + ", ".join(f"{k} {v:.4g}" for k, v in out.var["mean_shift"].items())
    )


def _convert(args) -> None:
    import anndata as ad

    if not os.path.isfile(args.data):
        raise CLIError(f"reference file {args.data} does not exist")
    if os.path.exists(args.output) and not args.overwrite:
        raise CLIError(f"{args.output} exists; pass --overwrite to replace it")
    adata = ad.read_h5ad(args.data)
    model = _load_model(args, adata)
    model.save(args.output, overwrite=args.overwrite)
    print(f"Saved {type(model).__name__} to {args.output} (load it with --model {args.output})")


def _list(args) -> None:
    import pandas as pd

    from .pretrained import available

    table = available()[["family", "size_mb", "license", "attestation", "download", "cached"]]
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table.to_string())


def _info(args) -> None:
    from ._info import describe

    for line in describe(args.model, data=args.data, gene_key=args.gene_key):
        print(line)


def _demo(args) -> None:
    if args.minutes <= 0:
        raise CLIError("--minutes must be positive")
    from ._demo import run_demo

    run_demo(args.outdir, minutes=args.minutes, seed=args.seed)


_HANDLERS = {
    "embed": _embed,
    "annotate": _annotate,
    "perturb": _perturb,
    "info": _info,
    "list": _list,
    "convert": _convert,
    "demo": _demo,
}


def _one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cellformers`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        print(f"cellformers {_version()}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2

    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP reads this once, when torch loads: restart with idle threads sleeping instead of
        # spinning, which avoids per-operation stalls on machines with shared vCPUs.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "cellformers.cli", *sys.argv[1:]])

    try:
        _HANDLERS[args.command](args)
    except (CLIError, ValueError, KeyError, TypeError, OSError, ImportError, RuntimeError) as e:
        print(f"cellformers: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cellformers: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
