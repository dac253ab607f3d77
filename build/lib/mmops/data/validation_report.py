"""The validation report on disk: validation.json, the GX result and a readable report.html."""

from __future__ import annotations

import html
import json
from pathlib import Path

from mmops.data.validate import ValidationReport

# What training reads back (mmops.training.validation_gate): `success` and `data_md5`.
REPORT_FILE = "validation.json"


def write_report(report: ValidationReport, out_dir: Path | str) -> Path:
    """Write validation.json, the GX result and a readable report.html; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out / "gx_result.json").write_text(json.dumps(report.gx_result, indent=2, default=str) + "\n")
    page = out / "report.html"
    page.write_text(render_html(report))
    return page


def render_html(report: ValidationReport) -> str:
    esc = html.escape
    rows = []
    for c in report.checks:
        status = "pass" if c.success else "FAIL"
        offenders = ", ".join(list(c.ids[:50]) + list(c.files[:50]))
        rows.append(
            f"<tr class='{status.lower()}'><td>{status}</td><td><code>{esc(c.name)}</code></td>"
            f"<td>{esc(c.description)}</td><td>{esc(c.detail)}</td><td>{esc(offenders)}</td></tr>"
        )
    stats = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(json.dumps(v))}</td></tr>" for k, v in report.stats.items()
    )
    verdict = (
        "fit to train on"
        if report.success
        else f"NOT fit to train on: {len(report.failed)} checks failed"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mmops validation: {esc(report.dataset)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}
tr.fail td{{background:#fde2e2}} tr.pass td:first-child{{color:#1a7f37}}</style></head>
<body><h1>Validation of <code>{esc(report.dataset)}</code></h1>
<p><b>{esc(verdict)}</b></p>
<h2>Checks</h2><table><tr><th>status</th><th>check</th><th>expects</th><th>detail</th>
<th>offending ids / files (first 50)</th></tr>{"".join(rows)}</table>
<h2>Statistics</h2><table>{stats}</table>
<p>Great Expectations result: <code>gx_result.json</code>;
full report: <code>validation.json</code>.</p>
</body></html>
"""
