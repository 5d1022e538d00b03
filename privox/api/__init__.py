"""
The HTTP API (C{twistd privox-api}): what users and apps call.
"""
