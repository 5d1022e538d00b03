"""
docs/architecture.rst says in what order Privox's modules may depend on
each other; this holds the tree to it: every module is listed once, and
imports only modules listed before it (annotation-only imports under
C{if TYPE_CHECKING:} aside). README.rst's Layout names every module too.
"""

from __future__ import annotations

import ast
import re

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

ROOT = FilePath(__file__).parent().parent()


def modules() -> dict[str, FilePath]:
    """
    Every module of the package by dotted name (packages by their own).
    """
    found = {}
    for path in ROOT.child("privox").walk():
        if path.basename().endswith(".py") and "__pycache__" not in path.path:
            parts = path.segmentsFrom(ROOT)
            name = ".".join(parts)[: -len(".py")]
            found[name.removesuffix(".__init__")] = path
    return found


def runtimeImports(path: FilePath, known: dict[str, FilePath]) -> set[str]:
    """
    The Privox modules C{path} imports when it runs.
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("privox"):
                for alias in child.names:
                    submodule = f"{child.module}.{alias.name}"
                    found.add(submodule if submodule in known else str(child.module))
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("privox"))
            visit(child)

    visit(ast.parse(path.getContent()))
    return found


def documentedOrder() -> list[str]:
    """
    The modules in the order docs/architecture.rst lists them: the
    double-quoted names that open its list items.
    """
    text = ROOT.child("docs").child("architecture.rst").getContent().decode()
    section = text.split("What a module may use", 1)[1].split("Rules that go with it", 1)[0]
    order = []
    for item in re.findall(r"^- (.+?):", section, re.M | re.S):
        order += ["privox." + name for name in re.findall(r"``([a-z0-9_.]+)``", item)]
    return order


class DependencyDirectionTests(SynchronousTestCase):
    def test_everyModuleListedOnce(self) -> None:
        known = modules()
        order = documentedOrder()
        self.assertEqual(len(order), len(set(order)), "a module listed twice")
        packages = {name for name, path in known.items() if path.basename() == "__init__.py"}
        self.assertEqual(sorted(set(known) - packages - set(order)), [], "not in the document")
        self.assertEqual(sorted(set(order) - set(known)), [], "no such module")

    def test_importsPointBack(self) -> None:
        known = modules()
        order = documentedOrder()
        position = {name: i for i, name in enumerate(order)}
        wrong = []
        for name in order:
            for imported in sorted(runtimeImports(known[name], known)):
                if imported in position and position[imported] >= position[name]:
                    wrong.append(f"{name} imports {imported}, listed after it")
                elif imported not in position and imported not in known:
                    wrong.append(f"{name} imports {imported}, which does not exist")
        self.assertEqual(wrong, [])

    def test_readmeLayoutNamesEveryModule(self) -> None:
        readme = ROOT.child("README.rst").getContent().decode()
        layout = readme.split("\nLayout\n", 1)[1].split("\nDevelopment\n", 1)[0]
        missing = [
            path.path[len(ROOT.path) + 1 :]
            for name, path in sorted(modules().items())
            if path.basename() != "__init__.py" and path.path[len(ROOT.path) + 1 :] not in layout
        ]
        self.assertEqual(missing, [])
