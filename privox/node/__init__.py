"""
The producer node: dials out to farms and runs jobs on local engines.
"""
