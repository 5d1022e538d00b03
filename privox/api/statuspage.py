"""
The API's C{/status} as a small HTML page: one table row per farm, service
and model.
"""

from __future__ import annotations

import html
from typing import Any


def statusHtml(status: dict[str, Any]) -> str:
    """
    A small page of the API's C{/status}: one table row per farm, service
    and model.
    """
    e = html.escape
    rows = []
    for farm in status.get("farms", []):
        load = farm.get("load")
        up = "up" if farm.get("up") else "down"
        name = e(str(farm.get("name"))) + (" (fallback)" if farm.get("fallback") else "")
        if not load:
            rows.append(
                f"<tr><td>{name}</td><td>{up}</td><td>{e(', '.join(farm.get('services', [])))}</td>"
                "<td colspan=5>no load figures</td></tr>"
            )
            continue
        for service, figures in sorted(load.get("services", {}).items()):
            models = figures.get("models") or {"-": {"connected": 0, "idle": 0, "busy": 0}}
            for model, counts in sorted(models.items()):
                rows.append(
                    f"<tr><td>{name}</td><td>{up}</td><td>{e(service)}</td><td>{e(model)}</td>"
                    f"<td>{counts['connected']}</td><td>{counts['idle']}</td>"
                    f"<td>{counts['busy']}</td><td>{figures.get('queue', 0)}</td></tr>"
                )
    return (
        "<!DOCTYPE html><html><head><meta charset=utf-8><title>Privox status</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}</style>"
        "</head><body><h1>Privox status</h1><table>"
        "<tr><th>farm</th><th>state</th><th>service</th><th>model</th><th>producers</th>"
        "<th>idle</th><th>busy</th><th>queue</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
