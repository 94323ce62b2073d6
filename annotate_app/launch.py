"""Start the annotation app for a workspace: ``streamlit run annotate_app/app.py`` as a child process.

The workspace travels in ``$PATHLOOP_WORKSPACE``; the app opens it with ``Workspace.open()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from store.db import check_schema, make_engine
from store.workspace import ENV_WORKSPACE, Workspace

APP = Path(__file__).with_name("app.py")


def command(workspace: Path | str, host: str = "127.0.0.1", port: int = 8501, headless: bool = True) -> list[str]:
    """The argv that serves the app; run it with ``environment(workspace)``."""
    del workspace  # passed through the environment, so the argv holds no paths a user typed
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true" if headless else "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--browser.gatherUsageStats", "false",
        # An unexpected error shows its type in the browser; message and traceback (which may
        # quote SQL and its parameters) go only to the server's console.
        "--client.showErrorDetails", "type",
        "--client.toolbarMode", "minimal",
    ]


def environment(workspace: Path | str) -> dict[str, str]:
    """The current environment with ``$PATHLOOP_WORKSPACE`` pointing at ``workspace``."""
    return {**os.environ, ENV_WORKSPACE: str(Path(workspace).expanduser().resolve())}


def serve(workspace: Path | str, host: str = "127.0.0.1", port: int = 8501, headless: bool = True) -> int:
    """Serve the app until it stops; return its exit code.

    The workspace and its database schema are checked first, so a wrong folder or an
    unmigrated database fails here with one line instead of inside the browser.
    """
    ws = Workspace.open(workspace)
    engine = make_engine(ws.database_url)
    try:
        check_schema(engine)
    finally:
        engine.dispose()
    proc = subprocess.Popen(command(ws.root, host, port, headless), env=environment(ws.root))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to both of us; give Streamlit the chance to shut down cleanly.
        proc.send_signal(signal.SIGINT)
        return proc.wait()
