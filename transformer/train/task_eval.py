"""Evaluation of a fine-tuning task over a whole split, exactly once.

The split is cut into fixed-shape batches (the last one padded with weight-0 rows), run through
one jitted prediction function, and scored on the host with the task's metric. Every process
builds the batch layout of every process (cheap for evaluation splits), so each process can map
the global predictions back to examples and all compute the same metrics. Process 0 writes the
predictions file and the confusion matrix.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from transformer import metrics as metrics_lib
from transformer import paths
from transformer.data import local_builder, pipeline, sources, task_packing, tasks
from transformer.train import distributed, objectives


def build_report(data: ml_collections.ConfigDict, split: str, fmt: str | None) -> sources.Report:
    """Records of `split` skipped while reading its local files (empty for catalog datasets)."""
    if data.dataset:
        return sources.Report()
    files = {s: (f.split(",") if isinstance(f, str) else list(f))
             for s, f in data.local_files.to_dict().items()}
    build = local_builder.build_local_dataset(
        data.local_format or fmt, files, cache_dir=data.cache_dir or None, on_error=data.on_error,
        **data.local_options.to_dict())
    return build.reports.get(split, sources.Report())


def log_build_report(data: ml_collections.ConfigDict, split: str, fmt: str | None) -> None:
    report = build_report(data, split, fmt)
    if report.counts and jax.process_index() == 0:
        logging.warning("%s split %r: %s", data.task, split, report.summary())


class TaskEvaluator:
    """`evaluator(params, step)` → {'eval_<metric>': value}; writes `<workdir>/eval/`.

    `batches` are this process's evaluation batches; `score(outputs, step)` scores predictions
    made by anything (the benchmark's PyTorch reference too). Without a graphdef, only those.
    """

    def __init__(self, config: ml_collections.ConfigDict, tokenizer: Any,
                 graphdef: nnx.GraphDef | None, params_sharding: Any,
                 batch_sharding: NamedSharding | None, *, split: str,
                 workdir: str | os.PathLike | None = None,
                 out_dir: str | os.PathLike | None = None):
        self.config, self.split = config, split
        self.task = objectives.task_of(config)
        if out_dir is None and workdir is not None:
            out_dir = paths.as_path(workdir) / "eval"
        self.out_dir = None if out_dir is None else paths.as_path(out_dir)
        self.batch_sharding = batch_sharding
        count, me = jax.process_count(), jax.process_index()
        try:
            sets = [pipeline.create_eval_batches(config.data, split, tokenizer=tokenizer,
                                                 process_index=p, process_count=count)
                    for p in range(count)]
        except sources.DataError as error:
            raise sources.DataError(
                f"{error}. The label set is {list(self.task.label_names)} (from the task, or read "
                "from the training split); list every label in --config.finetune.labels or fix "
                "the evaluation file") from None
        num_batches = max(len(s.batches) for s in sets)
        self.batches = sets[me].batches + [_blank(sets[me].batches[0])] * (
            num_batches - len(sets[me].batches))
        self.rows = _global_rows(sets, num_batches)  # Host view of every global batch row.
        self.report = sources.Report()
        self.report.update(build_report(config.data, split, self.task.local_format))
        self.report.update(sets[me].report)
        if self.report.counts and jax.process_index() == 0:
            logging.warning("eval split %r: %s", split, self.report.summary())
        self.device_batches = self.batches
        multiple = objectives.pack_row_multiple(config, count)
        if multiple:  # One row count for the whole split: one compiled shape.
            most = max(task_packing.rows_needed(b) for b in self.batches)
            rows = -(-most // multiple) * multiple
            self.device_batches = [task_packing.pack_task_batch(b, num_rows=rows)
                                   for b in self.batches]
        if graphdef is None:
            return
        replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
        length = config.data.max_length

        def predict(params, batch):
            out = objectives.forward(nnx.merge(graphdef, params), batch)
            if "logits" in out:  # Token logits are large: only the argmax leaves the device.
                logits = out["logits"]
                if logits.ndim == 2:
                    return {"logits": logits}
                predictions = logits.argmax(-1).astype(np.int32)
                if task_packing.is_packed(batch):  # Back to one row per example.
                    predictions = objectives.placement(batch).unpack_tokens(predictions, length)
                out = {"predictions": predictions}
            return out

        self.predict = jax.jit(predict, in_shardings=(params_sharding, batch_sharding),
                               out_shardings=replicated)

    def __call__(self, params: Any, step: int) -> dict[str, float]:
        outputs = []
        for batch in self.device_batches:  # Dispatch all, then fetch: the device never waits.
            outputs.append(self.predict(params, distributed.to_global(batch, self.batch_sharding)))
        return self.score({k: np.concatenate([np.asarray(o[k]) for o in outputs])
                           for k in outputs[0]}, step)

    def score(self, merged: dict[str, np.ndarray], step: int) -> dict[str, float]:
        """Metrics of the predictions of every global row, in `self.rows` order."""
        real = self.rows["weights"] > 0
        scorer = SCORERS[self.task.kind]
        write = self.out_dir is not None and jax.process_index() == 0
        if write:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        values = scorer(self, merged, real, self.out_dir if write else None)
        values["examples"] = float(real.sum())
        for reason, n in self.report.counts.items():
            values[f"count_{reason}"] = float(n)
        result = {f"eval_{k}": float(v) for k, v in values.items()}
        if write:
            (self.out_dir / "metrics.json").write_text(
                json.dumps({"step": step, "split": self.split, **result}, indent=1) + "\n")
        return result


def _blank(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return pipeline.pad_batch({k: v[:0] for k, v in batch.items()}, len(batch["weights"]))


def _global_rows(sets: list[pipeline.EvalSet], num_batches: int) -> dict[str, Any]:
    """Host arrays of the global batches in device order (batch b = every process's batch b,
    by process index), plus example ids and offsets (QA) per row; None on padding rows."""
    columns: dict[str, list] = {}
    ids: list[str | None] = []
    offsets: list[np.ndarray | None] = []
    for b in range(num_batches):
        for s in sets:
            batch = s.batches[b] if b < len(s.batches) else _blank(s.batches[0])
            size = len(batch["weights"])
            for k, v in batch.items():
                columns.setdefault(k, []).append(v)
            chunk = range(b * size, min((b + 1) * size, s.num_features))
            ids += [s.example_ids[i] for i in chunk] + [None] * (size - len(chunk))
            if s.offset_mapping:
                offsets += [s.offset_mapping[i] for i in chunk] + [None] * (size - len(chunk))
    rows = {k: np.concatenate(v) for k, v in columns.items()}
    rows["example_ids"], rows["offsets"] = ids, offsets
    return rows


def _write_jsonl(path: epath.Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))


def _matthews(matrix: np.ndarray) -> float:
    """Matthews correlation (multi-class, Gorodkin) from a confusion matrix."""
    c = matrix.astype(np.float64)
    t, p, n, correct = c.sum(1), c.sum(0), c.sum(), np.trace(c)
    den = np.sqrt((n * n - (p * p).sum()) * (n * n - (t * t).sum()))
    return float((correct * n - (t * p).sum()) / den) if den else 0.0


def _score_classes(ev: TaskEvaluator, labels, predictions, out_dir, names) -> dict[str, float]:
    matrix = metrics_lib.confusion_matrix(labels, predictions, num_classes=len(names))
    prf = metrics_lib.precision_recall_f1(labels, predictions, classes=range(len(names)))
    if out_dir is not None:
        metrics_lib.save_confusion_matrix(matrix, out_dir / "confusion_matrix", names,
                                          title=f"{ev.task.name} {ev.split}")
    return {"accuracy": metrics_lib.accuracy(labels, predictions), "macro_f1": prf["f1"],
            "macro_precision": prf["precision"], "macro_recall": prf["recall"],
            "matthews_corr": _matthews(matrix)}


def score_classification(ev, out, real, out_dir) -> dict[str, float]:
    names = ev.task.label_names
    logits = out["logits"][real]
    labels, predictions = ev.rows["labels"][real], logits.argmax(-1)
    values = _score_classes(ev, labels, predictions, out_dir, names)
    if ev.task.kind == "relation":
        gold = [names[i] for i in labels]
        pred = [names[i] for i in predictions]
        score = metrics_lib.semeval2010_task8_score(gold, pred)
        values.update({k: score[k] for k in ("macro_f1", "macro_precision", "macro_recall",
                                              "micro_f1")})
    if out_dir is not None:
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        _write_jsonl(out_dir / "predictions.jsonl", [
            {"index": i, "label": names[t], "prediction": names[p],
             "probability": round(float(q[p]), 5)}
            for i, (t, p, q) in enumerate(zip(labels, predictions, probs))])
    return values


def score_tokens(ev, out, real, out_dir) -> dict[str, float]:
    names = ev.task.label_names
    labels, predictions = ev.rows["labels"][real], out["predictions"][real]
    gold, pred = metrics_lib.tags_from_label_ids(predictions, labels, names)
    scores = metrics_lib.entity_f1(gold, pred)
    scored = labels != tasks.IGNORE
    values = {"entity_f1": scores["f1"], "entity_precision": scores["precision"],
              "entity_recall": scores["recall"], "entity_macro_f1": scores["macro_f1"]}
    tag_values = _score_classes(ev, labels[scored], predictions[scored], out_dir, names)
    values["token_accuracy"] = tag_values["accuracy"]
    if out_dir is not None:
        _write_jsonl(out_dir / "predictions.jsonl", [
            {"index": i, "gold": g, "predicted": p} for i, (g, p) in enumerate(zip(gold, pred))])
    return values


def score_qa(ev, out, real, out_dir) -> dict[str, float]:
    if not hasattr(ev, "contexts"):  # Contexts and reference answers of the split, read once.
        fmt = ev.task.local_format
        records = pipeline.open_source(ev.config.data, ev.split, fmt)
        ev.contexts, ev.answers = {}, {}
        for i in range(len(records)):
            r = sources.decode_strings(records[i])
            ev.contexts[r["id"]] = r["context"]
            ev.answers[r["id"]] = list(r["answers"]["text"])
    offsets = np.stack([o if o is not None else np.full_like(ev.rows["offsets"][0], -1)
                        for o in ev.rows["offsets"]])
    ft = ev.config.finetune
    predictions = metrics_lib.decode_predictions(
        out["start_logits"], out["end_logits"], offsets, offsets[..., 0] >= 0,
        ev.rows["example_ids"], ev.contexts, n_best=ft.n_best_size,
        max_answer_length=ft.max_answer_length)
    scores = metrics_lib.squad_em_f1(predictions, ev.answers)
    if out_dir is not None:
        metrics_lib.write_predictions(predictions, out_dir / "predictions.json")
    return {"exact_match": scores["exact_match"], "f1": scores["f1"],
            "questions": scores["total"], "unanswered": scores["missing"]}


SCORERS = {"classification": score_classification, "relation": score_classification,
           "token_classification": score_tokens, "qa": score_qa}
