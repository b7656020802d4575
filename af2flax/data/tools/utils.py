"""Running the search tools: argument lists (never a shell), timeouts, stderr in errors, temp dirs.

Debian's hhsuite and kalign install `/usr/bin/<tool>` as a dispatch script that starts the
SIMD-specific binary as a child process, so a timeout must kill the whole process group, not only
the script: every tool runs in its own session and the group is killed on timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

# Kept in error messages; hhblits can write megabytes of stderr.
MAX_STDERR_CHARS = 20_000


class ToolError(RuntimeError):
  """A search tool failed, timed out or is missing. Carries the command and the tool's stderr."""

  def __init__(self, tool: str, message: str, command: Sequence[str] = (), stderr: str = "",
               returncode: int | None = None):
    self.tool, self.command, self.stderr, self.returncode = tool, list(command), stderr, returncode
    text = f"{tool}: {message}"
    if command:
      text += f"\ncommand: {' '.join(command)}"
    if stderr:
      text += f"\nstderr:\n{stderr[-MAX_STDERR_CHARS:]}"
    super().__init__(text)


def find_binary(name_or_path: str) -> str:
  """Absolute path of an executable given by name (searched on PATH) or path."""
  found = shutil.which(name_or_path)
  if found is None:
    raise ToolError(os.path.basename(name_or_path),
                    f"executable {name_or_path!r} not found (install hmmer/hhsuite/kalign, or pass "
                    "its path)")
  return found


@contextlib.contextmanager
def temp_dir(base_dir: str | None = None) -> Iterator[str]:
  """A temporary directory removed on exit, also when the tool fails."""
  path = tempfile.mkdtemp(prefix="af2flax_", dir=base_dir)
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


def run(tool: str, command: Sequence[str], timeout_s: float | None = None,
        stdin: bytes | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
  """Runs `command` (a list, no shell); raises ToolError on a non-zero exit or a timeout."""
  command = [str(c) for c in command]
  log.info("Running %s", " ".join(command))
  start = time.perf_counter()
  try:
    process = subprocess.Popen(command, stdin=subprocess.PIPE if stdin is not None else None,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                               start_new_session=True)
  except OSError as e:
    raise ToolError(tool, f"cannot start: {e}", command) from e
  try:
    stdout, stderr = process.communicate(input=stdin, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
    stdout, stderr = process.communicate()
    raise ToolError(tool, f"timed out after {timeout_s} s (killed)", command,
                    stderr.decode("utf-8", "replace")) from None
  except BaseException:
    # Ctrl-C or another interruption: do not leave the tool running.
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    raise
  log.info("%s finished in %.2f s", tool, time.perf_counter() - start)
  completed = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
  if process.returncode != 0:
    how = (f"killed by signal {-process.returncode}" if process.returncode < 0
           else f"exit status {process.returncode}")
    raise ToolError(tool, f"failed ({how})", command, stderr.decode("utf-8", "replace"),
                    process.returncode)
  return completed


def read_output(tool: str, path: str, command: Sequence[str], stderr: bytes) -> str:
  """Reads a result file the tool should have written; its absence is a ToolError."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError as e:
    raise ToolError(tool, f"exited 0 but wrote no output {path} ({e})", command,
                    stderr.decode("utf-8", "replace")) from e
