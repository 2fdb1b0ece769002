"""Command-line plumbing shared by the CLIs: options generated from the typed settings, Prefect
defaults for runs started from a terminal, and user errors shown as one line without a traceback."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, NoReturn, Optional, TypeVar

from pydantic import BaseModel, ValidationError

from tagifai.errors import UserError

Settings = TypeVar("Settings", bound=BaseModel)

# For command-line runs without a Prefect server: the temporary server Prefect starts can take
# over its 20 s default to come up on a busy 2-core machine, and it cannot phone home offline.
CLI_PREFECT_DEFAULTS = {"server.ephemeral.startup_timeout_seconds": 180, "server.analytics_enabled": False}


def _cli_type(annotation: Any):
    """The argparse type for a settings field; JSON-typed fields stay strings for pydantic."""
    text = str(annotation)
    for name, kind in (("int", int), ("float", float)):
        if annotation in (kind, Optional[kind]) or text == name:
            return kind
    return str


def build_parser(model: type[BaseModel], prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one `--option` per model field, help and default from the model;
    a boolean field is a flag."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, (list, dict)) else default
        help_text = (field.description or "").replace("%", "%%")
        option = (field.json_schema_extra or {}).get("cli") or "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(option, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        if not field.is_required():
            help_text += f" (default: {shown})".replace("%", "%%")
        parser.add_argument(
            option,
            dest=name,
            type=_cli_type(field.annotation),
            required=field.is_required(),
            default=argparse.SUPPRESS,
            help=help_text,
        )
    return parser


def parse_settings(model: type[Settings], argv: Optional[list[str]], prog: str, description: str) -> Settings:
    """Parse CLI arguments into `model`; a bad value exits with the field's message, not a traceback."""
    parser = build_parser(model, prog, description)
    arguments = vars(parser.parse_args(argv))
    try:
        return model(**arguments)
    except ValidationError as error:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-') or 'options'}: {e['msg']}" for e in error.errors()
        )
        parser.error(problems)


# Prefect's own progress messages, one or two per task run: the flow's lines say what happened.
ENGINE_CHATTER = ("Created task run", "Finished in state Completed", "Finished in state Cached", "Beginning flow run",
                  "Starting temporary server", "Stopping temporary server", "View at ")  # fmt: skip


class _QuietEngine(logging.Filter):
    """Drops Prefect's per-task state messages and MLflow's start-up notices from the console;
    warnings and errors always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if record.name.startswith("mlflow"):
            return False
        return not (record.name.startswith("prefect") and str(record.msg).startswith(ENGINE_CHATTER))


QUIET_ENGINE = _QuietEngine()


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed run with its traceback; for a user error the message is the answer."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


_early_ray_head = None  # the RayHead started by start_ray_head_early, until stop_ray_head
_early_prefect_server: Optional[threading.Thread] = None  # starting Prefect's temporary server


def _exit_on_terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _interrupt_without_retries(signum, frame) -> None:
    """Ctrl-C in a terminal reaches its whole process group, Prefect's temporary server included,
    which stops at once. The flow then reports its interruption to a server that is gone, and
    Prefect's client retries each request with back-off (seen: over 6 minutes before the command
    ended). From here on each request is tried once; then the usual KeyboardInterrupt."""
    settings_module = sys.modules.get("prefect.settings")  # not imported yet: nothing to report
    if settings_module is not None:
        settings_module.get_current_settings().client.max_retries = 0
    raise KeyboardInterrupt


def start_ray_head_early(argv: list[str]) -> None:
    """For a command that will run a Ray study, before its imports: start a local Ray head as a child
    process (tagifai/tuning/head.py), which the study joins, and Prefect's temporary server from a
    thread (command_line_run waits for it), so that both come up while the command imports torch,
    transformers and MLflow. Nothing when $RAY_ADDRESS names a cluster or the command only shows
    help. SIGTERM then ends the command as an exit would, so both are stopped either way; so does
    Ctrl-C, without waiting on the server it also stopped."""
    global _early_ray_head, _early_prefect_server
    if _early_ray_head or os.environ.get("RAY_ADDRESS") or {"-h", "--help"} & set(argv):
        return
    from tagifai.tuning.head import HEAD_ADDRESS_ENV, RayHead
    from tagifai.tuning.ray_output import QUIET_WORKER_ENV

    signal.signal(signal.SIGTERM, _exit_on_terminate)
    signal.signal(signal.SIGINT, _interrupt_without_retries)
    _early_ray_head = RayHead(None if "--verbose" in argv else QUIET_WORKER_ENV)
    os.environ[HEAD_ADDRESS_ENV] = _early_ray_head.address
    atexit.register(stop_ray_head)  # an exit before command_line_run (a bad option) stops it too
    _early_prefect_server = threading.Thread(
        target=_start_temporary_prefect_server, args=("--verbose" in argv,), daemon=True
    )
    _early_prefect_server.start()


def _start_temporary_prefect_server(verbose: bool) -> None:
    """What Prefect does at a flow's first API call without a server (and only then); a failure here
    is left for that call to meet and report."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings

    with temporary_settings(set_defaults=CLI_PREFECT_DEFAULTS):
        if not verbose:
            quiet_console()
        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return
        from prefect.server.api.server import SubprocessASGIServer

        with contextlib.suppress(Exception):
            SubprocessASGIServer().start()  # Prefect's own, stopped by Prefect at exit


def stop_ray_head() -> None:
    """Stop the head of start_ray_head_early, if any; say why if it had died on its own."""
    global _early_ray_head
    if _early_ray_head is None:
        return
    from tagifai.tuning.head import HEAD_ADDRESS_ENV

    os.environ.pop(HEAD_ADDRESS_ENV, None)
    problem, _early_ray_head = _early_ray_head.stop(), None
    if problem:
        print(f"error: {problem}", file=sys.stderr)


def quiet_console() -> None:
    """Prefect's and MLflow's chatter off the console (QUIET_ENGINE); left on: Prefect says goodbye
    as the process exits."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # Prefect's console handler exists from here on
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    consoles += [h for name in ("mlflow", "prefect") for h in logging.getLogger(name).handlers]
    for handler in consoles:
        handler.addFilter(QUIET_ENGINE)


@contextlib.contextmanager
def command_line_run(verbose: bool = False):
    """Prefect defaults for a run started from a terminal, a quiet console (unless `verbose`), and a
    user error ending the command with its message."""
    from prefect.settings import temporary_settings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if _early_prefect_server is not None:
        _early_prefect_server.join()
    no_tracebacks = _HideUserErrorTracebacks()
    run_loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for run_logger in run_loggers:
        run_logger.addFilter(no_tracebacks)
    try:
        with temporary_settings(set_defaults=CLI_PREFECT_DEFAULTS), exit_on_user_error():
            if not verbose:
                quiet_console()
            yield
    finally:
        stop_ray_head()  # the flow has let go of it; Prefect's server stops at the interpreter's exit
        for run_logger in run_loggers:
            run_logger.removeFilter(no_tracebacks)


def exit_after_results(code: int = 0) -> NoReturn:
    """End a command whose results are written: what the interpreter's exit does for us, in its
    order (threading's exit hooks: thread pools finish, Prefect's log and event workers drain; then
    the threads are joined; then the exit handlers: Prefect's temporary server and the Ray head
    stop), then leave without tearing down every module one by one (seconds with torch,
    transformers, Ray and MLflow loaded, measured in benchmarks/cli_run.py; nothing is left to save)."""
    # Joining the threads without those hooks waited forever on an idle pool worker that an MLflow
    # artifact repository kept alive (seen in CI). `_shutdown` is what the interpreter's own exit
    # calls: the hooks, then the join.
    threading._shutdown()  # type: ignore[attr-defined]
    if "prefect.logging.handlers" in sys.modules:
        # The run's last log lines go to Prefect's server while it is up: the exit handlers stop the
        # server before logging's own shutdown flushes them, which then waits its 5 s timeout for
        # an answer that cannot come (measured: 5.0 of the 5.5 s from results to exit).
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def exit_on_user_error(code: int = 1):
    """A user error ends the command with `error: <message>` on stderr and exit `code`."""
    try:
        yield
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(code)
