"""Fault injection for tests/test_faults.py, loaded at start-up by the `trainer` processes those tests
start (their PYTHONPATH puts this folder first). Nothing of it is in the trainer itself.

MNIST8K_FAULT="WHEN|FUNCTION|MATCH|SIGNAL" sends SIGNAL to the process itself right `before` or
`after` the first call of FUNCTION (a module attribute, e.g. `mlflow.set_tags`, or a class's, e.g.
`matplotlib.transforms.AffineBase.__array__`) whose arguments' repr contains MATCH, or made (at any
depth) from a function named MATCH: a real signal at an exact moment.
"""

import os

if os.environ.get("MNIST8K_FAULT"):
    import importlib
    import signal
    import sys

    when, target, match, name = os.environ["MNIST8K_FAULT"].split("|")
    path = target.split(".")
    for i in range(len(path) - 1, 0, -1):  # the longest importable prefix, then attributes
        try:
            owner = importlib.import_module(".".join(path[:i]))
            break
        except ImportError:
            continue
    for attr in path[i:-1]:
        owner = getattr(owner, attr)
    original = getattr(owner, path[-1])
    fired = []

    def callers():
        frame = sys._getframe(2)
        while frame:
            yield frame.f_code.co_name
            frame = frame.f_back

    def injected(*args, **kwargs):
        hit = not fired and (match in repr(args) + repr(kwargs) or match in callers())
        if hit:
            fired.append(True)
        if hit and when == "before":
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        result = original(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        return result

    setattr(owner, path[-1], injected)
