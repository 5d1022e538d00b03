"""
Privox: a private voice exchange (speech-to-text and text-to-speech served by
machines that volunteers lend).
"""

__version__ = "0.1.0"
