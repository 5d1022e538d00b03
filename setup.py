from setuptools import find_packages, setup

setup(
    name="privox",
    version="0.1.0",
    description="Privox: a private voice exchange (anonymous STT and TTS on volunteers' machines)",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    # twisted/plugins is a namespace shared with Twisted itself: it has no
    # __init__.py of ours and must be listed by hand.
    packages=find_packages(include=["privox", "privox.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["privox_plugins.py"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "automat>=24.8",
        "treq>=24.9",
    ],
    extras_require={
        "test": ["hypothesis>=6.100"],
    },
)
