"""Import a script of the repository (a benchmark or an example) as a module, without running
its `main`."""

import importlib.util

import jax


def load_script(path, name):
    """The file `path` imported as a module called `name`.

    Some scripts switch float64 on at import, as a script would: the suite's dtype is restored.
    """
    previous = jax.config.jax_enable_x64
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        jax.config.update("jax_enable_x64", previous)
    return module
