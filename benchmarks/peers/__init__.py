"""wakepoint side by side with its peers (AbstractRuntime, DBOS, LangGraph): issue 6.

``python3 -m benchmarks`` (``benchmarks/__main__.py``) runs it.  ``venvs`` builds one virtual
environment per system from PyPI; ``harness`` runs the same workloads on each through its
driver (``drive_<system>.py``, executed by that system's interpreter, sharing
``driver_common``); ``report`` writes ``benchmarks/RESULTS.md``, the README's peer table and,
through ``plot.py`` in a plotting venv, ``benchmarks/steps.png``.
"""
