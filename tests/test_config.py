"""
Settings from TOML and the command line.
"""

from __future__ import annotations

import dataclasses
import tomllib

from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from privox.config import optionName, resolve
from privox.farm.settings import FarmSettings
from privox.farm.service import Options

ETC = FilePath(__file__).parent().parent().child("etc")


class ResolveTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        self.assertEqual(resolve(FarmSettings, {}, {}), FarmSettings())

    def test_precedence(self) -> None:
        settings = resolve(
            FarmSettings,
            {"queue-timeout": 2, "name": "from-file"},
            {"queue_timeout": "3.5", "name": None},
        )
        self.assertEqual((settings.queue_timeout, settings.name), (3.5, "from-file"))

    def test_unknownKey(self) -> None:
        e = self.assertRaises(usage.UsageError, resolve, FarmSettings, {"queue_timeout": 2}, {}, "farm.toml")
        self.assertIn("unknown setting(s) in farm.toml: queue_timeout", str(e))

    def test_wrongTypes(self) -> None:
        for fromFile in ({"max-frame": "big"}, {"max-frame": 1.5}, {"name": 3}, {"queue-timeout": True}):
            self.assertRaises(usage.UsageError, resolve, FarmSettings, fromFile, {})
        e = self.assertRaises(usage.UsageError, resolve, FarmSettings, {}, {"max_frame": "x"})
        self.assertIn("max-frame on the command line: expected int", str(e))


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> FarmSettings:
        options = Options()
        options.parseOptions(list(argv))
        return options.settings

    def test_commandLine(self) -> None:
        settings = self.parse("--stt-listen", "tcp:9000", "--tts-listen", "none", "--max-frame", "2048")
        self.assertEqual((settings.stt_listen, settings.tts_listen, settings.max_frame), ("tcp:9000", "none", 2048))

    def test_configFile(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b'name = "alpha"\nqueue-timeout = 1\n')
        settings = self.parse("--config", path.path, "--name", "beta")
        self.assertEqual((settings.name, settings.queue_timeout), ("beta", 1.0))

    def test_missingConfigFile(self) -> None:
        e = self.assertRaises(usage.UsageError, self.parse, "--config", "/nonexistent/farm.toml")
        self.assertIn("cannot read config file /nonexistent/farm.toml", str(e))

    def test_badToml(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b"name = \n")
        self.assertRaises(usage.UsageError, self.parse, "--config", path.path)

    def test_nothingToServe(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--stt-listen", "none", "--tts-listen", "none")

    def test_nonPositiveTimes(self) -> None:
        self.assertRaises(usage.UsageError, self.parse, "--queue-timeout", "0")
        self.assertRaises(usage.UsageError, self.parse, "--max-frame", "0")

    def test_exampleConfigNamesEverySetting(self) -> None:
        """
        etc/privox-farm.toml is accepted and documents every setting, with the
        defaults.
        """
        path = ETC.child("privox-farm.toml")
        fromFile = tomllib.loads(path.getContent().decode())
        self.assertEqual(
            set(fromFile), {optionName(f.name) for f in dataclasses.fields(FarmSettings)}
        )
        self.assertEqual(self.parse("--config", path.path), FarmSettings())
