"""A warm ClientApp runner: import the ClientApp once, fork a child for each message.

Flower's SuperNode starts a fresh ``flwr-clientapp`` process for every message it receives, so every
round on a device pays for starting Python and importing torch, transformers, peft and opacus again:
most of a deployed round's overhead on a small device. With ``flower-supernode --isolation process``
the SuperNode leaves starting ClientApps to someone else; this runner is that someone. It imports
fleetlora's ClientApp (and with it the ML stack) once, asks the SuperNode's runtime API for work, and
``fork``\\ s a child per task that runs Flower's own ``run_clientapp`` — so each message still gets a
fresh process (a crash or a leak ends with it), only without the imports.

The parent never runs a tensor operation, so no thread pool exists yet when it forks. This uses
Flower's runtime modules directly (``flwr.supernode.runtime``, ``flwr.supercore``), which are
internal: fleetlora pins ``flwr==1.41.0`` for that reason.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as flower_clientapp
from flwr.supernode.runtime.run_clientapp import run_clientapp

from fleetlora.client.client_app import TASK_ACQUIRED_AT
from fleetlora.common.flower_env import retry_pulls_sooner

PRELOAD = ("fleetlora.client.client_app",)  # imports torch, transformers, peft, opacus, flwr
POLL_SECONDS = 0.1


def serve(runtime_address: str, parent_pid: int | None = None) -> None:
    """Run ClientApp tasks from the SuperNode at ``runtime_address`` until the SuperNode goes away."""
    # A terminal's Ctrl-C reaches the whole group; the runner lives exactly as long as its SuperNode
    # (and `device up` ends it), so it neither dies mid-task on it nor prints a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A task taken this quickly is one whose message the SuperNode is still pulling: its children ask
    # again for the missing objects after 0.05 s rather than Flower's 1 s.
    retry_pulls_sooner(flower_clientapp, "pull_and_inflate_object_from_tree")
    for module in PRELOAD:
        importlib.import_module(module)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address,
        insecure=True,  # the runtime API listens on loopback only
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    while parent_pid is None or _alive(parent_pid):
        answer = client.AcquireTask(request)
        if answer.HasField("task") and answer.token:
            _fork_task(runtime_address, answer.token, time.time())
        _reap()
        time.sleep(POLL_SECONDS)


def _fork_task(runtime_address: str, token: str, acquired_at: float) -> None:
    if os.fork() == 0:  # the child: one message, then gone
        code = 0
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.environ[TASK_ACQUIRED_AT] = repr(acquired_at)  # the ClientApp logs it with the message
            run_clientapp(runtime_address, token, insecure=True)
        except SystemExit as exit_:  # Flower's flwr_exit ends every ClientApp this way
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
