"""Alembic environment and versions for the SQL store (arrives with the SQL store issue)."""
