"""
The docs render: README.rst and everything under docs/ and bench/ is valid
reStructuredText (a broken table silently vanishes on a package page).
"""

from __future__ import annotations

import docutils.core
import docutils.utils
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

ROOT = FilePath(__file__).parent().parent()


def documents() -> list[FilePath]:
    found = [ROOT.child("README.rst")]
    for folder in ("docs", "bench"):
        found += sorted(ROOT.child(folder).globChildren("*.rst"))
    return found


class RestructuredTextTests(SynchronousTestCase):
    def test_allDocumentsParse(self) -> None:
        checked = []
        for path in documents():
            try:
                docutils.core.publish_doctree(
                    path.getContent().decode("utf-8"),
                    source_path=path.path,
                    settings_overrides={"report_level": 5, "halt_level": 2},
                )
            except docutils.utils.SystemMessage as e:
                self.fail(f"{path.basename()}: {e}")
            checked.append(path.basename())
        self.assertIn("protocol.rst", checked)
        self.assertIn("README.rst", checked)
