"""`tfcap demo`: the whole pipeline offline, on generated scenes, in a few minutes on a CPU.

It runs the same library calls as the commands a user types: generate a captioned dataset of
synthetic scenes, `build-records`, `train`, `caption-dir` on the held-out (test) images with a
gallery, and `evaluate` against their references; then it scores a model that says the same
caption for every image, to show that the trained one really looks at the pictures.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path

import click

from tfcap import caption, datasets, decoder, encoder, evaluate, export, records, synthetic, train
from tfcap.errors import TfcapError
from tfcap.outputs import refuse_existing
from tfcap.progress import Stopwatch, summary


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes chosen to learn well within about 5 minutes on 2 CPU cores, on any machine.

    No pretrained weights are needed: a small CNN (`convnet`) learns from scratch together with
    the decoder (train_encoder). Frozen random CNN features barely tell a circle from a square;
    a trained one does within a few epochs, since the scenes are simple.
    """

    scenes: synthetic.SceneConfig = synthetic.SceneConfig(images=2500, size=64, seed=0)
    encoder: encoder.EncoderConfig = encoder.EncoderConfig(name="convnet", weights="none", image_size=64)
    decoder: decoder.DecoderConfig = decoder.DecoderConfig(kind="merge", units=256, embed_dim=128, dropout=0.2)
    train: train.TrainConfig = train.TrainConfig(epochs=10, batch_size=32, learning_rate=3e-3, eval_every=5,
                                                 patience=0, seed=0, train_encoder=True)
    beam_size: int = 3


def run_demo(out: Path, config: DemoConfig = DemoConfig(), *, overwrite: bool = False,
             show_progress: bool = True) -> dict:
    """Run the pipeline into `out`; return the scores, the constant-caption baseline and the paths."""
    out = Path(out)
    refuse_existing(out, overwrite)
    clock = Stopwatch()
    out.mkdir(parents=True, exist_ok=True)
    step = lambda message: click.echo(f"[demo {clock.seconds:5.0f} s] {message}", err=True)  # noqa: E731

    step(f"generating {config.scenes.images} captioned scenes")
    data = synthetic.write_scenes(out / "data", config.scenes, overwrite=True)
    step("build-records")
    source = datasets.read_source(None, captions_file=Path(data["captions_file"]), images_dir=Path(data["images_dir"]))
    records.build_records(source, out / "records", records.RecordsConfig(min_count=1), overwrite=True,
                          show_progress=show_progress)
    step("train")
    train.train(out / "records", out / "run", encoder_config=config.encoder, decoder_config=config.decoder,
                train_config=config.train, overwrite=True, show_progress=show_progress)

    # The held-out images in a folder of their own, as a user would point caption-dir at one.
    heldout = out / "heldout"
    heldout.mkdir(exist_ok=True)
    test_ids = [ex["image_id"].decode() for ex in records.iterate_examples(out / "records", "test")]
    for image_id in test_ids:
        link = heldout / image_id
        if not link.exists():
            os.symlink(Path(data["images_dir"]).resolve() / image_id, link)
    step(f"caption-dir on {len(test_ids)} held-out images")
    predictor = export.load_predictor(out / "run", beam_size=config.beam_size)
    csv_path, gallery_path = out / "captions.csv", out / "gallery.html"
    caption.caption_directory(predictor, heldout, csv_path, caption.CaptionConfig(beam_size=config.beam_size),
                              overwrite=True, show_progress=show_progress)
    from tfcap.gallery import write_gallery
    write_gallery(csv_path, heldout, gallery_path, title="tfcap demo: held-out scenes", overwrite=True)

    step("evaluate")
    references = evaluate.references_from(out / "records", "test")
    hypotheses, failed, _ = evaluate.predictions_from(csv_path)
    if failed:
        raise TfcapError(f"{len(failed)} held-out images failed to caption: {next(iter(failed.values()))}")
    result = evaluate.evaluate(references, hypotheses, split="test", meteor=False)
    evaluate.write_results(out / "eval", result, overwrite=True)
    train_refs = evaluate.references_from(out / "records", "train")
    most_common = collections.Counter(c for refs in train_refs.values() for c in refs).most_common(1)[0][0]
    constant = evaluate.evaluate(references, {i: most_common for i in references}, split="test", meteor=False)
    seconds = clock.seconds
    click.echo(evaluate.table(result))
    click.echo(f"constant caption {most_common!r} for every image: BLEU-4 {constant.scores['BLEU-4']:.4f}, "
               f"CIDEr-D {constant.scores['CIDEr-D']:.4f}")
    click.echo(f"captions: {csv_path}\ngallery:  {gallery_path}")
    summary(f"demo: {config.scenes.images} scenes, held-out BLEU-4 {result.scores['BLEU-4']:.3f} "
            f"(constant caption {constant.scores['BLEU-4']:.3f}) in {seconds:.0f} s -> {out}")
    return {"scores": result.scores, "constant_scores": constant.scores, "constant_caption": most_common,
            "images_scored": result.images_scored, "csv": str(csv_path), "gallery": str(gallery_path),
            "seconds": seconds}
