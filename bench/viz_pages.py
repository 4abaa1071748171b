"""Time and size of the pass visualiser's pages for the built-in tiny Llama at 4 and 32 layers.

    python bench/viz_pages.py [--layers 4 32] [--screenshots docs/]

Per model: capture (torch.export, not visualiser work), the passes, and the visualiser's work
(text dumps, networkx snapshots, HTML pages, DOT, SVG where Graphviz is installed), and the
largest page. Writes ``results/viz_pages-cpu.json`` beside this file. ``--screenshots DIR``
also renders each model's segment_loop page in headless Chromium to
``DIR/viz-<N>-layers.png`` (1600x1000), the screenshots the README shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import segcompile as sc
from segcompile.files import atomic_write_text
from segcompile.frontend import capture
from segcompile.passes import PASSES, PassManager
from segcompile.testing.models import tiny_llama

SCREENSHOT_PAGE = "03-segment_loop.html"


def measure(layers: int, out: Path) -> dict:
    model = tiny_llama(num_layers=layers)
    start = time.perf_counter()
    gm = capture(model)
    capture_s = time.perf_counter() - start
    gm.meta["segcompile.config"] = sc.SegmentConfig(2048, sink_tokens=4, long_range=sc.HeadPlan.fraction(0.25))
    manager = PassManager(PASSES, dump_dir=out)
    start = time.perf_counter()
    step = manager(gm)
    total_s = time.perf_counter() - start
    pages = {p.name: p.stat().st_size for p in out.glob("*.html")}
    return {
        "layers": layers,
        "nodes_after_lower": len(step.graph.nodes),
        "capture_s": round(capture_s, 2),
        "passes_s": round(sum(manager.timings.values()), 2),
        "pages_s": round(manager.dump_seconds, 2),
        "passes_and_pages_s": round(total_s, 2),
        "largest_page": max(pages, key=pages.get),
        "largest_page_mb": round(max(pages.values()) / 1e6, 3),
        "svg": sorted(p.name for p in out.glob("*.svg")),
    }


def screenshot(page: Path, png: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("--screenshots needs chromium (Debian package `chromium`)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", f"--screenshot={png.resolve()}",
             "--window-size=1600,1000", page.resolve().as_uri()],
            check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=120,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for viz-<N>-layers.png")
    args = parser.parse_args()

    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(layers, Path(tmp))
            if args.screenshots is not None:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                screenshot(Path(tmp) / SCREENSHOT_PAGE, args.screenshots / f"viz-{layers}-layers.png")
        rows.append(row)

    print(f"{'layers':>6} {'nodes':>6} {'capture s':>10} {'passes s':>9} {'pages s':>8} {'largest page':>22} {'MB':>6}")
    for r in rows:
        print(f"{r['layers']:>6} {r['nodes_after_lower']:>6} {r['capture_s']:>10.2f} {r['passes_s']:>9.2f} "
              f"{r['pages_s']:>8.2f} {r['largest_page']:>22} {r['largest_page_mb']:>6.3f}")
    result = {
        "command": f"python bench/viz_pages.py --layers {' '.join(map(str, args.layers))}",
        "device": f"cpu, {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "graphviz": shutil.which("dot") is not None,
        "rows": rows,
    }
    path = Path(__file__).resolve().parent / "results" / "viz_pages-cpu.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
