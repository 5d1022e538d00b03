"""
Accounts: keys, fair-use quotas and the contribution ledger.

L{privox.accounts.store} keeps keys (as hashes), usage, and the farms'
transaction records in SQLite or PostgreSQL; L{privox.accounts.quota} is the
arithmetic of the rolling window.
"""
