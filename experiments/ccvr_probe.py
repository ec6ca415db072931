"""Is the skewed federation's failure in its head or in its features? (docs/RESULTS.md, 0.8.8)

Takes a finished classifier run folder and, with its global model (the whole update and the
global head), measures on the run's evaluation split (the validation split when the run held
one out, else dev):

- ``global``: the run's own figure (the global model as trained);
- ``ccvr``: the head recalibrated from the clients' per-class feature moments, exactly as
  ``server.head_calibration = "ccvr"`` does after the last round (src/hlora/calibration.py;
  ``--virtual``: ``server.calibration_samples``), here applied to a run that trained without it;
- ``probe``: the same linear layer fitted (the same L-BFGS fit) on the real features of every
  training example: a centralized linear probe, which no federation could run, and the ceiling
  of any remedy that changes the head alone.
- ``features``: how the training examples' features spread (:func:`spread`): their effective
  rank, the share of their variance on the first principal direction, and the share between
  the classes' means (what a linear head can use).

    python experiments/ccvr_probe.py RUN_DIR [RUN_DIR ...] [--virtual 10]

Loads the data and model like ``hlora run`` (``HLORA_DATA_DIR`` or ``data.data_dir``); writes
nothing. Sized for small backbones (features are held in memory, one row per example).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from hlora.calibration import ClassMoments, calibrated_head, fit_linear
from hlora.export import load_run_update
from hlora.federation import build_federation
from hlora.server import _seed


def spread(x: Tensor, y: Tensor) -> dict[str, float]:
    """How features ``x (n, d)`` with labels ``y (n,)`` spread.

    Returns:
        ``effective_rank``: ``exp`` of the entropy of the centred features' variance shares
        over their principal directions (1 when they lie on a line, ``d`` when isotropic);
        ``top1_share``: the first direction's share; ``between_class``: the share of the
        variance between the classes' means (1 when every class sits on its mean).
    """
    x = x.double()
    centred = x - x.mean(0)
    energy = torch.linalg.svdvals(centred) ** 2
    share = energy / energy.sum()
    entropy = -(share * share.clamp_min(1e-300).log()).sum()
    between = sum(
        float((y == c).sum()) * float(((x[y == c].mean(0) - x.mean(0)) ** 2).sum())
        for c in y.unique()
    )
    return {
        "effective_rank": float(entropy.exp()),
        "top1_share": float(share[0]),
        "between_class": between / float(energy.sum()),
    }


def probe(run_dir: Path, scale: float) -> dict[str, dict[str, float]]:
    """The run's global model, its CCVR-calibrated head and the centralized probe."""
    config, state, deltas = load_run_update(run_dir)
    federation = build_federation(config)
    runtime = federation.runtime
    metric_names = federation.task.task.metrics
    batch = config.server.eval_batch_size
    extras = dict(state.extras)
    prefix, _ = runtime.bank.head_linear()
    weight = extras[f"{prefix}.weight"]
    bias = extras.get(f"{prefix}.bias")

    def scored(w: Tensor, b: Tensor | None) -> dict[str, float]:
        head = dict(extras)
        head[f"{prefix}.weight"] = w
        if b is not None:
            head[f"{prefix}.bias"] = b
        return runtime.evaluate(deltas, head, federation.dev_features, metric_names, batch)

    num_classes = federation.task.task.num_labels
    parts, feats, labels = [], [], []
    for slot in federation.clients:
        examples = federation.train_features[slot.client_id]
        x, y = runtime.head_features(deltas, extras, examples, batch)
        parts.append(ClassMoments.of(x, y, num_classes))  # what the client would send
        feats.append(x)
        labels.append(y)
    # the seed the round loop draws the virtual features with (server.head_calibration)
    seed = _seed(config.federation.seed, config.federation.rounds, 11)
    head, _ = calibrated_head(parts, extras, prefix, per_example=scale, seed=seed)
    probe_w, probe_b = fit_linear(torch.cat(feats), torch.cat(labels), weight, bias)
    return {
        "global": scored(weight, bias),
        "ccvr": scored(head[f"{prefix}.weight"], head.get(f"{prefix}.bias")),
        "probe": scored(probe_w, probe_b),
        "features": spread(torch.cat(feats), torch.cat(labels)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--virtual", type=float, default=10.0, help="virtual features per example")
    args = parser.parse_args()
    for run_dir in args.runs:
        rows = probe(run_dir, args.virtual)
        cells = "  ".join(
            f"{name} " + " ".join(f"{k} {v:.3f}" for k, v in m.items()) for name, m in rows.items()
        )
        print(f"{run_dir}: {cells}", flush=True)


if __name__ == "__main__":
    main()
