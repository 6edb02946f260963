"""One virtual environment per system under ``benchmarks/.venvs/``, installed from PyPI.

Why separate environments: the peers pin different versions of shared dependencies
(SQLAlchemy, pydantic, ...), and each system must be measured with what ``pip install`` gives
its users, not with a compromise resolution.  An environment is reused when its
``.installed`` marker holds the same requirement list (so a second run does not touch the
network); a changed list re-runs ``pip install`` into it.  Standard library only: this runs
under the bare ``python3`` of a fresh clone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO = BENCH_DIR.parent
VENVS = BENCH_DIR / ".venvs"


@dataclass(frozen=True)
class System:
    """A system under test: its venv, what to install there, and its driver script."""

    name: str
    requirements: tuple[str, ...]
    distributions: tuple[str, ...]
    """Installed distributions whose versions the report records."""
    linear_stores: tuple[str, ...] = ("memory", "sqlite")
    driver: str = ""
    python: Path = field(default=Path(), compare=False)
    """Interpreter to run the driver with; empty until ``ensure`` (tests point it elsewhere)."""
    base: str = ""
    """A variant of another system: its venv and driver, run with ``extra`` arguments."""
    extra: tuple[str, ...] = ()

    @property
    def venv(self) -> Path:
        return VENVS / (self.base or self.name)

    @property
    def script(self) -> Path:
        name = self.driver or f"drive_{self.base or self.name}.py"
        return Path(__file__).resolve().parent / name


WAKEPOINT = System(
    "wakepoint", ("-e", str(REPO)),
    ("wakepoint", "msgspec", "pynacl", "sqlalchemy", "apscheduler", "structlog"),
    linear_stores=("memory", "sqlite", "jsonl"),
)
WAKEPOINT_SYNC = System(
    "wakepoint-sync", WAKEPOINT.requirements, WAKEPOINT.distributions,
    linear_stores=("sqlite", "jsonl"), base="wakepoint", extra=("--durability", "sync"),
)
"""wakepoint with an fsync per commit: what DBOS's and LangGraph's SQLite defaults pay."""
PEERS = (
    System("abstractruntime", ("abstractruntime",), ("abstractruntime", "abstractcore")),
    System("dbos", ("dbos",), ("dbos", "sqlalchemy")),  # its driver answers "no memory mode"
    System("langgraph", ("langgraph", "langgraph-checkpoint-sqlite"),
           ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite")),
    # Not a default, so not what the issue compares against, but the question every reader
    # of the crash table asks: LangGraph with its checkpoints written before the next step.
    System("langgraph-sync", ("langgraph", "langgraph-checkpoint-sqlite"),
           ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite"),
           base="langgraph", extra=("--durability", "sync")),
)
SYSTEMS = (WAKEPOINT, WAKEPOINT_SYNC, *PEERS)
PLOT = System("plot", ("matplotlib",), ("matplotlib",), driver="plot.py")


class SetupError(RuntimeError):
    """A virtual environment could not be created or installed."""


def interpreter(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def ensure(system: System, *, install: bool = True, log: object = print) -> System:
    """Create or reuse ``system``'s venv; return the system with ``python`` set."""
    python = interpreter(system.venv)
    marker = system.venv / ".installed"
    wanted = json.dumps(list(system.requirements))
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return _with_python(system, python)
    if not install:
        raise SetupError(f"{system.venv} is missing or stale and --no-install was given")
    if not python.exists():
        log(f"creating {system.venv}")  # type: ignore[operator]
        try:
            venv.EnvBuilder(with_pip=True).create(system.venv)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SetupError(
                f"cannot create {system.venv} ({exc}); on Debian: apt install python3-venv"
            ) from None
    log(f"pip install {' '.join(system.requirements)} into {system.venv}")  # type: ignore[operator]
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         *system.requirements],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise SetupError(f"pip install failed for {system.name}:\n{done.stderr[-3000:]}")
    marker.write_text(wanted)
    return _with_python(system, python)


def _with_python(system: System, python: Path) -> System:
    from dataclasses import replace
    return replace(system, python=python)


_PROBE = """
import json, sys, importlib.metadata as m
out = {"python": sys.version.split()[0]}
for name in sys.argv[1:]:
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
out["all"] = dict(sorted((d.metadata["Name"].lower(), d.version) for d in m.distributions()))
print(json.dumps(out))
"""


def versions(system: System) -> dict[str, Any]:
    """Python's version, the key distributions' versions, and under ``all`` every one."""
    done = subprocess.run(
        [str(system.python), "-c", _PROBE, *system.distributions],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def harness_python() -> str:
    return sys.version.split()[0]
