"""What the end-to-end tests share: ftcomm train's --events file, free ports."""
import json
import os
import socket


def read_events(path):
    """ftcomm train's --events file: one JSON object a line (absent until the first event)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
