"""The shape of vlora's code: functions short enough to read in one sitting, and the loop's body on one screen.
(The import graph's checks live in tests/test_config.py, beside the config they protect.)"""

import ast
import inspect

from helpers import REPO

LIMIT = 80  # lines per function, docstring and comments included


def test_no_function_in_vlora_is_longer_than_80_lines():
    long = []
    for path in sorted((REPO / "vlora").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_loop_body_fits_on_one_screen():
    from vlora.train import fit

    source = inspect.getsource(fit)
    loop = source[source.index("        while state.step"):source.index("    except RuntimeError")]
    assert len(loop.splitlines()) <= 40, len(loop.splitlines())
