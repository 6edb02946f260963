"""wakepoint: a durable workflow kernel.

Runs pause for days, survive restarts, and leave a hash-chained, Ed25519-signed ledger.
"""
