"""Speed and memory of the Performer paths (scBERT, scFoundation) on CPU, and their growth with length.

Run from the repository root (about 9 minutes on 2 shared CPU cores; ``--quick``: about 4 minutes,
a smoke test that writes nothing):

    python benchmarks/performer_scaling.py

Inference only (``torch.inference_mode``, ``eval()``), float32, random weights drawn with a fixed
seed, deterministic random inputs, batches of 1-4 cells. Three parts:

* **scBERT, full size**: ``SCBERTModule()`` (dim 200, 6 layers, 10 heads x 64, 266 random
  features, 7 tokens, 16,906 genes + 1 = 16,907 positions, a float64 position table as in the
  published checkpoint), ``encode(tokens)`` (embeddings, Performer, final norm): the cell
  states every embedding pools;
* **scFoundation, full size**: ``SCFoundationModule(n_genes=19264)`` (encoder 768 x 12 layers over
  a cell's expressed genes + T + S, Performer decoder 512 x 6 over all 19,266 positions):
  ``embed_cells(pooling="all")`` (encoder only: cell embeddings) at 1,000 and 3,000 expressed
  genes per cell, and ``predict_expression`` (encoder + decoder: expression / gene outputs);
* **growth with sequence length**: one pre-norm layer of width 512 (8 heads x 64, feed-forward
  2,048) at 1,024 to 19,266 positions, batch 1: our ``cellformers.nn.Performer``, the
  softmax-attention layer of the package (``cellformers.nn.TransformerEncoderLayer``, attention
  in PyTorch's ``scaled_dot_product_attention``) and a softmax layer that forms the
  ``[heads, L, L]`` score matrix explicitly (the textbook computation; only up to
  ``--max-explicit`` positions).

Side by side with the reference: the official models run the Performer of the
``performer_pytorch`` package (scBERT vendors a copy, scFoundation's decoder imports it). When
``performer_pytorch`` is importable (it is not a project dependency:
``pip install performer-pytorch==1.1.4``, which also needs ``einops``, ``local-attention``,
``axial-positional-embedding``, ``hyper-connections`` and ``torch-einops-utils``), the same
networks are also run with our Performer stack replaced by ``performer_pytorch.Performer`` holding
the same weights (our state dict copied in, ``calls_since_last_redraw`` renamed to
``proj_updater.calls_since_last_redraw``, strict loading, eval mode so that nothing is redrawn),
and the outputs for one cell are compared with ours under ``stabilizer="batch"``. The package on
PyPI takes the key maximum per cell and head, the copies vendored by scBERT and scFoundation
take one maximum over the whole key tensor; a third run replaces the package's
``softmax_kernel`` by that global-maximum rule (written here from the published formula) to
compare with the official behaviour.

Every configuration runs in its own process, forked from a server process that has only imported
the libraries, with 2 torch threads. Peak memory is the rise of the resident set size during
inference: the high-water mark (``VmHWM``) is reset to the current RSS (Linux
``/proc/self/clear_refs``) after the network and the inputs are built, and read after the first
forward pass and the repeats. The forward pass is repeated while the passes so far took less
than 12 s (at most 6 passes); time is the best pass (a single pass for the slow configurations),
as wall-clock and as CPU time of the process. The speed ratios to ``performer_pytorch`` come from
one process per comparison that alternates the two Performer stacks on the same input and compares
CPU times, which other jobs on shared cores disturb less than wall-clock times. The results go to
``benchmarks/results/performer_scaling.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Sleeping (not spinning) idle OpenMP threads avoid per-op stalls on shared vCPUs; this must be
# set before torch is imported (also in the server process the workers are forked from).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
THREADS = 2
SEED = 0
SCBERT_GENES = 16906
SCF_GENES = 19264
LAYER = {"dim": 512, "heads": 8, "dim_head": 64, "ff_mult": 4}  # scFoundation's decoder width
TIME_BUDGET = 12.0  # repeat a forward pass while the passes so far took less than this
LAYER_BUDGET = 4.0  # the same for the one-layer configurations
PAIR_BUDGET = 30.0  # alternate the two implementations (at least 2 rounds) up to this

import numpy as np  # noqa: E402

# ---------------------------------------------------------------------------- memory


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)


# ---------------------------------------------------------------------------- reference


def reference_performer(ours, *, qkv_bias: bool, global_max: bool = False):
    """``performer_pytorch.Performer`` with the weights of our ``cellformers.nn.Performer``."""
    import performer_pytorch
    import performer_pytorch.performer_pytorch as pp

    if global_max:
        pp.softmax_kernel = global_max_softmax_kernel
    ref = performer_pytorch.Performer(
        dim=ours.dim,
        depth=ours.depth,
        heads=ours.heads,
        dim_head=ours.dim_head,
        ff_mult=ours.ff_mult,
        nb_features=ours.nb_features,
        qkv_bias=qkv_bias,
        attn_out_bias=True,
        feature_redraw_interval=1000,
    )
    state = dict(ours.state_dict())
    state["proj_updater.calls_since_last_redraw"] = state.pop("calls_since_last_redraw")
    # the package's ProjectionUpdater also holds the layers as a submodule (``instance``), so
    # its state dict lists every layer tensor twice (the same tensors)
    for key in [k for k in state if k.startswith("net.")]:
        state["proj_updater.instance." + key[len("net.") :]] = state[key]
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def global_max_softmax_kernel(
    data, *, projection_matrix, is_query, normalize_data=True, eps=1e-4, device=None
):
    """FAVOR+ features with one key maximum over the whole tensor (scBERT's / scFoundation's rule).

    ``phi(x) = m^-1/2 (exp(c x P^T - c^2 |x|^2 / 2 - s) + eps)`` with ``c = d^-1/4``; ``s`` is the
    maximum over the features of the same row for queries, over the whole tensor for keys.
    """
    import torch

    c = data.shape[-1] ** -0.25 if normalize_data else 1.0
    ratio = projection_matrix.shape[0] ** -0.5
    dash = torch.matmul(c * data, projection_matrix.type_as(data).T)
    diag = (data * data).sum(dim=-1, keepdim=True) * (c * c / 2.0)
    stab = dash.amax(dim=-1, keepdim=True) if is_query else dash.amax()
    return ratio * (torch.exp(dash - diag - stab) + eps)


# ---------------------------------------------------------------------------- networks


class ExplicitSoftmaxLayer:
    """Factory of a pre-norm softmax layer that forms the ``[batch, heads, L, L]`` scores."""

    @staticmethod
    def build(dim: int, heads: int, dim_head: int, ff_mult: int):
        import torch
        from torch import nn

        class Layer(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm1 = nn.LayerNorm(dim)
                self.qkv = nn.Linear(dim, 3 * heads * dim_head)
                self.out = nn.Linear(heads * dim_head, dim)
                self.norm2 = nn.LayerNorm(dim)
                self.ff = nn.Sequential(
                    nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Linear(dim * ff_mult, dim)
                )

            def forward(self, x):
                b, n, _ = x.shape
                qkv = self.qkv(self.norm1(x)).view(b, n, 3, heads, dim_head)
                q, k, v = qkv.permute(2, 0, 3, 1, 4)
                scores = torch.matmul(q, k.transpose(-1, -2)) * dim_head**-0.5
                att = torch.matmul(torch.softmax(scores, dim=-1), v)
                x = x + self.out(att.transpose(1, 2).reshape(b, n, heads * dim_head))
                return x + self.ff(self.norm2(x))

        return Layer()


def _scbert_tokens(batch: int):
    import torch

    g = torch.Generator().manual_seed(SEED)
    expressed = torch.rand(batch, SCBERT_GENES + 1, generator=g) < 0.15
    tokens = torch.randint(1, 6, (batch, SCBERT_GENES + 1), generator=g) * expressed
    tokens[:, -1] = 0
    return tokens


def _scf_tokens(batch: int, n_expressed: int):
    import torch

    from cellformers.module._scfoundation import gather_scfoundation_tokens

    g = torch.Generator().manual_seed(SEED)
    expression = torch.zeros(batch, SCF_GENES)
    for i in range(batch):
        genes = torch.randperm(SCF_GENES, generator=g)[:n_expressed]
        expression[i, genes] = torch.log1p(torch.rand(n_expressed, generator=g) * 50)
    depth = torch.full((batch,), 4.0)
    return gather_scfoundation_tokens(expression, depth, depth)


def build(config: dict):
    """``(forward, n_cells, weight_mb)`` for one configuration (weights drawn with the seed)."""
    import torch

    from cellformers.module import SCBERTModule, SCFoundationModule
    from cellformers.nn import Performer, TransformerEncoderLayer

    torch.manual_seed(SEED)
    part, impl, batch = config["part"], config["impl"], config["batch"]
    stabilizer = "batch" if batch == 1 else "cell"  # the same maximum for a single cell
    ref_kw = {"global_max": impl == "performer_pytorch (global max)"}
    if part == "scbert":
        module = SCBERTModule(position_embedding=True, stabilizer=stabilizer).eval()
        tokens = _scbert_tokens(batch)
        if impl == "cellformers":

            def forward():
                return module.encode(tokens)
        else:
            ref = reference_performer(module.performer, qkv_bias=False, **ref_kw)

            def forward():
                return module.norm(ref(module.embed_tokens(tokens)))

        modules = [module]
    elif part.startswith("scfoundation"):
        module = SCFoundationModule(SCF_GENES, encoder_d_hid=3072, stabilizer=stabilizer).eval()
        values, positions, lengths = _scf_tokens(batch, config["length"])
        if impl != "cellformers":
            module.decoder.performer = reference_performer(
                module.decoder.performer, qkv_bias=True, **ref_kw
            )
        if part == "scfoundation-cell":

            def forward():
                return module.embed_cells(values, positions, lengths, pooling="all")
        else:

            def forward():
                return module.predict_expression(values, positions, lengths)

        modules = [module]
    else:  # one layer at a given length
        dim, heads, dim_head, ff_mult = (LAYER[k] for k in ("dim", "heads", "dim_head", "ff_mult"))
        x = torch.randn(batch, config["length"], dim, generator=torch.Generator().manual_seed(SEED))
        if impl in ("cellformers Performer", "performer_pytorch"):
            layer = Performer(dim, 1, heads, dim_head, ff_mult=ff_mult, qkv_bias=True)
            layer.stabilizer = stabilizer
            if impl == "performer_pytorch":
                layer = reference_performer(layer, qkv_bias=True)
        elif impl == "softmax, SDPA":
            layer = TransformerEncoderLayer(
                dim, heads, dim * ff_mult, dropout=0.0, activation="gelu", norm_first=True
            )
        else:
            layer = ExplicitSoftmaxLayer.build(dim, heads, dim_head, ff_mult)
        layer.eval()

        def forward():
            return layer(x)

        modules = [layer]
    weight_mb = (
        sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
        / 2**20
    )
    return forward, batch, weight_mb


def build_stacks(part: str, length: int):
    """Forward functions of our Performer stack and the package's (same weights, same input).

    The stacks of the full-size networks: scBERT (200 x 6 layers, 10 heads x 64, no biases on
    the query/key/value maps) and scFoundation's decoder (512 x 6, 8 heads x 64, biases), or one
    layer of width 512; batch 1, random input of the right shape.
    """
    import torch

    from cellformers.nn import Performer

    torch.manual_seed(SEED)
    if part == "scbert":
        ours = Performer(200, 6, 10, 64, qkv_bias=False, stabilizer="batch")
    elif part == "scfoundation-expression":
        ours = Performer(512, 6, 8, 64, qkv_bias=True, stabilizer="batch")
    else:
        ours = Performer(512, 1, 8, 64, qkv_bias=True, stabilizer="batch")
    ours.eval()
    ref = reference_performer(ours, qkv_bias=ours.qkv_bias)
    x = torch.randn(1, length, ours.dim, generator=torch.Generator().manual_seed(SEED))
    return [lambda: ours(x), lambda: ref(x)]


def measure(config: dict, out_dir: str, queue) -> None:
    """Run one configuration in this (fresh) process and put its record on ``queue``.

    A configuration with ``"pair"`` builds two implementations and alternates their forward
    passes (for the time ratio; no memory figure); otherwise one implementation is run for its
    peak memory and time.
    """
    import gc

    import torch

    torch.set_num_threads(THREADS)
    budget = config.get("budget", TIME_BUDGET)
    try:
        if "pair" in config:
            forwards = build_stacks(config["part"], config["length"])
            wall: list[list[float]] = [[], []]
            cpu: list[list[float]] = [[], []]
            with torch.inference_mode():
                if config["length"] < 8192:
                    for fn in forwards:  # one untimed pass each (first-call costs)
                        fn()
                rounds = config.get("min_rounds", 2)
                while len(wall[0]) < rounds or (sum(map(sum, wall)) < budget and len(wall[0]) < 6):
                    for i, fn in enumerate(forwards):
                        start, start_cpu = time.perf_counter(), time.process_time()
                        fn()
                        cpu[i].append(time.process_time() - start_cpu)
                        wall[i].append(time.perf_counter() - start)
            record = {**config, "wall": wall, "cpu": cpu}
        else:
            forward, n_cells, weight_mb = build(config)
            gc.collect()
            base = _status_mb("VmRSS")
            _reset_peak()
            with torch.inference_mode():
                times, cpu = [], []
                while not times or (sum(times) < budget and len(times) < 6):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    result = forward()
                    cpu.append(time.process_time() - start_cpu)
                    times.append(time.perf_counter() - start)
                    if len(times) == 1:
                        out = result
                    del result
            record = {
                **config,
                "seconds": min(times),
                "cpu_seconds": min(cpu),
                "repeats": len(times),
                "peak_mb": _status_mb("VmHWM") - base,
                "weight_mb": weight_mb,
                "cells_per_s": n_cells / min(times),
                "output": None,
            }
            if config.get("save"):
                path = Path(out_dir) / f"{config['key']}.npy"
                np.save(path, out.float().numpy())
                record["output"] = str(path)
    except Exception as err:  # report, do not stop the other configurations
        record = {**config, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    queue.put(record)


def run_all(configs: list[dict], out_dir: str) -> list[dict]:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "cellformers", "numpy"])
    records = []
    for config in configs:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(config, out_dir, queue))
        proc.start()
        record = queue.get()
        proc.join()
        records.append(record)
        if "error" in record:
            print(f"{config['key']}: {record['error']}", flush=True)
        elif "pair" in record:
            best = [min(t) for t in record["cpu"]]
            print(f"{config['key']}: best CPU {best[0]:.3f} / {best[1]:.3f} s", flush=True)
        else:
            print(
                f"{config['key']}: {record['seconds']:.3f} s, {record['cells_per_s']:.3f} cells/s, "
                f"peak +{record['peak_mb']:.0f} MB",
                flush=True,
            )
    return records


# ---------------------------------------------------------------------------- plan


def plan(args, have_reference: bool) -> list[dict]:
    refs = ["performer_pytorch"] if have_reference else []
    checks = ["performer_pytorch (global max)"] if have_reference else []
    configs = []

    def add(part, impl, batch, length, save=False, budget=TIME_BUDGET):
        configs.append(
            {
                "key": f"{part}|{impl}|b{batch}|L{length}",
                "part": part,
                "impl": impl,
                "batch": batch,
                "length": length,
                "save": save,
                "budget": budget,
            }
        )

    def pair(part, ours, length, budget):
        if have_reference:
            configs.append(
                {
                    "key": f"{part}|pair|b1|L{length}",
                    "part": part,
                    "pair": [ours, "performer_pytorch"],
                    "batch": 1,
                    "length": length,
                    "budget": budget,
                    "min_rounds": 1 if args.quick else 2,
                }
            )

    for batch in [1] if args.quick else [1, 2]:
        add("scbert", "cellformers", batch, SCBERT_GENES + 1, save=batch == 1)
    for impl in checks if args.quick else refs + checks:
        add("scbert", impl, 1, SCBERT_GENES + 1, save=True)
    pair("scbert", "cellformers", SCBERT_GENES + 1, PAIR_BUDGET)

    for n in [1000] if args.quick else [1000, 3000]:
        for batch in [1] if args.quick else [1, 2]:
            add("scfoundation-cell", "cellformers", batch, n)
    for impl in ["cellformers", *checks] if args.quick else ["cellformers", *refs, *checks]:
        add("scfoundation-expression", impl, 1, 1000, save=True)
    if not args.quick:
        pair("scfoundation-expression", "cellformers", 1000, PAIR_BUDGET)

    lengths = [1024, 4096, 19266] if args.quick else [1024, 2048, 4096, 8192, 16384, 19266]
    for length in lengths:
        for impl in ["cellformers Performer", *refs, "softmax, SDPA"]:
            add("layer", impl, 1, length, save=impl != "softmax, SDPA", budget=LAYER_BUDGET)
        if length <= args.max_explicit:
            add("layer", "softmax, explicit scores", 1, length, budget=LAYER_BUDGET)
        pair("layer", "cellformers Performer", length, LAYER_BUDGET)
    return configs


# ---------------------------------------------------------------------------- report


def matmul_gflops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    n, start = 10, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - start) / 1e9


def _diff(records: list[dict], part: str, impl: str, length: int) -> tuple[float, float] | None:
    """Max abs difference of ``impl``'s batch-1 output from ours, and the output's max abs value."""
    ours_impl = "cellformers Performer" if part == "layer" else "cellformers"
    by = {
        (r["impl"]): r
        for r in records
        if r["part"] == part and r["batch"] == 1 and r["length"] == length and r.get("output")
    }
    if impl not in by or ours_impl not in by:
        return None
    a, b = np.load(by[ours_impl]["output"]), np.load(by[impl]["output"])
    return float(np.abs(a - b).max()), float(np.abs(a).max())


def _fit_exponent(lengths, values) -> float:
    """Slope of log(value) on log(length) (least squares)."""
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def _pair_ratio(
    records: list[dict], part: str, length: int
) -> tuple[float, float, list[float], list[float]] | None:
    """performer_pytorch / cellformers of the alternating run: best CPU and wall ratios, per round."""
    for r in records:
        if "pair" in r and "error" not in r and r["part"] == part and r["length"] == length:
            cpu = [np.asarray(t) for t in r["cpu"]]
            wall = [np.asarray(t) for t in r["wall"]]
            return (
                float(cpu[1].min() / cpu[0].min()),
                float(wall[1].min() / wall[0].min()),
                (cpu[1] / cpu[0]).tolist(),
                (wall[1] / wall[0]).tolist(),
            )
    return None


def _round_note(title: str, pr) -> str:
    return (
        f"{title}: performer_pytorch / cellformers per round, CPU time "
        + ", ".join(f"{x:.2f}" for x in pr[2])
        + "; wall-clock "
        + ", ".join(f"{x:.2f}" for x in pr[3])
        + "."
    )


def write_results(records, args, flops, total, ref_version) -> list[str]:
    import torch

    ok = [r for r in records if "error" not in r and "pair" not in r]
    lines = [
        "# Performer paths on CPU: scBERT and scFoundation at full size, and growth with length",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared "
        f"with other jobs), {THREADS} torch threads, torch {torch.__version__}, performer_pytorch "
        f"{ref_version or 'not installed'}, dense fp32 matmul {max(flops):.0f} GFLOP/s (2048 x "
        f"2048, before / after: {flops[0]:.0f} / {flops[1]:.0f}); float32, CPU, "
        f"`torch.inference_mode`, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}. Whole run "
        f"{total / 60:.1f} min. Produced by `"
        + " ".join(["python benchmarks/performer_scaling.py", *args.argv])
        + "`.",
        "",
        "Each configuration runs in its own process (forked from a server that has only imported "
        "the libraries). `peak MB`: rise of the resident set size during inference (VmHWM, reset "
        "to the RSS once weights and inputs exist, read after the last pass): activations and "
        "workspace, not the weights (listed separately). Time: best pass (passes repeated while "
        f"their total is under {TIME_BUDGET:.0f} s, {LAYER_BUDGET:.0f} s for one layer, at most "
        "6; a single pass for the slow configurations); `CPU s per cell`: the best pass's CPU "
        "time of the process (`time.process_time`, both threads) over the cells. "
        "`performer_pytorch / cellformers "
        "(stack, CPU time)`: ratio of the best CPU times (`time.process_time`, both threads; "
        "less sensitive than wall-clock time to other jobs on the shared cores) of the two "
        "Performer stacks alone (same weights, same random input, batch 1) in one process that "
        f"alternates them (at least 2 rounds, up to {PAIR_BUDGET:.0f} s or {LAYER_BUDGET:.0f} s "
        "for one layer; one untimed pass each first below 8,192 positions); above 1 means the "
        "package is slower; per-round CPU and wall-clock ratios are listed at the end. Random "
        "weights "
        f"(seed {SEED}); our Performer with `stabilizer='batch'` for one cell and `'cell'` "
        "(the default) for more (for one cell both take the same maximum). `max abs diff`: "
        "largest absolute difference of the output of one cell from ours, with the largest "
        "absolute output value in brackets.",
        "",
    ]
    notes = []

    def table(part: str, title: str, note: str) -> None:
        rows = [r for r in ok if r["part"] == part]
        if not rows:
            return
        lines.extend([f"## {title}", "", note, ""])
        lines.append(
            "| implementation | cells | tokens per cell | cells/s | time per batch (s) | "
            "CPU s per cell | performer_pytorch / cellformers (stack, CPU time) | peak MB above "
            "weights and inputs | weights MB | max abs diff from cellformers (max abs output) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["length"], r["batch"], r["impl"] != "cellformers")):
            ratio = diff = ""
            if r["impl"] == "performer_pytorch":
                pr = _pair_ratio(records, part, r["length"])
                if pr:
                    ratio = f"{pr[0]:.2f}x"
            if r["batch"] == 1 and r["impl"] != "cellformers":
                d = _diff(ok, part, r["impl"], r["length"])
                diff = f"{d[0]:.1e} ({d[1]:.2f})" if d else ""
            lines.append(
                f"| {r['impl']} | {r['batch']} | {r['length']:,} | {r['cells_per_s']:.3f} | "
                f"{r['seconds']:.2f} | {r['cpu_seconds'] / r['batch']:.1f} | {ratio} | "
                f"{r['peak_mb']:.0f} | {r['weight_mb']:.0f} | {diff} |"
            )
        lines.append("")

    table(
        "scbert",
        "scBERT, full size (16,907 positions)",
        "`SCBERTModule(position_embedding=True).encode(tokens)` (a float64 position table as in "
        "the checkpoint; about 15 % non-zero tokens); `performer_pytorch`: the same module with "
        "the Performer stack replaced by the package's (same weights), "
        "`norm(performer(embed_tokens(tokens)))`; `(global max)`: that, with the key maximum "
        "taken over the whole tensor as in the copies the official models run. Output compared: "
        "the final states `[1, 16907, 200]`.",
    )
    table(
        "scfoundation-cell",
        "scFoundation, full size: cell embeddings (encoder only)",
        "`SCFoundationModule(n_genes=19264).embed_cells(values, positions, lengths, "
        "pooling='all')`, 3,072 values per cell; tokens per cell = expressed genes (+ T and S). "
        "This path has no Performer (the encoder is softmax attention over the expressed genes).",
    )
    table(
        "scfoundation-expression",
        "scFoundation, full size: expression / gene outputs (encoder + decoder over 19,266 "
        "positions)",
        "`predict_expression(values, positions, lengths)` with 1,000 expressed genes per cell "
        "(`gene_embeddings` runs the same encoder and decoder, without the last linear map); "
        "`performer_pytorch`: the decoder's Performer stack replaced by the package's (same "
        "weights). Output compared: the predicted expression `[1, 19264]`.",
    )

    layer = [r for r in ok if r["part"] == "layer"]
    fits = {}
    if layer:
        lines += [
            "## Growth with sequence length: one layer of width 512, batch 1",
            "",
            "Pre-norm layer, 8 heads x 64, feed-forward 2,048 (GELU), scFoundation's decoder "
            "width. `cellformers Performer`: `cellformers.nn.Performer(512, 1, 8, 64, "
            "qkv_bias=True)` (266 random features); `performer_pytorch`: the same weights in the "
            "package's Performer; `softmax, SDPA`: `cellformers.nn.TransformerEncoderLayer(512, "
            "8, 2048, norm_first=True)` (PyTorch `scaled_dot_product_attention`); `softmax, "
            "explicit scores`: `softmax(q k^T / 8) v` with the `[8, L, L]` score matrix formed "
            f"(run up to {args.max_explicit:,} positions). `vs Performer`: CPU time over the CPU "
            "time of `cellformers Performer` (separate processes), except for "
            "`performer_pytorch`, where it is the alternating CPU-time ratio.",
            "",
            "| positions L | implementation | time (s) | CPU time (s) | vs Performer | peak MB | "
            "peak KB per position | max abs diff from cellformers (max abs output) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        perf = {r["length"]: r for r in layer if r["impl"] == "cellformers Performer"}
        order = ["cellformers Performer", "performer_pytorch", "softmax, SDPA"]
        for r in sorted(
            layer, key=lambda r: (r["length"], order.index(r["impl"]) if r["impl"] in order else 9)
        ):
            base = perf.get(r["length"])
            ratio = f"{r['cpu_seconds'] / base['cpu_seconds']:.2f}x" if base else ""
            diff = ""
            if r["impl"] == "performer_pytorch":
                pr = _pair_ratio(records, "layer", r["length"])
                ratio = f"{pr[0]:.2f}x" if pr else ""
                d = _diff(ok, "layer", r["impl"], r["length"])
                diff = f"{d[0]:.1e} ({d[1]:.2f})" if d else ""
            lines.append(
                f"| {r['length']:,} | {r['impl']} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
                f"{ratio} | "
                f"{r['peak_mb']:.0f} | {r['peak_mb'] * 1024 / r['length']:.1f} | {diff} |"
            )
        lines += [
            "",
            "Fits over the lengths run (least squares): `peak MB = a + b L` (b in KB per "
            "position, R^2 of that straight line), and the exponents p of `peak ~ L^p` and "
            "`CPU time ~ L^p` over the lengths >= 4,096 (1: linear, 2: quadratic).",
            "",
            "| implementation | lengths | b: KB per position | R^2 (straight line) | "
            "memory exponent | CPU-time exponent |",
            "|---|---|---|---|---|---|",
        ]
        for impl in sorted({r["impl"] for r in layer}):
            rows = sorted((r for r in layer if r["impl"] == impl), key=lambda r: r["length"])
            if len(rows) < 3:
                continue
            L = np.array([r["length"] for r in rows], dtype=float)
            peak = np.array([r["peak_mb"] for r in rows])
            sec = np.array([r["cpu_seconds"] for r in rows])
            b, a = np.polyfit(L, peak, 1)
            r2 = 1 - np.sum((peak - (a + b * L)) ** 2) / np.sum((peak - peak.mean()) ** 2)
            big = L >= 4096
            mem_p = time_p = float("nan")
            if big.sum() >= 2:
                mem_p, time_p = _fit_exponent(L[big], peak[big]), _fit_exponent(L[big], sec[big])
            fits[impl] = (b * 1024, r2, mem_p, time_p, int(L.max()))
            lines.append(
                f"| {impl} | {int(L.min()):,}-{int(L.max()):,} | {b * 1024:.1f} | {r2:.4f} | "
                f"{mem_p:.2f} | {time_p:.2f} |"
            )
        lines.append("")
    errors = [r for r in records if "error" in r]
    if errors:
        lines += ["Configurations that failed:", ""]
        lines += [f"- {r['key']}: {r['error']}" for r in errors]
        lines.append("")
    titles = {
        "scbert": "scBERT Performer stack (200 x 6, 16,907 positions)",
        "scfoundation-expression": "scFoundation decoder Performer stack (512 x 6, 19,266 positions)",
    }
    for r in records:
        if "pair" in r and "error" not in r:
            title = titles.get(r["part"], f"one layer, {r['length']:,} positions")
            notes.append(_round_note(title, _pair_ratio(records, r["part"], r["length"])))
    if notes:
        lines += ["Per-round ratios of the alternating runs:", ""]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    lines += ["## What the numbers show", ""]
    lines += summary(ok, records, fits)
    return lines


def summary(ok: list[dict], records: list[dict], fits: dict) -> list[str]:
    """Statements read off the tables."""
    out = []

    def rec(part, impl, batch=1):
        return next(
            (r for r in ok if r["part"] == part and r["impl"] == impl and r["batch"] == batch),
            None,
        )

    for part, name in (("scbert", "scBERT"), ("scfoundation-expression", "scFoundation decoder")):
        ours, ref = rec(part, "cellformers"), rec(part, "performer_pytorch")
        if not ours:
            continue
        d_ref = _diff(ok, part, "performer_pytorch", ours["length"])
        d_glob = _diff(ok, part, "performer_pytorch (global max)", ours["length"])
        pr = _pair_ratio(records, part, ours["length"])
        if not (d_ref or d_glob or pr):
            continue
        text = f"- {name}, one cell: "
        if d_glob:
            text += (
                f"with the official global key maximum the package's Performer gives our output "
                f"to {d_glob[0]:.1e} (max abs output {d_glob[1]:.2f}); "
            )
        if d_ref:
            text += (
                f"the package as published (maximum per cell and head) differs by {d_ref[0]:.1e}. "
            )
        if pr:
            text += (
                f"Performer stack time performer_pytorch / cellformers {pr[0]:.2f}x (CPU time; "
                f"wall-clock {pr[1]:.2f}x); "
            )
        if ref:
            text += (
                f"peak memory above the weights {ref['peak_mb']:.0f} MB (package) vs "
                f"{ours['peak_mb']:.0f} MB (ours)."
            )
        text = text.rstrip("; ")
        out.append(text if text.endswith(".") else text + ".")
    rounds = [
        x
        for r in records
        if "pair" in r and "error" not in r
        for x in _pair_ratio(records, r["part"], r["length"])[2]
    ]
    if rounds:
        out.append(
            f"- Every alternating round has the package slower: per-round CPU-time ratios "
            f"{min(rounds):.2f}-{max(rounds):.2f} over all comparisons."
            if min(rounds) > 1
            else f"- Per-round CPU-time ratios {min(rounds):.2f}-{max(rounds):.2f} over all "
            "comparisons (not every round has the package slower)."
        )
    cells = [
        r for r in ok if r["part"] in ("scbert", "scfoundation-cell", "scfoundation-expression")
    ]
    for part, label in (
        ("scbert", "scBERT cell states"),
        ("scfoundation-cell", "scFoundation cell embeddings"),
        ("scfoundation-expression", "scFoundation expression outputs"),
    ):
        rows = [r for r in cells if r["part"] == part and r["impl"] == "cellformers"]
        if rows:
            out.append(
                f"- {label} (ours): "
                + "; ".join(
                    f"{r['cells_per_s']:.3f} cells/s at {r['length']:,} tokens, batch "
                    f"{r['batch']} (+{r['peak_mb']:.0f} MB)"
                    for r in sorted(rows, key=lambda r: (r["length"], r["batch"]))
                )
                + "."
            )
    if "cellformers Performer" in fits:
        b, r2, mem_p, time_p, top = fits["cellformers Performer"]
        out.append(
            f"- One Performer layer (ours): peak memory on a straight line in L (R^2 {r2:.4f}, "
            f"{b:.1f} KB per position), memory exponent {mem_p:.2f} and CPU-time exponent "
            f"{time_p:.2f} over L >= 4,096"
            + (f": linear growth up to {top:,} positions." if max(mem_p, time_p) < 1.2 else ".")
        )
    if "softmax, explicit scores" in fits:
        b, r2, mem_p, time_p, top = fits["softmax, explicit scores"]
        out.append(
            f"- Softmax with the score matrix formed: memory exponent {mem_p:.2f}, CPU-time exponent "
            f"{time_p:.2f} (up to {top:,} positions, the longest run here)"
            + (": memory grows quadratically." if mem_p > 1.7 else ".")
        )
    if "softmax, SDPA" in fits:
        b, r2, mem_p, time_p, top = fits["softmax, SDPA"]
        out.append(
            f"- Softmax through PyTorch's `scaled_dot_product_attention`: memory exponent "
            f"{mem_p:.2f}, CPU-time exponent {time_p:.2f}"
            + (
                " (the fused CPU kernel does not keep the score matrix: memory stays about "
                "linear, the quadratic cost shows in time)."
                if mem_p < 1.2
                else "."
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 1, three lengths, no package memory runs for the full networks, one round "
        "per alternating comparison; writes nothing",
    )
    parser.add_argument(
        "--max-explicit",
        type=int,
        default=8192,
        help="longest sequence for the explicit-score softmax layer ([8, L, L] float32 scores)",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip performer_pytorch even if installed"
    )
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    ref_version = None
    if not args.no_reference:
        try:
            import performer_pytorch  # noqa: F401

            ref_version = version("performer-pytorch")
        except (ImportError, PackageNotFoundError) as err:
            print(f"performer_pytorch not available ({err}); timing ours only.", flush=True)
    total = time.perf_counter()
    import torch

    torch.set_num_threads(THREADS)
    flops = [matmul_gflops()]
    with tempfile.TemporaryDirectory() as tmp:
        records = run_all(plan(args, ref_version is not None), tmp)
        flops.append(matmul_gflops())
        lines = write_results(records, args, flops, time.perf_counter() - total, ref_version)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "performer_scaling.md").write_text(text)


if __name__ == "__main__":
    main()
