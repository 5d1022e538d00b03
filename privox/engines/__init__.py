"""
Speech engines: one module per engine behind the interfaces in L{base}.
"""
