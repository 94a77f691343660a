"""Fault injection for tests/test_faults.py, loaded at start-up by the `trainer` processes those tests
start (their PYTHONPATH puts this folder first). Nothing of it is in the trainer itself.

MNIST8K_FAULT="WHEN|FUNCTION|MATCH|SIGNAL" sends SIGNAL to the process itself right `before` or
`after` the first call of FUNCTION (a module attribute, e.g. `mlflow.set_tags`) whose arguments'
repr contains MATCH: a real signal at an exact moment.
"""

import os

if os.environ.get("MNIST8K_FAULT"):
    import importlib
    import signal

    when, target, match, name = os.environ["MNIST8K_FAULT"].split("|")
    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    fired = []

    def injected(*args, **kwargs):
        hit = not fired and match in repr(args) + repr(kwargs)
        if hit:
            fired.append(True)
        if hit and when == "before":
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        result = original(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        return result

    setattr(module, attr, injected)
