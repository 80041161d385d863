"""`tfcap evaluate`: caption a split (or read a caption CSV) and score it as coco-caption does.

References come from a records folder (the `caption/text` feature, original text) or from any
dataset layout `build-records` reads. Both sides are scored after `metrics.ptb_tokenize`
(lower case, PTB tokens, punctuation dropped; `<start>`/`<end>`/`<pad>` never scored).
Predictions for images without references, and references without a prediction, are counted
and listed, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import tensorflow as tf

from tfcap import datasets, metrics, records
from tfcap import predictions as prediction_files
from tfcap.errors import TfcapError
from tfcap.outputs import Output, claimed, write_text_atomic
from tfcap.progress import Stopwatch, progress_bar
from tfcap.reading import clip, excerpt


@dataclasses.dataclass
class Evaluation:
    """Scores and the bookkeeping that makes them honest."""

    scores: dict  # BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (+ meteor_unavailable)
    images_scored: int
    split: str | None
    hypotheses: dict[str, str]  # image id -> caption, the scored ones
    without_references: list[str]  # predicted images absent from the references
    without_prediction: list[str]  # referenced images with no (successful) prediction
    failed: dict[str, str]  # image -> error, from a caption-dir CSV
    settings: dict  # decoding settings, model config, sources
    repeated_predictions: int = 0  # prediction rows that repeated another one for the same image, scored once


def references_from(source: Path, split: str | None) -> dict[str, list[str]]:
    """Image id -> reference captions, from a records folder or a dataset in any layout build-records
    reads: a dataset folder, a Karpathy dataset_*.json, or a captions CSV. The images need not be
    there: only the captions are read."""
    source = Path(source)
    if not source.exists():
        raise TfcapError(f"references {source} do not exist (a records folder or a dataset)")
    if (source / records.MANIFEST).is_file():
        splits = [split] if split else list(records.read_manifest(source)["splits"])
        return {ex["image_id"].decode(): [c.decode("utf-8") for c in ex["captions"]]
                for s in splits for ex in records.iterate_examples(source, s)}
    # images_dir: any folder that exists, so that no layout looks for its images.
    if source.is_dir() or source.suffix.lower() == ".json":
        data = datasets.read_source(source, images_dir=source if source.is_dir() else source.parent)
    else:
        data = datasets.read_source(None, captions_file=source, images_dir=source.parent)
    if split is None:
        return dict(data.captions)
    split_of, _ = datasets.assign_splits(list(data.captions), data, datasets.SplitConfig())
    return {i: c for i, c in data.captions.items() if split_of.get(i) == split}


def predictions_from(path: Path) -> tuple[dict[str, str], dict[str, str], int]:
    """(image path -> caption, image path -> error, repeated rows) of a caption-dir output: a CSV or JSON
    Lines file, or a Beam OUT folder (`tfcap.predictions`).

    A path with several rows is scored once when its rows agree (the same caption, or the same error):
    the repeats change no score, and are counted. Rows that disagree are an error naming both: which
    one to score would be a guess (two runs' outputs pasted together, say), and the scores would
    depend on the order of the rows.
    """
    read = prediction_files.read(path)
    repeats = 0
    for rows in read.repeated().values():
        first = rows[0]
        other = next((r for r in rows[1:] if (r.caption, r.error) != (first.caption, first.error)), None)
        if other is not None:
            raise TfcapError(f"{other.where}: a second, different prediction for {excerpt(first.path, 60)} "
                             f"(first at {first.where}); keep one row per image")
        repeats += len(rows) - 1
    ok = {r.path: r.caption for r in read.rows if not r.error}
    failed = {r.path: r.error for r in read.rows if r.error}
    return ok, failed, repeats


def default_output(*, model_path: Path | None = None, predictions: Path | None = None, split: str | None) -> Path:
    """Where `tfcap evaluate` writes without -o: RUN_DIR/eval-SPLIT; SAVEDMODEL.eval-SPLIT beside a
    SavedModel (never inside it); ./eval-NAME-SPLIT for a bundled model (never inside the installed
    package); PREDICTIONS.eval beside the predictions; ./human-baseline-SPLIT."""
    from tfcap import pretrained

    if model_path is not None:
        model_path = Path(model_path)
        if pretrained.is_bundled(model_path):
            return Path(f"eval-{model_path.name}-{split}")
        if (model_path / "saved_model.pb").is_file():
            model_path = model_path.resolve()  # "." has no name to add to
            return model_path.with_name(f"{model_path.name}.eval-{split}")
        return model_path / f"eval-{split}"
    if predictions is not None:
        return Path(predictions).with_suffix(".eval")
    return Path(f"human-baseline-{split}")


def caption_split(predictor, records_dir: Path, split: str, batch_size: int = 32,
                  show_progress: bool = True) -> dict[str, str]:
    """Caption every image of a records split: image id -> caption."""
    count = records.read_manifest(records_dir)["splits"][split]["images"]
    batches = (records.load_split(records_dir, split)
               .map(lambda e: (e["image_id"], predictor.preprocess_bytes(e["image"])),
                    num_parallel_calls=tf.data.AUTOTUNE)
               .batch(batch_size)
               .prefetch(tf.data.AUTOTUNE))
    hypotheses = {}
    with progress_bar(count, f"captioning {split}", show_progress) as advance:
        for image_ids, pixels in batches:
            captions = predictor.caption_pixels(pixels)["captions"]
            hypotheses.update({i.decode(): c.decode("utf-8") for i, c in zip(image_ids.numpy(), captions.numpy())})
            advance(len(image_ids))
    return hypotheses


def _match(hypotheses: dict[str, str], references: dict[str, list[str]]) -> tuple[dict[str, str], list[str], int]:
    """Map prediction paths to reference ids: exact, else by file name (caption-dir paths are relative).

    Returns (reference id -> caption, paths matching no reference, predictions that matched an
    already matched reference with the same caption). Two different captions for one reference
    (`a/x.jpg` and `b/x.jpg` both taken for `x.jpg`) are an error.
    """
    by_name = {}
    for image_id in references:
        by_name.setdefault(Path(image_id).name, []).append(image_id)
    matched, unmatched, source, repeats = {}, [], {}, 0
    for path, caption in hypotheses.items():
        if path in references:
            image_id = path
        elif len(by_name.get(Path(path).name, [])) == 1:
            image_id = by_name[Path(path).name][0]
        else:
            unmatched.append(path)
            continue
        if image_id in matched:
            if matched[image_id] != caption:
                raise TfcapError(f"the predictions {excerpt(source[image_id], 60)} and {excerpt(path, 60)} are both "
                                 f"taken for the reference image {excerpt(image_id, 60)}, with different captions; "
                                 "give paths as the references name them")
            repeats += 1
            continue
        matched[image_id], source[image_id] = caption, path
    return matched, unmatched, repeats


def evaluate(references: dict[str, list[str]], hypotheses: dict[str, str], *, split: str | None = None,
             failed: dict[str, str] | None = None, meteor: bool = True, settings: dict | None = None,
             repeated: int = 0) -> Evaluation:
    """Score hypotheses against references (only images that have both); `repeated`: prediction rows
    already dropped as identical repeats (`predictions_from`), counted with those found here."""
    matched, unmatched, repeats = _match(hypotheses, references)
    if not matched:
        raise TfcapError("no prediction matches a reference image: check --references and --split")
    scores = metrics.score_captions({i: references[i] for i in matched}, matched, meteor=meteor)
    return Evaluation(scores=scores, images_scored=len(matched), split=split, hypotheses=matched,
                      without_references=sorted(unmatched),
                      without_prediction=sorted(set(references) - set(matched)),
                      failed=dict(failed or {}), settings=settings or {}, repeated_predictions=repeated + repeats)


def human_baseline(references: dict[str, list[str]], *, split: str | None = None, meteor: bool = True) -> Evaluation:
    """Each image's first reference scored against the others: how well people agree with people."""
    usable = {i: refs for i, refs in references.items() if len(refs) >= 2}
    if not usable:
        raise TfcapError("the human baseline needs images with at least two references")
    return evaluate({i: refs[1:] for i, refs in usable.items()}, {i: refs[0] for i, refs in usable.items()},
                    split=split, meteor=meteor, settings={"hypothesis": "first reference caption"})


def table(result: Evaluation) -> str:
    """The scores as a small text table, with the bookkeeping under it."""
    lines = [f"{'metric':<10} {'score':>8}"]
    skipped = result.scores.get("meteor_unavailable") == metrics.METEOR_DISABLED  # asked for: not a problem
    for key in metrics.METRIC_KEYS:
        value = result.scores.get(key)
        missing = "skipped" if key == "METEOR" and skipped else "n/a"
        lines.append(f"{key:<10} {value:>8.4f}" if value is not None else f"{key:<10} {missing:>8}")
    if result.scores.get("meteor_unavailable") and not skipped:
        lines.append(f"METEOR unavailable: {result.scores['meteor_unavailable']}")
    lines.append(f"images scored: {result.images_scored}" + (f" (split {result.split})" if result.split else ""))
    for label, items in (("predictions without references", result.without_references),
                         ("reference images without a prediction", result.without_prediction),
                         ("failed images (not scored)", list(result.failed))):
        if items:
            lines.append(f"{label}: {len(items)} (e.g. {', '.join(clip(i, 60) for i in items[:3])})")
    if result.repeated_predictions:
        lines.append(f"repeated predictions (same image, same caption; scored once): {result.repeated_predictions}")
    return "\n".join(lines)


def write_results(out: Path | Output, result: Evaluation, overwrite: bool = False) -> Path:
    """OUT/scores.json (every score and the settings) and OUT/captions_coco.json ([{image_id, caption}]),
    written into a scratch folder renamed into place; `out` may be an `outputs.Output` the caller claimed."""
    with claimed(out, overwrite=overwrite) as output, output.directory() as scratch:
        payload = {"scores": result.scores, "split": result.split, "images_scored": result.images_scored,
                   "without_references": result.without_references, "without_prediction": result.without_prediction,
                   "failed": result.failed, "repeated_predictions": result.repeated_predictions,
                   "settings": result.settings}
        write_text_atomic(scratch / "scores.json", json.dumps(payload, indent=2) + "\n")
        coco = [{"image_id": i, "caption": c} for i, c in sorted(result.hypotheses.items())]
        write_text_atomic(scratch / "captions_coco.json", json.dumps(coco, indent=1) + "\n")
    return output.path


def run_model(model_path: Path, records_dir: Path, split: str, *, beam_size: int | None, length_penalty: float | None,
              batch_size: int, no_repeat_ngram: int | None = None, precision: str | None = None,
              decoder_precision: str | None = None, meteor: bool, show_progress: bool) -> Evaluation:
    """Caption a records split with a run directory or SavedModel and score it (no labels: nothing scores them)."""
    from tfcap.export import load_predictor

    records.shard_paths(records_dir, split)  # a wrong folder or split fails before the model loads
    predictor = load_predictor(model_path, beam_size=beam_size, length_penalty=length_penalty,
                               no_repeat_ngram=no_repeat_ngram, labels=0, precision=precision,
                               decoder_precision=decoder_precision)
    clock = Stopwatch()
    hypotheses = caption_split(predictor, records_dir, split, batch_size, show_progress)
    seconds = clock.seconds
    settings = {"model": str(Path(model_path).resolve()), "records": str(Path(records_dir).resolve()),
                **predictor.settings, "captioning_seconds": seconds}
    return evaluate(references_from(records_dir, split), hypotheses, split=split, meteor=meteor, settings=settings)
