"""What `transformer.main` runs: train (or resume), then plot, export the model, and sample."""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from transformer import model_io, paths
from transformer.inference import SamplingConfig, generate
from transformer.train import best as best_lib
from transformer.train import plots, trainer

PREEMPTED = 75  # Exit status after a SIGTERM stop (EX_TEMPFAIL): rerun to resume.


class Preempted(SystemExit):
    """Raised after a SIGTERM stop was saved: the run is not finished, so nothing is exported."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED)
        self.step = step


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    result = trainer.train_and_evaluate(config, workdir)
    if (step := result["preempted_at"]) is not None:
        if jax.process_index() == 0:
            print(f"preempted at step {step}: checkpoint saved; rerun the same command to resume "
                  f"(exit status {PREEMPTED})", flush=True)
        raise Preempted(step)
    config = result["config"]  # With `init_from` resolved (architecture, tokenizer).
    workdir = paths.absolute(workdir)
    model = nnx.merge(result["graphdef"], result["state"].params)
    export = export_model(model, config, workdir / "model", result["tokenizer"])
    if model.config.lora_rank > 0:
        export_adapters(model, config, workdir, result["tokenizer"])
    if config.objective not in ("lm", "sft"):
        report_finetuning(result, workdir, export)
        return result
    if jax.process_index() == 0:
        if (plot := plots.plot_loss_curves(workdir)) is not None:
            logging.info("loss curves: %s", plot)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()
                            if k in ("loss", "eval_loss", "eval_perplexity", "tokens_per_s"))
        print(f"finished at step {int(result['state'].step)}: {summary}", flush=True)
        use = "transformer.generate" if model.config.causal else "transformer.score"
        print(f"model: {export} (python -m {use} --checkpoint={export} ...)", flush=True)
    if model.config.causal and config.samples.prompts:
        write_samples(model, result["tokenizer"], config.samples, workdir / "samples.txt",
                      mesh=result["mesh"], rules=result["rules"])
    return result


def report_finetuning(result: dict, workdir: epath.Path, export: epath.Path) -> None:
    """The final and best evaluation metrics, and where the models are."""
    if jax.process_index() != 0:
        return
    final = {k: v for k, v in result["metrics"].items()  # DP runs: the privacy spent too.
             if k.startswith("eval_") or k in ("dp_epsilon", "dp_delta")}
    print(f"finished at step {int(result['state'].step)}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in final.items() if not k.startswith("eval_count")),
          flush=True)
    if (best := result["best"]) is not None:
        print(f"best: {best['metric']}={best['value']:.4g} at step {best['step']} → "
              f"{workdir / 'best'}", flush=True)
    print(f"final model: {export}; evaluate with: python -m transformer.evaluate "
          f"--config=<recipe> --checkpoint={workdir / 'best'} --split=<split>", flush=True)


def export_model(model: nnx.Module, config: ml_collections.ConfigDict, target: epath.Path,
                 tokenizer: Any = None) -> epath.Path:
    """The trained parameters in the model-checkpoint format (`--config.init_from`,
    `from_pretrained`, `transformer.generate`; task models: `transformer.evaluate`), with the
    tokenizer files, and the chat template `tokenizer` was given by `data.chat_template`."""
    best_lib.save_task_model(target, model)
    tokenizer_path = paths.as_path(config.data.tokenizer)
    if jax.process_index() == 0 and tokenizer_path.exists():
        destination = target / "tokenizer"
        if tokenizer_path.is_dir():
            model_io.copy_tokenizer_files(tokenizer_path, destination)
        else:  # Only this tokenizer's files: its folder may hold others.
            destination.mkdir(parents=True, exist_ok=True)
            companions = {"encoder.json": "vocab.bpe", "vocab.json": "merges.txt"}
            for name in (tokenizer_path.name, companions.get(tokenizer_path.name)):
                if name and (tokenizer_path.parent / name).exists():
                    paths.copy_file(tokenizer_path.parent / name, destination / name)
    template = getattr(tokenizer, "chat_template", None)
    if jax.process_index() == 0 and template is not None and config.data.get("chat_template"):
        from transformer.data import chat  # The template the run used travels with the model.

        (target / "tokenizer").mkdir(parents=True, exist_ok=True)
        if not (target / "tokenizer" / chat.TEMPLATE_FILE).exists():
            chat.save_template(template, target / "tokenizer")
    return target


def export_adapters(model: nnx.Module, config: ml_collections.ConfigDict, workdir: epath.Path,
                    tokenizer: Any) -> None:
    """A LoRA run also writes its adapters as a peft folder (WORKDIR/adapter) and the model with
    them merged into the weights (WORKDIR/merged), when the base has a Hugging Face form."""
    from transformer.hf import adapters

    task = hasattr(model, "backbone")
    try:
        folder = adapters.export_adapter(model.backbone if task else model, workdir / "adapter",
                                         config.init_from or None)
    except ValueError as error:  # No Hugging Face family fits the base: no peft form either.
        logging.warning("no peft adapter written: %s", error)
    else:
        logging.info("LoRA adapter (peft): %s", folder)
    if not task:  # A task model keeps its adapters (its head is trained whole anyway).
        merged = export_model(adapters.merge(model), config, workdir / "merged", tokenizer)
        logging.info("adapters merged into the weights: %s", merged)


def write_samples(
    model: nnx.Module,
    tokenizer: Any,
    samples: ml_collections.ConfigDict,
    path: epath.Path,
    *,
    mesh: jax.sharding.Mesh,
    rules: Any,
) -> None:
    """Continue each prompt; print and save the texts."""
    prompts = [tokenizer.add_special_tokens(tokenizer.encode(p))[0] for p in samples.prompts]
    stop = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    sampling = SamplingConfig(
        max_new_tokens=samples.max_new_tokens, temperature=samples.temperature,
        top_k=samples.top_k if samples.temperature > 0 else 0,  # Greedy ignores top_k.
        stop_tokens=stop, pad_id=tokenizer.pad_id or 0,
    )
    out = generate(model, prompts, sampling, rng=jax.random.key(0), mesh=mesh, rules=rules)
    texts = [
        tokenizer.decode([*ids, *(int(t) for t in tokens[:length])])
        for ids, tokens, length in zip(prompts, out.tokens, out.lengths)
    ]
    if jax.process_index() == 0:
        path.write_text("\n\n".join(texts) + "\n")
        for text in texts:
            print(f"--- sample\n{text}", flush=True)
