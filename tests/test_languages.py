"""
L{privox.languages}: the names and codes clients and nodes give, to one
code.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from privox.languages import LANGUAGES, UnknownLanguage, languageCode


class LanguageCodeTests(SynchronousTestCase):
    def test_namesAndCodes(self) -> None:
        """
        The original clients' names, codes in any case and with spaces
        around them, and region tags all come out as the bare code.
        """
        cases = [
            ("English", "en"),
            ("ENGLISH", "en"),
            ("english", "en"),
            (" en ", "en"),
            ("en", "en"),
            ("EN", "en"),
            ("en-US", "en"),
            ("en_us", "en"),
            ("pt-BR", "pt"),
            ("zh-Hans", "zh"),
            ("French", "fr"),
            ("fr", "fr"),
            ("german", "de"),
            ("Korean", "ko"),
            ("Haitian Creole", "ht"),
            ("castilian", "es"),
            ("jv", "jw"),
        ]
        for given, code in cases:
            self.assertEqual(languageCode(given), code, given)

    def test_threeLetterCodes(self) -> None:
        for given, code in (("haw", "haw"), ("YUE", "yue"), ("yue-HK", "yue"), ("Cantonese", "yue")):
            self.assertEqual(languageCode(given), code, given)

    def test_everyWhisperLanguage(self) -> None:
        """
        All of Whisper's languages, each by its code and by its name.
        """
        self.assertEqual(len(LANGUAGES), 100)
        for code, name in LANGUAGES.items():
            self.assertEqual(languageCode(code), code)
            self.assertEqual(languageCode(name.title()), code)

    def test_any(self) -> None:
        self.assertEqual(languageCode("*"), "*")

    def test_unknown(self) -> None:
        """
        What is not one of Whisper's languages is refused, saying what is
        accepted; a region goes only with a code.
        """
        for given in ("Klingon", "xx", "", "  ", "english-us", "en-", "e", "en--us", "??"):
            e = self.assertRaises(UnknownLanguage, languageCode, given)
            self.assertIsInstance(e, ValueError, given)
        e = self.assertRaises(UnknownLanguage, languageCode, "Klingon")
        self.assertEqual(
            str(e),
            "unknown language 'Klingon': give a language name or code, "
            "such as English, en, German or de",
        )

    def test_longUnknownShortened(self) -> None:
        """
        An error message repeats only the start of a long value.
        """
        e = self.assertRaises(UnknownLanguage, languageCode, "x" * 10_000)
        self.assertLess(len(str(e)), 200)
        self.assertEqual(e.value, "x" * 10_000)
