"""The warm stage server (components/worker.py): a stage's child must not keep other stages waiting."""
from __future__ import annotations

import os
import socket
import time

from components import worker


def test_a_stage_child_does_not_hold_the_other_stages_connections():
    other_server_end, other_client_end = socket.socketpair()  # a stage already running when this one forks
    own_server_end, _own_client_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the new stage's child, as the server forks it
        worker._close_other_sockets(own_server_end.fileno())
        time.sleep(3)  # a longer stage than the other one
        os._exit(0)
    try:
        other_server_end.close()  # the other stage is done: its client must see end-of-file now
        other_client_end.settimeout(1.5)  # the child lives 3 s: a copy of the connection there would time out
        assert other_client_end.recv(1) == b""
    finally:
        os.waitpid(pid, 0)
