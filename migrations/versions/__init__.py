"""Alembic migration versions of the SQL store."""
