"""
The API's HTML pages: the try-it page at C{GET /} (C{static/index.html}
and its C{static/page.js}), filled in with this API's URL, voices,
languages and whether a key is needed; and C{/status} for a browser. Both
share one style sheet (C{static/style.css}).
"""

from __future__ import annotations

import functools
import html
from importlib import resources
from typing import Any

from privox.api.models import ModelTable

#: Languages offered in the try-it page's picker when a quality maps to a
#: multilingual model (besides English and the table's pinned languages).
COMMON_LANGUAGES = ("de", "es", "fr", "it", "ja", "ko", "nl", "pt", "zh")


@functools.cache
def static(name: str) -> str:
    """
    A file of the pages, from C{privox/api/static}.
    """
    return (resources.files("privox.api") / "static" / name).read_text("utf-8")


def _options(values: list[str], selected: str | None = None) -> str:
    e = html.escape
    return "".join(
        f"<option{' selected' if v == selected else ''}>{e(v)}</option>" for v in values
    )


def languages(models: ModelTable) -> list[str]:
    """
    What the picker offers: English, the pinned languages and, where some
    quality is served by a model other than its English one (a multilingual
    model), the common ones.
    """
    offered = [models.defaultLanguage, *sorted(models.sttLanguages)]
    if any(anyLanguage != english for anyLanguage, english in models.stt.values()):
        offered += COMMON_LANGUAGES
    return list(dict.fromkeys(offered))


def frontPage(base: str, models: ModelTable, keyExample: str | None) -> str:
    """
    The try-it page and how to call the API, with C{base} in its curl
    examples and C{keyExample} as their key (L{None}: this API needs none).
    """
    e = html.escape
    if keyExample is None:
        note = "No key is needed here: requests without one share an hourly allowance."
        form = header = ""
        placeholder = "optional: pvx_..."
    else:
        note = (
            "Any key works here, e.g. <code>demo</code>."
            if keyExample == "demo"
            else "Requests need a key of this exchange."
        )
        form = f" -F key={keyExample}"
        header = f" \\\n  -H 'Authorization: Bearer {keyExample}'"
        placeholder = "pvx_..." if keyExample != "demo" else "demo"
    url = e(base)
    values = {
        "{key_note}": note,
        "{key_placeholder}": e(placeholder),
        "{voice_options}": _options(list(models.voices), models.defaultVoice),
        "{language_options}": _options(languages(models), models.defaultLanguage),
        "{stt_example}": e(
            f"curl -s {base}/stt{form} -F quality=fast -F language=en \\\n  -F file=@hello.wav"
        ),
        "{tts_example}": e(
            f"curl -s {base}/tts{form.replace('-F', '-d')} -d voice={models.defaultVoice} \\\n"
            "  -d 'text=Hello from Privox.' -o hello.wav"
        ),
        "{openai_examples}": e(
            f"curl -s {base}/v1/audio/transcriptions{header} \\\n"
            "  -F model=whisper-1 -F file=@hello.wav\n"
            f"curl -s {base}/v1/audio/speech{header} \\\n"
            "  -H 'Content-Type: application/json' \\\n"
            """  -d '{"model": "tts-1", "voice": "alloy", "input": "Hello."}' -o hello.mp3\n"""
            f"curl -s {base}/v1/models"
        ),
        "{url}": url,
        "{style}": static("style.css"),
    }
    page = static("index.html")
    for placeholder, value in values.items():
        page = page.replace(placeholder, value)
    return page


def statusHtml(status: dict[str, Any]) -> str:
    """
    The API's C{/status} for a browser: one table row per farm, service and
    model, and the models no producer serves.
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
                "<td colspan=6>no load figures</td></tr>"
            )
            continue
        for service, figures in sorted(load.get("services", {}).items()):
            models = figures.get("models") or {
                "-": {"connected": 0, "idle": 0, "busy": 0, "sealing": 0}
            }
            for model, counts in sorted(models.items()):
                rows.append(
                    f"<tr><td>{name}</td><td>{up}</td><td>{e(service)}</td><td>{e(model)}</td>"
                    f"<td>{counts['connected']}</td><td>{counts['idle']}</td>"
                    f"<td>{counts['busy']}</td><td>{counts.get('sealing', 0)}</td>"
                    f"<td>{figures.get('queue', 0)}</td></tr>"
                )
    missing = [
        f"<li>{e(service)}: {e(', '.join(models))}</li>"
        for service, models in sorted((status.get("unserved") or {}).items())
        if models
    ]
    unserved = (
        "<p class=error>No producer serves these models: requests for them get 503"
        f" until a node serving them joins.</p><ul>{''.join(missing)}</ul>"
        if missing
        else ""
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        "<title>Privox status</title><link rel=icon href='data:,'>"
        f"<style>{static('style.css')}</style></head><body>"
        "<p><a href='/'>&larr; Privox</a></p><h1>Status</h1>"
        f"{unserved}<table>"
        "<tr><th>farm</th><th>state</th><th>service</th><th>model</th><th>producers</th>"
        "<th>idle</th><th>busy</th><th>sealing</th><th>queue</th></tr>"
        + "".join(rows)
        + "</table><p>Clients that do not ask for HTML get this as JSON"
        " (<code>privox status</code> prints it).</p></body></html>"
    )
