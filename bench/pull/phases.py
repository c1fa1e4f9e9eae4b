#!/usr/bin/env python3
"""Calls image.pull on a bangerd socket and times its phases from the progress notifications.

usage: phases.py SOCKET REFERENCE NAME

Prints one line: total and the time spent resolving, downloading, applying each layer,
building the ext4 image and publishing, as seen by the client (notification arrival times).
Exits 1 if the pull fails.
"""

import json
import socket
import sys
import time


def main() -> int:
    sock_path, reference, name = sys.argv[1:4]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    stream = sock.makefile("rwb")
    request = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "image.pull",
        "params": {"reference": reference, "name": name},
    }
    started = time.monotonic()
    stream.write(json.dumps(request).encode() + b"\n")
    stream.flush()

    marks = {}  # label -> first time seen
    def mark(label: str, t: float) -> None:
        marks.setdefault(label, t)

    layer_done = []
    response = None
    for line in stream:
        t = time.monotonic() - started
        msg = json.loads(line)
        if msg.get("method") == "progress":
            p = msg["params"]
            task, message = p.get("task", ""), p.get("message", "")
            if task.startswith("sha256:"):
                mark("download_start", t)
                if p.get("done"):
                    layer_done.append((t, message))
                    marks["download_end"] = t
            elif task == "flatten":
                if p.get("done"):
                    mark("flatten_end", t)
                else:
                    # "layer i/n sha256:..."
                    mark("flatten " + message.split(" sha256:")[0], t)
                    mark("flatten_start", t)
            elif task == "build":
                mark("build_end" if p.get("done") else "build_start", t)
        elif msg.get("id") == 1:
            response = msg
            break
    total = time.monotonic() - started
    if response is None or "error" in response:
        print(f"pull failed: {response}", file=sys.stderr)
        return 1

    def span(a: str, b: str) -> str:
        if a in marks and b in marks:
            return f"{marks[b] - marks[a]:.2f}"
        return "?"

    layers = sorted((k, v) for k, v in marks.items() if k.startswith("flatten layer"))
    per_layer = []
    for i, (label, t) in enumerate(layers):
        end = layers[i + 1][1] if i + 1 < len(layers) else marks.get("flatten_end")
        if end is not None:
            per_layer.append(f"{label.split()[-1]} {end - t:.2f}")
    cached = sum(1 for _, m in layer_done if m == "cached")
    resolve = marks.get("download_start", marks.get("flatten_start", 0.0))
    publish = total - marks["build_end"] if "build_end" in marks else float("nan")
    print(
        f"total {total:.2f} s = resolve {resolve:.2f} + download {span('download_start', 'download_end')}"
        f" ({len(layer_done) - cached} fetched, {cached} cached)"
        f" + flatten {span('flatten_start', 'flatten_end')} [{', '.join(per_layer)}]"
        f" + ext4 {span('build_start', 'build_end')} + publish {publish:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
