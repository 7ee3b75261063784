"""What `transformer.main` runs: train (or resume), then plot, export and sample."""

from __future__ import annotations

import logging
import pathlib

import jax
import ml_collections

from transformer.train import plots, trainer


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    result = trainer.train_and_evaluate(config, workdir)
    workdir = pathlib.Path(workdir).expanduser().resolve()
    if jax.process_index() == 0:
        if (plot := plots.plot_loss_curves(workdir)) is not None:
            logging.info("loss curves: %s", plot)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()
                            if k in ("loss", "eval_loss", "eval_perplexity", "tokens_per_s"))
        print(f"finished at step {int(result['state'].step)}: {summary}", flush=True)
    return result
