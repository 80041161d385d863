"""A caption gallery: one self-contained HTML page of thumbnails, captions and the rows' other fields.

Every field of caption-dir's rows (`tfcap.rows.FIELDS`) that the predictions file has is shown on
its card: numbers (score, ...) as badges, sortable (best or worst first) and filterable (a minimum
each), labels as a line that the text filter searches too, flags that are false as a mark with a
filter of their own.

The page embeds every thumbnail as a `data:` URI and inlines its CSS and JS, so it can be opened
offline, mailed, or attached to a CI run. Thumbnails are made with TensorFlow ops (the library
must not need PIL at runtime), decoded and resized in parallel through tf.data.
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

import tensorflow as tf

from tfcap import names, records
from tfcap.rows import FIELDS, FLAG, LABELS, NUMBER
from tfcap.errors import TfcapError
from tfcap.images import DEFAULT_MAX_PIXELS, decode_rgb, diagnose, header_shape
from tfcap.outputs import Output, claimed
from tfcap.predictions import Prediction, read as read_output
from tfcap.progress import progress_bar
from tfcap.reading import excerpt

JPEG_QUALITY = 85
SHOWN = [f for f in FIELDS if f.column != "caption"]  # the fields a card shows besides its caption


def read_predictions(path: Path) -> list[Prediction]:
    """The rows of a caption-dir output (CSV, JSON Lines or a Beam OUT folder), checked: `tfcap.predictions`."""
    return read_output(path).rows


# ---------------------------------------------------------------------------------------------
# Thumbnails


def _thumbnail(data: tf.Tensor, size: int, max_pixels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Image bytes -> (encoded thumbnail, [height, width]) at most `size` px on the long side.

    Always re-encoded, even when small: the thumbnail then shows exactly what the model saw
    (alpha over white, first GIF frame, EXIF rotation ignored), not what a browser would make of
    the original. Fails (an op error, dropped by the caller) on anything that does not decode.
    """
    shape = header_shape(data)
    # Refuse decompression bombs before allocating their pixels.
    check = tf.debugging.assert_less_equal(shape[0] * shape[1], tf.constant(max_pixels, tf.int64))
    with tf.control_dependencies([check]):
        long_side = tf.reduce_max(shape)

    def jpeg():
        # Let libjpeg downscale large photos by 2/4/8 while decoding: several times faster,
        # and the result is still at least `size` px long.
        branch = tf.add_n([tf.cast(long_side >= r * size, tf.int32) for r in (2, 4, 8)])
        return tf.switch_case(branch, [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r)
                                       for r in (1, 2, 4, 8)])

    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    image = tf.cond(is_jpeg, jpeg, lambda: decode_rgb(data))
    hw = tf.shape(image)[:2]
    scale = tf.minimum(1.0, size / tf.cast(tf.reduce_max(hw), tf.float32))
    new_hw = tf.maximum(1, tf.cast(tf.round(tf.cast(hw, tf.float32) * scale), tf.int32))
    small = tf.image.resize(image, new_hw, antialias=True)
    encoded = tf.io.encode_jpeg(tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8),
                                quality=JPEG_QUALITY)
    return encoded, new_hw


def make_thumbnails(files: list[Path], size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS,
                    progress: bool = False) -> dict[int, tuple[bytes, int, int]]:
    """Thumbnail every file in parallel; {index in `files`: (image bytes, height, width)}.

    Files that are missing or do not decode are simply absent from the result.
    """
    if not files:
        return {}
    ds = records.without_autotuning(tf.data.Dataset.from_tensor_slices(
        (tf.range(len(files), dtype=tf.int64), tf.constant([os.fsencode(f) for f in files], tf.string))))
    ds = ds.map(lambda i, f: (i, *_thumbnail(tf.io.read_file(f), size, max_pixels)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    # ignore_errors drops a failing element instead of ending the whole dataset; the index
    # carried along tells which ones went missing.
    ds = ds.ignore_errors().batch(64).prefetch(tf.data.AUTOTUNE)
    thumbs = {}
    with progress_bar(len(files), "Thumbnails", enabled=progress) as advance:
        for indices, images, shapes in ds.as_numpy_iterator():
            for i, image, (height, width) in zip(indices, images, shapes):
                thumbs[int(i)] = (image, int(height), int(width))
            advance(len(indices))
        advance(len(files) - len(thumbs))  # the failed ones, so the bar ends full
    return thumbs


def _unreadable_reason(path: Path, max_pixels: int) -> str:
    """Why `path` got no thumbnail (failures only, so the extra read costs nothing on success)."""
    if path.is_file():
        try:
            height, width = header_shape(tf.constant(path.read_bytes())).numpy()
        except (OSError, tf.errors.OpError):
            height = width = -1
        if height * width > max_pixels:
            return f"too large ({width}x{height} pixels)"
    # TF op messages can start with "{{function_node ...}}": noise to a reader of the page.
    return re.sub(r"\{\{function_node [^}]*\}\}\s*", "", diagnose(path))


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root{--bg:#f4f4f2;--card:#fff;--ink:#1d1d1b;--muted:#6b6b66;--line:#e2e2de;--bad:#b42318;--badbg:#fdecea}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
header{position:sticky;top:0;z-index:1;background:var(--card);border-bottom:1px solid var(--line);
 padding:12px 20px;display:flex;flex-wrap:wrap;align-items:center;gap:8px 24px}
h1{font-size:18px;margin:0;font-weight:650}
.stats{color:var(--muted);display:flex;flex-wrap:wrap;gap:4px 14px}
.stats b{color:var(--ink);font-weight:600}
.stats .bad b{color:var(--bad)}
.controls{margin-left:auto;display:flex;flex-wrap:wrap;gap:8px;align-items:center}
.controls input,.controls select{font:inherit;padding:5px 8px;border:1px solid var(--line);border-radius:6px;
 background:#fff}
.controls input{width:14em}
.source{flex-basis:100%;color:var(--muted);font-size:12px;overflow-wrap:anywhere}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:16px;padding:20px}
.card{margin:0;background:var(--card);border-radius:10px;overflow:hidden;display:flex;flex-direction:column;
 box-shadow:0 1px 2px rgb(0 0 0/.08),0 2px 8px rgb(0 0 0/.05);
 content-visibility:auto;contain-intrinsic-size:auto 320px}
.card[hidden]{display:none}
.thumb{position:relative;aspect-ratio:4/3;background:#ebebe7;display:flex;align-items:center;justify-content:center}
.thumb img{position:absolute;inset:0;width:100%;height:100%;object-fit:contain}
figcaption{padding:10px 12px 12px;display:flex;flex-direction:column;gap:8px;flex:1}
.caption{font-size:15px;font-weight:500}
.meta{margin-top:auto;display:flex;justify-content:space-between;align-items:baseline;gap:8px;
 color:var(--muted);font-size:12px}
.path{overflow-wrap:anywhere}
.score{font-variant-numeric:tabular-nums;white-space:nowrap;background:#eef2f7;color:#2f4a6d;
 border-radius:999px;padding:1px 8px}
.numbers{display:flex;flex-wrap:wrap;gap:4px;justify-content:flex-end}
.labels{color:var(--muted);font-size:13px}
.flag{align-self:flex-start;color:#7a4b00;background:#fff1d6;border-radius:999px;padding:1px 8px;font-size:12px}
.controls input.min{width:8em}
.failed{box-shadow:0 0 0 2px var(--bad)}
.failed .thumb{background:repeating-linear-gradient(45deg,var(--badbg) 0 12px,#fadcd8 12px 24px);
 color:var(--bad);font-weight:700;letter-spacing:.04em}
.error{color:var(--bad);background:var(--badbg);border-radius:6px;padding:4px 8px;
 font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace;overflow-wrap:anywhere}
.empty{padding:40px 20px;color:var(--muted);text-align:center}
"""

# Sorting and filtering; reads only data-* attributes, so no prediction text is ever inside <script>.
# A number field F is data-v-F on each card (empty: none): order "best:F"/"worst:F" sorts by it, an
# input.min with data-field F hides the cards below its value; a flag field is data-v-F true/false,
# show "not:F" keeps the cards where it is false.
_JS = """
const grid=document.getElementById('grid'),cards=[...grid.children];
const q=document.getElementById('q'),show=document.getElementById('show'),order=document.getElementById('order');
const shown=document.getElementById('shown'),mins=[...document.querySelectorAll('input.min')];
const num=(c,f)=>{const v=c.getAttribute('data-v-'+f);return v===null||v===''?NaN:+v;};
const by=(f,dir)=>(a,b)=>{const x=num(a,f),y=num(b,f);return (isNaN(x)-isNaN(y))||dir*(x-y)||a.dataset.i-b.dataset.i;};
const fixed={file:(a,b)=>a.dataset.i-b.dataset.i,path:(a,b)=>a.dataset.path.localeCompare(b.dataset.path)};
const sorter=v=>fixed[v]||by(v.split(':')[1],v.startsWith('best:')?-1:1);
const kept=(c,want)=>want==='all'||c.dataset.state===want||
 (want.startsWith('not:')&&c.getAttribute('data-v-'+want.slice(4))==='false');
function update(){
 const text=q.value.trim().toLowerCase(),want=show.value;let n=0;
 const floors=mins.filter(m=>m.value!=='').map(m=>[m.dataset.field,+m.value]);
 for(const c of [...cards].sort(sorter(order.value))){
  c.hidden=!(c.dataset.text.includes(text)&&kept(c,want)&&floors.every(([f,v])=>num(c,f)>=v));
  n+=!c.hidden;grid.appendChild(c);
 }
 shown.textContent=n+' shown';
}
q.addEventListener('input',update);show.addEventListener('change',update);order.addEventListener('change',update);
for(const m of mins)m.addEventListener('input',update);
update();
"""


def _data_value(value) -> str:
    """A number or flag as the script reads it from a data-v-* attribute: repr, true/false, empty for none."""
    if value is None:
        return ""
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def _labels_text(labels: list[tuple[str, float]]) -> str:
    return " · ".join(f"{name} {p:.0%}" for name, p in labels)


def _card(index: int, row: Prediction, thumb: tuple[bytes, int, int] | None, error: str) -> str:
    e = html.escape
    state = "failed" if error else "ok"
    values = {f.column: _data_value(row.values.get(f.column)) for f in SHOWN if f.kind in (NUMBER, FLAG)}
    labels = row.values.get("labels") or []
    searched = " ".join((row.caption, row.path, error, *(name for name, _ in labels))).lower()
    parts = [f'<figure class="card{" failed" if error else ""}" data-i="{index}" data-state="{state}" '
             + "".join(f'data-v-{column}="{value}" ' for column, value in values.items())
             + f'data-path="{e(row.path)}" data-text="{e(searched)}">']
    if thumb is not None:
        data, height, width = thumb
        parts.append(f'<div class="thumb"><img src="data:image/jpeg;base64,{base64.b64encode(data).decode()}" '
                     f'width="{width}" height="{height}" alt="{e(row.caption)}"></div>')
    else:
        parts.append('<div class="thumb">NO IMAGE</div>' if error else '<div class="thumb"></div>')
    parts.append("<figcaption>")
    if row.caption:
        parts.append(f'<div class="caption">{e(row.caption)}</div>')
    for f in SHOWN:
        value = row.values.get(f.column)
        if f.kind == LABELS and value:
            parts.append(f'<div class="labels" title="{e(f.title)}">{e(_labels_text(value))}</div>')
        elif f.kind == FLAG and value is False:
            parts.append(f'<span class="flag" title="{e(f.title)}: no">not {e(f.column.replace("_", " "))}</span>')
    if error:
        parts.append(f'<div class="error">{e(error)}</div>')
    numbers = "".join(f'<span class="score" title="{e(f.title)}: {row.values[f.column]!r}">'
                      f'{e(f.column)} {row.values[f.column]:.2f}</span>'
                      for f in SHOWN if f.kind == NUMBER and row.values.get(f.column) is not None)
    parts.append(f'<div class="meta"><span class="path">{e(row.path)}</span><span class="numbers">{numbers}</span></div>')
    parts.append("</figcaption></figure>")
    return "".join(parts)


def _controls(rows: list[Prediction]) -> str:
    """The filter and sort controls, with one sort, minimum or filter per field that some row has."""
    present = [f for f in SHOWN if any(row.values.get(f.column) is not None for row in rows)]
    numbers = [f for f in present if f.kind == NUMBER]
    flags = "".join(f'<option value="not:{f.column}">Not {f.column.replace("_", " ")} only</option>'
                    for f in present if f.kind == FLAG)
    sorts = "".join(f'<option value="best:{f.column}">Best {f.column} first</option>'
                    f'<option value="worst:{f.column}">Worst {f.column} first</option>' for f in numbers)
    minimums = "".join(f'<input class="min" type="number" step="any" data-field="{f.column}" '
                       f'placeholder="min {f.column}" aria-label="Minimum {f.column}" title="{html.escape(f.title)}">'
                       for f in numbers)
    return ('<div class="controls">'
            '<input id="q" type="search" placeholder="Filter captions, labels, paths…" aria-label="Filter">'
            f'{minimums}<select id="show" aria-label="Show"><option value="all">All</option>'
            f'<option value="ok">OK only</option><option value="failed">Failed only</option>{flags}</select>'
            '<select id="order" aria-label="Sort"><option value="file">File order</option>'
            f'{sorts}<option value="path">By path</option></select></div>')


def render_html(rows: list[Prediction], thumbs: dict[int, tuple[bytes, int, int]], errors: dict[int, str],
                *, title: str, source: str, summary: dict) -> str:
    """The whole page as a string; `thumbs` and `errors` are keyed by row index."""
    e = html.escape
    mean = summary["mean_score"]
    stats = [f'<span><b>{summary["rows"]}</b> images</span>', f'<span><b>{summary["ok"]}</b> ok</span>',
             f'<span class="{"bad" if summary["failed"] else ""}"><b>{summary["failed"]}</b> failed</span>',
             f'<span title="mean log-probability per token, over ok images">mean score '
             f'<b>{"–" if mean is None else f"{mean:.2f}"}</b></span>',
             '<span id="shown"></span>']
    controls = _controls(rows)
    cards = [_card(i, row, thumbs.get(i), errors.get(i, "")) for i, row in enumerate(rows)]
    body = f'<main id="grid">{"".join(cards)}</main>' if rows else (
        '<main id="grid"></main><p class="empty">No predictions in this file.</p>')
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f'<header><h1>{e(title)}</h1><div class="stats">{"".join(stats)}</div>{controls}',
        f'<div class="source">{e(source)}</div></header>',
        body,
        f"<script>{_JS}</script>",
        "</body></html>",
        "",
    ])


def _check_images_dir(predictions: Path, images_dir: Path, wanted: list[str], files: list[Path]) -> None:
    """A wrong --images is one error, not a page of broken cards: none of the files is there, or most
    are missing (more than half: a folder that lost a few images since captioning still makes a page)."""
    missing = [p for p, f in zip(wanted, files) if not os.path.lexists(f)]
    if not wanted or 2 * len(missing) <= len(wanted):
        return
    example = f"e.g. {excerpt(missing[0], 60)}"
    if len(missing) == len(wanted):
        raise TfcapError(f"none of the {len(wanted)} images of {predictions} is under {images_dir} ({example}): "
                         "--images must be the folder that was captioned")
    raise TfcapError(f"{len(missing)} of the {len(wanted)} images of {predictions} are not under {images_dir} "
                     f"({example}): --images must be the folder that was captioned")


def write_gallery(predictions: Path, images_dir: Path, out_html: Path | Output, *, thumb_size: int = 256,
                  title: str | None = None, overwrite: bool = False, progress: bool = False,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Write a self-contained HTML gallery of caption-dir output.

    Args:
      predictions: caption-dir CSV or JSONL (columns path, caption, error and any of `rows.FIELDS`), or a
        Beam OUT folder.
      images_dir: the folder the `path` column is relative to; an error if most of the files are not there.
      out_html: the page to write (whole, under a scratch name renamed into place; an existing one
        only with `overwrite`), or an `outputs.Output` the caller claimed for the whole run.
      thumb_size: longest side of a thumbnail, in pixels.
      title: page title; defaults to one naming the predictions file.
      progress: show a thumbnailing progress bar on stderr.
      max_pixels: images declaring more pixels than this are shown as failed, not decoded.
    Returns:
      {"rows", "ok", "failed", "unreadable", "mean_score", "out"}: `failed` counts rows with a
      prediction error plus `unreadable` images that could not be thumbnailed now.
    """
    predictions, images_dir = Path(predictions), Path(images_dir)
    if thumb_size < 16:
        raise TfcapError(f"thumbnail size must be at least 16 pixels, got {thumb_size}")
    with claimed(out_html, overwrite=overwrite, inputs={"predictions file": predictions,
                                                        "images folder": images_dir}) as output:
        summary, page = _page(predictions, images_dir, output.path, thumb_size, title, progress, max_pixels)
        output.write_text(page)
    return summary


def _page(predictions: Path, images_dir: Path, out_html: Path, thumb_size: int, title: str | None, progress: bool,
          max_pixels: int) -> tuple[dict, str]:
    """`write_gallery`'s summary and page."""
    if not images_dir.is_dir():
        raise TfcapError(f"images folder {images_dir} does not exist")
    rows = read_predictions(predictions)

    # Errored rows get a placeholder, not a decode attempt; each file is thumbnailed once.
    wanted = sorted({row.path for row in rows if not row.error})
    files = [names.path(images_dir, p) for p in wanted]
    _check_images_dir(predictions, images_dir, wanted, files)
    made = make_thumbnails(files, thumb_size, max_pixels, progress)
    by_path = {wanted[k]: thumb for k, thumb in made.items()}
    reasons = {p: _unreadable_reason(f, max_pixels) for p, f in zip(wanted, files) if p not in by_path}
    thumbs = {i: by_path[row.path] for i, row in enumerate(rows) if not row.error and row.path in by_path}
    errors = {i: row.error or f"cannot show image: {reasons[row.path]}"
              for i, row in enumerate(rows) if i not in thumbs}

    scores = [row.score for i, row in enumerate(rows) if i not in errors and row.score is not None]
    summary = {
        "rows": len(rows),
        "ok": len(rows) - len(errors),
        "failed": len(errors),
        "unreadable": sum(1 for i, row in enumerate(rows) if i in errors and not row.error),
        "mean_score": sum(scores) / len(scores) if scores else None,
        "out": str(out_html),
    }
    page = render_html(rows, thumbs, errors, title=title or f"Captions: {predictions.name}",
                       source=f"predictions {predictions} · images {images_dir}", summary=summary)
    return summary, page
