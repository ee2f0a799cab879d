"""Training memory of scGPT fine-tuning: every weight vs LoRA adapters vs the head alone.

Run from the repository root (about 3 minutes on 2 CPU cores):

    python benchmarks/lora_memory.py

A whole-human-sized scGPT (d_model 512, 12 layers, 8 heads, d_hid 512, a 60,697-token
vocabulary as in the published ``scGPT_human``: the CellBench genes plus placeholder tokens;
random weights, a 3-class ``ClsDecoder`` head for the CellBench cell lines) is fine-tuned with
``train(mode="finetune")`` for a few AdamW steps on CellBench cells, once per setting, each in a
fresh process:

* ``full``: every weight trains (``freeze_layers=0``);
* ``lora``: ``add_lora(rank=8, alpha=16)`` on the query/key/value and output projections of
  every layer; the adapters and the head train;
* ``head``: ``freeze_layers="all"``; only the head trains.

For each it records the trainable parameters and the optimiser state (both read from the
optimiser Lightning used), the process's resident memory after building the model and its peak
during training (``ru_maxrss``), and the training time per step. The results go to
``benchmarks/results/lora_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Sleeping (not spinning) idle OpenMP threads avoid per-op stalls on shared vCPUs; the small real
# datasets sit in ../shared/data beside a checkout (CELLFORMERS_DATA overrides).
ENV = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
if "CELLFORMERS_DATA" not in ENV and (ROOT.parent / "shared" / "data").is_dir():
    ENV["CELLFORMERS_DATA"] = str(ROOT.parent / "shared" / "data")

ARCH = {"d_model": 512, "nhead": 8, "d_hid": 512, "nlayers": 12, "dropout": 0.0}
N_TOKENS = 60_697  # vocabulary size of the published whole-human scGPT
MAX_LEN, BATCH, STEPS, SEED = 256, 8, 4, 0
LORA = {"rank": 8, "alpha": 16.0}
SETTINGS = {
    "full": "full fine-tuning (every weight)",
    "lora": f"LoRA rank {LORA['rank']}, alpha {LORA['alpha']:g}, qkv + out (+ head)",
    "head": 'head only (freeze_layers="all")',
}


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(setting: str) -> dict:
    """Build the model, train ``STEPS`` steps in ``setting`` and return the measurements."""
    import logging
    import warnings

    import numpy as np
    import scvi
    import torch

    import cellformers as cf
    from cellformers.genes import GeneVocab

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    adata = cf.data.cellbench_2platform()
    rng = np.random.default_rng(SEED)
    adata = adata[np.sort(rng.choice(adata.n_obs, BATCH * STEPS, replace=False))].copy()
    cf.model.SCGPT.setup_anndata(adata, labels_key="cell_line")
    genes = list(adata.var_names)
    n_fill = N_TOKENS - len(genes) - 3  # 3 special tokens follow the genes
    vocab = GeneVocab.from_tokens(genes + [f"placeholder_{i}" for i in range(n_fill)])
    scvi.settings.seed = SEED
    model = cf.model.SCGPT(adata, vocab=vocab, max_seq_len=MAX_LEN, n_labels=3, **ARCH)
    n_params = sum(p.numel() for p in model.module.parameters())
    freeze = "all" if setting == "head" else 0
    if setting == "lora":
        model.add_lora(**LORA)
    rss_before = _rss_now_mb()
    start = time.perf_counter()
    model.train(
        max_epochs=1,
        mode="finetune",
        freeze_layers=freeze,
        batch_size=BATCH,
        train_size=1.0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    seconds = time.perf_counter() - start
    optimizer = model.trainer.optimizers[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state_bytes = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    steps = int(model.trainer.global_step)
    return {
        "setting": setting,
        "n_params": n_params,
        "n_adapter": sum(p.numel() for n, p in model.module.named_parameters() if ".lora_" in n),
        "n_trainable": sum(p.numel() for p in params),
        "optimizer": type(optimizer).__name__,
        "optimizer_state_mb": state_bytes / 2**20,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "steps": steps,
        "seconds_per_step": seconds / max(steps, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def write(results: list[dict], minutes: float) -> Path:
    full = next(r for r in results if r["setting"] == "full")
    r0 = results[0]
    lines = [
        "# Training memory: full fine-tuning vs LoRA (scGPT, whole-human size)",
        "",
        f"Machine: {platform.machine()}, {r0['threads']} torch threads, torch {r0['torch']}, "
        f"scvi-tools {version('scvi-tools')}; CPU, float32, OMP_WAIT_POLICY=PASSIVE. Whole run "
        f"{minutes:.1f} min. Produced by `python benchmarks/lora_memory.py`.",
        "",
        f"scGPT: d_model {ARCH['d_model']}, {ARCH['nlayers']} layers, {ARCH['nhead']} heads, "
        f"d_hid {ARCH['d_hid']}, dropout {ARCH['dropout']:g}, vocabulary of {N_TOKENS:,} tokens "
        f"(the published scGPT_human size: CellBench genes plus placeholders), random weights, "
        f"3-class ClsDecoder head; {full['n_params']:,} parameters. "
        f'`train(mode="finetune")` with {r0["optimizer"]}, batch {BATCH}, '
        f"max_seq_len {MAX_LEN}, {r0['steps']} steps on {BATCH * STEPS} CellBench cells; every "
        "setting in a fresh process. Trainable parameters and optimiser state are read from "
        "the optimiser after training; RSS before training is the resident memory after "
        "building the model (and the adapters); peak RSS is the process maximum; s / step is "
        "the training wall-clock time (data loading included) over the steps.",
        "",
        "| setting | trainable parameters | % of all | optimiser state (MB) | RSS before "
        "training (MB) | peak RSS (MB) | peak - before (MB) | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {SETTINGS[r['setting']]} | {r['n_trainable']:,} | "
            f"{100 * r['n_trainable'] / r['n_params']:.2f} % | {r['optimizer_state_mb']:.1f} | "
            f"{r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['rss_before_mb']:.0f} | {r['seconds_per_step']:.1f} |"
        )
    lora = next(r for r in results if r["setting"] == "lora")
    head = next(r for r in results if r["setting"] == "head")
    frozen_mb = (full["n_trainable"] - lora["n_trainable"]) * 12 / 2**20
    lines += [
        "",
        "## What the numbers show",
        "",
        f"- LoRA trains {lora['n_trainable']:,} parameters ({lora['n_adapter']:,} in the "
        f"adapters, the rest in the head) against {full['n_trainable']:,} for full "
        f"fine-tuning ({full['n_trainable'] / lora['n_trainable']:.0f}x fewer); AdamW's state "
        f"shrinks from {full['optimizer_state_mb']:.0f} MB to "
        f"{lora['optimizer_state_mb']:.1f} MB.",
        f"- Peak RSS: {full['peak_rss_mb']:.0f} MB (full) vs {lora['peak_rss_mb']:.0f} MB "
        f"(LoRA), {full['peak_rss_mb'] - lora['peak_rss_mb']:.0f} MB less; the head alone "
        f"peaks at {head['peak_rss_mb']:.0f} MB. The training overhead above the built model "
        f"(peak - before) is {full['peak_rss_mb'] - full['rss_before_mb']:.0f} MB vs "
        f"{lora['peak_rss_mb'] - lora['rss_before_mb']:.0f} MB. The weights LoRA freezes need "
        f"neither gradients (4 B each) nor AdamW state (8 B each): {frozen_mb:.0f} MB of the "
        f"{full['peak_rss_mb'] - lora['peak_rss_mb']:.0f} MB saved; the rest is not itemised "
        "here. The adapters sit in every layer, so LoRA still back-propagates through the "
        "whole network and keeps its activations, which grow with batch size and sequence "
        "length; training the head alone back-propagates through the head only "
        f"(+{head['peak_rss_mb'] - head['rss_before_mb']:.0f} MB).",
        f"- Time per step: {full['seconds_per_step']:.1f} s (full), "
        f"{lora['seconds_per_step']:.1f} s (LoRA), {head['seconds_per_step']:.1f} s (head "
        "only): LoRA skips the weight gradients and the optimiser update of the frozen "
        "weights but still back-propagates through every layer.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "lora_memory.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", choices=list(SETTINGS), help="(internal) one setting, as JSON")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run(args.run)))
        return
    start = time.perf_counter()
    results = []
    for setting in SETTINGS:
        proc = subprocess.run(
            [sys.executable, __file__, "--run", setting],
            env=ENV,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"setting {setting!r} failed")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(result))
        results.append(result)
    print(f"wrote {write(results, (time.perf_counter() - start) / 60)}")


if __name__ == "__main__":
    main()
