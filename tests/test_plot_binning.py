"""The plot at scale: a trace too long to draw event by event is binned (each pixel column
the min and max of its entries), the page's size does not grow with the trace, and each
bin links to a panel naming the call sites live at its peak (no script: CSS :target)."""
import pickle
import re

import numpy as np
import pytest

from mtia_alloc.tools.synth_snapshot import synth_snapshot
from mtia_alloc.viz.load import load, normalize
from mtia_alloc.viz.model import Snapshot


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    out = {}
    for n in (8000, 40000):
        p = d / f"s{n}.pickle"
        p.write_bytes(pickle.dumps(synth_snapshot(n, seed=n, n_stacks=50, depth=10), protocol=4))
        out[n] = p
    return out


def _plot(path, tmp_path, columnar):
    s = Snapshot(normalize(load(path, columnar=columnar)))
    html_path = tmp_path / f"{path.stem}-{columnar}.html"
    s.plot(html_path)
    return s, html_path.read_text()


def test_binned_page_stays_small_and_names_sites(paths, tmp_path):
    _, small = _plot(paths[8000], tmp_path, True)
    s, big = _plot(paths[40000], tmp_path, True)
    assert len(big) < 3_000_000
    assert len(big) < 1.5 * len(small)  # five times the entries, about the same page
    assert "<script" not in big
    panels = re.findall(r'<div class="bin-panel" id="(d0-bin-\d+)">', big)
    assert len(panels) > 100
    assert all(f'href="#{p}"' in big for p in panels)
    assert ".bin-panel:target" in big
    # the panel of the bin holding the peak names the sites live at that entry
    curves = s.memory_over_time(0)
    peak = int(np.argmax(curves["allocated"]))
    tops = s.top_sites_at(0, [peak])[0]
    assert tops and sum(v for _, v in tops) <= curves["allocated"][peak]
    site = tops[0][0]
    assert site.startswith("layer") or "layer" in site
    assert any(site in chunk for chunk in re.findall(r'<div class="bin-panel".*?</div>', big))


def test_top_sites_add_up_to_the_live_bytes(paths):
    s = Snapshot(normalize(load(paths[8000], columnar=True)))
    curves = s.memory_over_time(0)
    points = [0, 100, 4000, len(curves["allocated"]) - 1]
    for p, tops in zip(points, s.top_sites_at(0, points, top=10_000)):
        assert sum(v for _, v in tops) == curves["allocated"][p]


def test_same_page_from_either_reader(paths, tmp_path):
    _, a = _plot(paths[8000], tmp_path, True)
    _, b = _plot(paths[8000], tmp_path, False)
    strip = re.compile(r"Memory snapshot[^<]*")
    assert strip.sub("", a) == strip.sub("", b)
