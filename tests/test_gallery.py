"""tfcap.gallery: predictions in, one self-contained HTML page out, checked as text and in a real browser."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tfcap.errors import TfcapError
from tfcap.gallery import read_predictions, write_gallery

RED, BLUE = (220, 30, 30), (30, 60, 220)
EVIL = 'a cat <script>alert("x")</script> & "friends"'

# (path, caption, score, error); a prediction error, and three files that fail only at gallery time.
ROWS = [
    ("red.png", "a red square on a white wall", -0.75, ""),
    ("photo.jpg", "a big blue photo of the sea", -1.25, ""),
    ("sub/alpha.png", EVIL, -2.0, ""),
    ("sub/small.jpg", "a tiny green picture", -1.0, ""),
    ("broken.jpg", "a photo that was truncated after captioning", -1.5, ""),
    ("notes.png", "text pretending to be a png", -3.0, ""),
    ("gone.jpg", "a file deleted since captioning", -0.5, ""),
    ("bad.gif", "", None, "not an image"),
]
OK_CAPTIONS = [r[1] for r in ROWS[:4]]


def _image(size, color, mode="RGB", fmt="PNG") -> bytes:
    """A solid `color` picture with a white frame; saturated colors are easy to find in a screenshot."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle((0, 0, size[0] - 1, size[1] - 1), outline=(255, 255, 255), width=2)
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(128)  # half transparent: composited over white
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _write_predictions(path: Path, rows=ROWS, fmt: str = "csv") -> Path:
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "caption", "score", "error"])
            writer.writerows([(p, c, "" if s is None else s, e) for p, c, s, e in rows])
    else:
        path.write_text("".join(json.dumps({"path": p, "caption": c, "score": s, "error": e}) + "\n"
                                for p, c, s, e in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    (images / "red.png").write_bytes(_image((300, 200), RED))
    (images / "photo.jpg").write_bytes(_image((1200, 900), BLUE, fmt="JPEG"))
    (images / "sub/alpha.png").write_bytes(_image((120, 90), (0, 160, 0), mode="RGBA"))
    (images / "sub/small.jpg").write_bytes(_image((40, 32), (0, 200, 0), fmt="JPEG"))
    (images / "broken.jpg").write_bytes(_image((400, 300), BLUE, fmt="JPEG")[:600])
    (images / "notes.png").write_text("not really an image")
    (images / "bad.gif").write_bytes(b"GIF89a garbage")
    _write_predictions(root / "out.csv")
    return root


@pytest.fixture(scope="module")
def page(data) -> tuple[Path, dict]:
    out = data / "gallery.html"
    summary = write_gallery(data / "out.csv", data / "images", out, title="Test <gallery>")
    return out, summary


def _thumbnails(text: str) -> list:
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(b)))
            for b in re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', text)]


def test_summary_counts_failures_and_mean_score(page):
    _, summary = page
    assert summary["rows"] == 8 and summary["ok"] == 4 and summary["failed"] == 4
    assert summary["unreadable"] == 3
    assert summary["mean_score"] == pytest.approx(np.mean([-0.75, -1.25, -2.0, -1.0]))


def test_page_is_self_contained_and_escaped(page):
    out, _ = page
    text = out.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text
    assert not re.search(r"""\b(src|href)\s*=\s*(?!["']?data:)""", text)  # only data: URIs
    thumbs = _thumbnails(text)
    assert len(thumbs) == 4
    assert all(max(t.size) <= 256 for t in thumbs)
    assert (256, 192) in [t.size for t in thumbs]  # the 1200x900 photo, aspect ratio kept
    # Untrusted text never becomes markup; the only <script> is the page's own.
    assert text.count("<script") == 1 and "alert(" not in text.split("<script")[1].split("</script>")[0]
    assert html.escape(EVIL) in text
    assert "<title>Test &lt;gallery&gt;</title>" in text
    assert not list(out.parent.glob(".*tmp*"))  # written through a temporary name, nothing left over


def test_failures_are_marked_with_their_reason(page):
    text = page[0].read_text()
    failed = re.findall(r'<figure class="card failed".*?</figure>', text)
    assert len(failed) == 4
    by_path = {re.search(r'data-path="([^"]*)"', f).group(1): f for f in failed}
    assert set(by_path) == {"broken.jpg", "notes.png", "gone.jpg", "bad.gif"}
    assert "truncated or corrupt" in by_path["broken.jpg"]
    assert "not an image" in by_path["notes.png"] and "missing" in by_path["gone.jpg"]
    assert '<div class="error">not an image</div>' in by_path["bad.gif"]
    assert "function_node" not in text
    assert all("<img" not in f for f in failed)


def test_rgba_is_composited_over_white(page):
    thumbs = _thumbnails(page[0].read_text())
    alpha = next(t for t in thumbs if t.size == (120, 90))
    r, g, b = np.asarray(alpha.convert("RGB"))[45, 60]
    assert abs(int(r) - 127) < 12 and abs(int(g) - 207) < 12 and abs(int(b) - 127) < 12


def test_jsonl_by_extension_and_by_content(data, tmp_path):
    for name in ("out.jsonl", "predictions"):  # the second has no extension: sniffed
        source = _write_predictions(tmp_path / name, fmt="jsonl")
        assert [(r.path, r.caption, r.score, r.error) for r in read_predictions(source)] == ROWS
    summary = write_gallery(tmp_path / "out.jsonl", data / "images", tmp_path / "g.html", thumb_size=64)
    assert (summary["ok"], summary["failed"]) == (4, 4)
    assert all(max(t.size) <= 64 for t in _thumbnails((tmp_path / "g.html").read_text()))


def test_refuses_to_overwrite(data, tmp_path):
    out = tmp_path / "g.html"
    out.write_text("keep me")
    with pytest.raises(TfcapError, match="already exists"):
        write_gallery(data / "out.csv", data / "images", out)
    assert out.read_text() == "keep me"
    write_gallery(data / "out.csv", data / "images", out, overwrite=True)
    assert out.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("content, name, message", [
    (None, "absent.csv", "does not exist"),
    ("image,caption\na.jpg,hello\n", "p.csv", "missing column"),
    ('{"path": "a.jpg", "caption": "hi"}\n{oops\n', "p.jsonl", r"p.jsonl:2: not valid JSON"),
    ('["a.jpg"]\n', "p.jsonl", "JSON object"),
    ("path,caption,score,error\na.jpg,hi,high,\n", "p.csv", "not a number"),
])
def test_invalid_predictions_are_one_line_errors(data, tmp_path, content, name, message):
    source = tmp_path / name
    if content is not None:
        source.write_text(content)
    with pytest.raises(TfcapError, match=message) as info:
        write_gallery(source, data / "images", tmp_path / "g.html")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "g.html").exists()


def test_empty_predictions_make_an_empty_page(data, tmp_path):
    summary = write_gallery(_write_predictions(tmp_path / "p.csv", rows=[]), data / "images", tmp_path / "g.html")
    assert summary["rows"] == 0 and summary["mean_score"] is None
    assert "No predictions" in (tmp_path / "g.html").read_text()


# --- A real browser: the page renders offline, its script runs, captions and thumbnails show. ---

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                    "(apt-get install -y chromium) - cannot render the gallery")


def _chromium(page: Path, profile: Path, *args: str) -> str:
    """Run headless chromium on a local page with no network side channels; return its stdout."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1200,900", *args, page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _cards(dom: str) -> list[tuple[str, bool, str]]:
    """(data-path, hidden?, caption text) of every card in a dumped DOM, in document order."""
    cards = []
    for match in re.finditer(r"<figure ([^>]*)>(.*?)</figure>", dom, re.S):
        attrs, body = match.groups()
        caption = re.search(r'<div class="caption">(.*?)</div>', body, re.S)
        cards.append((html.unescape(re.search(r'data-path="([^"]*)"', attrs).group(1)), " hidden" in attrs,
                      html.unescape(caption.group(1)) if caption else ""))
    return cards


@needs_chromium
def test_browser_renders_captions_and_thumbnails(page, tmp_path):
    from PIL import Image

    out, _ = page
    dom = _chromium(out, tmp_path / "profile1", "--dump-dom")
    cards = _cards(dom)
    assert [c[0] for c in cards] == [r[0] for r in ROWS]
    assert not any(hidden for _, hidden, _ in cards)
    assert [c[2] for c in cards[:4]] == OK_CAPTIONS
    assert "8 shown" in dom  # the inline script ran (offline, no errors before its last line)

    shot = tmp_path / "shot.png"
    _chromium(out, tmp_path / "profile2", f"--screenshot={shot}")
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (900, 1200)
    assert image.std() > 30  # not a blank page

    def pixels_near(color):
        return int((np.abs(image - np.array(color)).sum(axis=-1) < 60).sum())

    # Each thumbnail box is ~216x162 px at this width; the red and blue pictures fill theirs.
    assert pixels_near(RED) > 5000 and pixels_near(BLUE) > 5000
    dark_text = (image.sum(axis=-1) < 200).sum()
    assert dark_text > 2000  # header and captions in dark ink


def _driven(page: Path, tmp_path: Path, script: str) -> str:
    """The DOM of a copy of `page` after `script` drove its controls, as a user would (its top-level names
    must not be the page's own: one global scope)."""
    copy = tmp_path / "driven.html"
    copy.write_text(page.read_text().replace("</body>", f"<script>{script}</script></body>"))
    return _chromium(copy, tmp_path / "profile", "--dump-dom")


@needs_chromium
def test_browser_filter_and_sort_controls(page, tmp_path):
    out, _ = page
    dom = _driven(out, tmp_path, "const s=document.getElementById('show'),o=document.getElementById('order');"
                  "s.value='failed';s.dispatchEvent(new Event('change'));"
                  "o.value='best:score';o.dispatchEvent(new Event('change'));")
    cards = _cards(dom)
    assert [path for path, _, _ in cards] == ["gone.jpg", "red.png", "sub/small.jpg", "photo.jpg", "broken.jpg",
                                              "sub/alpha.png", "notes.png", "bad.gif"]  # unscored last
    assert [path for path, hidden, _ in cards if not hidden] == ["gone.jpg", "broken.jpg", "notes.png", "bad.gif"]
    assert "4 shown" in dom


# --- The rows' other fields: labels, and a minimum per number -----------------------------------------------

LABELS = {"red.png": "tabby 0.62; tiger cat 0.21", "photo.jpg": "seashore 0.80; lakeside 0.10",
          "sub/small.jpg": "tiger cat 0.50; lynx 0.20"}


@pytest.fixture(scope="module")
def labelled_page(data) -> Path:
    predictions = data / "labelled.csv"
    with open(predictions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption", "score", "labels", "error"])
        writer.writerows([(p, c, "" if s is None else s, LABELS.get(p, ""), e) for p, c, s, e in ROWS])
    out = data / "labelled.html"
    write_gallery(predictions, data / "images", out)
    return out


def test_labels_are_shown_and_searched_and_numbers_get_a_sort_and_a_minimum(data, labelled_page, tmp_path):
    text = labelled_page.read_text()
    assert '<div class="labels" title="ImageNet labels">tabby 62% · tiger cat 21%</div>' in text
    assert text.count('<div class="labels"') == 3
    red = re.search(r'<figure [^>]*data-path="red.png"[^>]*>', text).group(0)
    assert 'data-v-score="-0.75"' in red and "tiger cat" in re.search(r'data-text="([^"]*)"', red).group(1)
    assert '<option value="best:score">' in text and '<input class="min" type="number" step="any" ' \
        'data-field="score"' in text
    write_gallery(data / "out.csv", data / "images", tmp_path / "plain.html")  # written before labels existed
    plain = (tmp_path / "plain.html").read_text()
    assert '<div class="labels"' not in plain and '<option value="best:score">' in plain


@needs_chromium
def test_browser_minimum_score_and_label_search(labelled_page, tmp_path):
    dom = _driven(labelled_page, tmp_path, "const low=document.querySelector('input.min[data-field=score]'),"
                  "text=document.getElementById('q');low.value='-1.1';low.dispatchEvent(new Event('input'));"
                  "text.value='tiger';text.dispatchEvent(new Event('input'));")
    # score >= -1.1 and "tiger" among the labels: red.png (-0.75) and sub/small.jpg (-1.0); photo.jpg is
    # below the minimum and has no tiger, gone.jpg (-0.5) has no tiger.
    assert [path for path, hidden, _ in _cards(dom) if not hidden] == ["red.png", "sub/small.jpg"]
    assert "2 shown" in dom
