"""The documentation names only what exists: README.md and docs/*.md against the code they describe.

What is checked (the rules, for whoever writes the docs; docs/testing.md says the same):
- config keys: every `section.key` (section = a field of vlora.config.Config) in inline code or a code block
  (Python blocks excepted: there `model.x` is an attribute) must be a key `vlora.config.load_config` accepts;
  in a YAML block with config sections every section and key must be known and the block must load as a config
  file; in a table whose header starts `| key | default |` each default must equal the code's.
- flags: on a command line in a code block or inline code that runs `vlora SUB`, `train.py` or `make` (flags in
  its PACK_ARGS= / ARGS= values too), every `--flag` must be defined by `vlora.cli.build_parser()` for SUB, or by
  train.py's parser; inline code that is only a flag (`--max-reject 0.01`) must be a flag of some vlora
  subcommand or of train.py. Other tools' flags are written with their tool (`torchrun --signals-to-handle`,
  `#SBATCH --signal=...`) and not checked.
- make: `make TARGET ... VAR=value` must name rules of the Makefile and variables the Makefile uses.
- repository paths: a token with a '/' whose first part is a folder of the checkout (or docs/, recipes/) must
  exist. Capitalised parts (NAME, XXXXXXXX), <...>, {...}, ... and * are placeholders: the path must then
  match something. Runtime paths (runs/, shards/, .cache/, .venv/), absolute paths and other first parts
  (a user's data/, owner/name) are not repository paths. Relative markdown link targets must exist.
- README.md: at most 160 lines; its first code block starts with `make demo` then `make test`; its dependency
  table (header `| package | ...`) names exactly the packages setup.cfg installs (install_requires and extras);
  the code block under `## Layout` names every module of vlora/ and every top-level folder git does not ignore.
Words in capitals (SUB, TARGET, NAME) are placeholders wherever a name is expected (not for make variables).
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import fnmatch
import functools
import re
import shlex
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import yaml

from vlora.config import Config, load_config
from vlora.errors import VloraError

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "recipes" / "README.md"]
README_MAX_LINES = 160

SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
# A `section.key` followed by one of these is a file name (docs/data.md), not a key.
FILE_SUFFIXES = {"md", "py", "json", "jsonl", "yaml", "yml", "sh", "sbatch", "txt", "pt", "png", "jpg", "tar", "cfg",
                 "toml", "safetensors", "out"}
RUNTIME_ROOTS = {"runs", "shards", ".cache", ".venv"}  # written by make / vlora, not part of the repository
ALWAYS_ROOTS = {"vlora", "launch", "ds_configs", "tests", "docs", "recipes"}
KEY_RE = re.compile(rf"(?<![\w./$-])({'|'.join(SECTIONS)})((?:\.[A-Za-z_<*][\w<>*]*)+)")
PLACEHOLDER_RE = re.compile(r"<[^>/]*>|\{[^}/]*\}|\.\.\.|(?<![A-Z])[A-Z][A-Z0-9]*(?![a-z])")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


# ---- reading markdown ----


@dataclasses.dataclass
class Code:
    text: str
    line: int  # 1-based line of the doc where it starts
    lang: str | None  # None: inline code; "" or a language: a fenced block


@dataclasses.dataclass
class Doc:
    name: str
    path: Path
    text: str
    code: list[Code]
    links: list[tuple[str, int]]

    @property
    def blocks(self) -> list[Code]:
        return [c for c in self.code if c.lang is not None]

    @property
    def inline(self) -> list[Code]:
        return [c for c in self.code if c.lang is None]


def parse_markdown(name: str, text: str, path: Path | None = None) -> Doc:
    code, links, fence, block, start, lang = [], [], None, [], 0, ""
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence is None and m:
            fence, lang, block, start = m.group(1), m.group(2).lower(), [], i + 1
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                code.append(Code("\n".join(block), start, lang))
                fence = None
            else:
                block.append(line)
            continue
        for span in re.finditer(r"(`+)(.+?)\1", line):
            code.append(Code(span.group(2).strip().replace("\\|", "|"), i, None))
        prose = re.sub(r"(`+)(.+?)\1", "", line)
        links += [(target, i) for target in LINK_RE.findall(prose)]
    return Doc(name, path or REPO / name, text, code, links)


@functools.lru_cache(maxsize=None)
def load_doc(path: Path) -> Doc:
    return parse_markdown(str(path.relative_to(REPO)), path.read_text(), path)


def doc_ids():
    return [str(p.relative_to(REPO)) for p in DOCS]


# ---- what the code defines ----


def key_accepted(key: str) -> bool:
    """Whether the config knows `key`: the same check an override on the command line gets."""
    try:
        load_config(None, [f"{key}="])
    except VloraError as e:
        if "unknown config key" in str(e):
            return False
    return True


def known_keys() -> list[str]:
    """Every key of the config tree (sub-dataclasses walked), for patterns such as optim.lr_*."""
    out = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out.append(prefix + f.name)

    walk(Config(), "")
    return out


def default_of(key: str):
    obj = Config()
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@functools.lru_cache(maxsize=None)
def vlora_flags() -> dict[str, set[str]]:
    """{subcommand: its option strings}, from the parser `vlora` itself builds."""
    from vlora.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


class _Captured(Exception):
    pass


@functools.lru_cache(maxsize=None)
def train_py_flags() -> set[str]:
    """The option strings of train.py's parser (vlora.train.parse_args), captured as it parses."""
    import vlora.train

    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        with pytest.raises(_Captured):
            vlora.train.parse_args([])
    return set(seen["parser"]._option_string_actions)


@functools.lru_cache(maxsize=None)
def makefile() -> tuple[set[str], set[str]]:
    """(rule targets, variables) of the Makefile."""
    text = (REPO / "Makefile").read_text()
    targets, variables = set(), set()
    for line in text.splitlines():
        if line.startswith("\t") or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^([^:=#\s][^:=#]*?)\s*::?(?!=)", line)
        if m:
            targets |= {t for t in m.group(1).split() if "$" not in t and "%" not in t and not t.startswith(".")}
        m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*[:?+]?=", line)
        if m:
            variables.add(m.group(1))
    variables |= set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text))
    return targets, variables


@functools.lru_cache(maxsize=None)
def checkout_folders() -> set[str]:
    """Top-level folders of the checkout that git does not ignore (tracked or new); without git, the folders
    that are not hidden, caches or build outputs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                                text=True, timeout=60, check=True).stdout.splitlines()
        found = {line.split("/", 1)[0] for line in listed if "/" in line}
    except (OSError, subprocess.SubprocessError):
        found = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.endswith(".egg-info")
                 and p.name not in {"build", "tmp", "wandb", "runs"}}
    return {name for name in found if (REPO / name).is_dir() and not name.startswith((".", "_"))}


def repo_roots() -> set[str]:
    """First parts of the paths that are checked: the checkout's folders and those the docs may name."""
    return (checkout_folders() | ALWAYS_ROOTS) - RUNTIME_ROOTS


def setup_cfg_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    if cfg.has_section("options.extras_require"):
        for _, value in cfg["options.extras_require"].items():
            lines += value.splitlines()
    return {normalise(m.group(0)) for line in lines if (m := re.match(r"[A-Za-z0-9][A-Za-z0-9_.-]*", line.strip()))}


def normalise(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()


# ---- the checks: each returns "doc:line: what is wrong" lines ----


def shell_commands(code: Code) -> list[list[str]]:
    """The command lines of a shell block or of inline code, as words (comments and continuations removed)."""
    out = []
    for line in code.text.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part)
            except ValueError:
                words = part.split()
            if words:
                out.append(words)
    return out


def check_keys(doc: Doc) -> list[str]:
    errors = []
    keys = known_keys()
    for code in doc.code:
        if code.lang in ("python", "py"):
            continue
        for m in KEY_RE.finditer(code.text):
            key = m.group(1) + m.group(2)
            tail = code.text[m.end():m.end() + 1]
            if tail in ("(", "/") or key.rsplit(".", 1)[1] in FILE_SUFFIXES:
                continue
            if "<" in key or "*" in key:  # a pattern: optim.lr_<component>, model.freeze_*
                pattern = re.sub(r"<[^>]*>?", "*", key)
                if not fnmatch.filter(keys, pattern):
                    errors.append(f"{doc.name}:{code.line}: no config key matches '{key}'")
            elif not key_accepted(key):
                errors.append(f"{doc.name}:{code.line}: unknown config key '{key}'")
    return errors


def check_yaml_blocks(doc: Doc, tmp_path: Path) -> list[str]:
    errors = []
    for n, code in enumerate(doc.blocks):
        if code.lang not in ("yaml", "yml"):
            continue
        try:
            tree = yaml.safe_load(code.text)
        except yaml.YAMLError as e:
            errors.append(f"{doc.name}:{code.line}: YAML block does not parse: {str(e).splitlines()[0]}")
            continue
        if not isinstance(tree, dict) or not set(tree) & set(SECTIONS):
            continue
        for section, values in tree.items():
            if section not in SECTIONS:
                errors.append(f"{doc.name}:{code.line}: YAML block has section '{section}', not one of {SECTIONS}")
            elif isinstance(values, dict):
                errors += [f"{doc.name}:{code.line}: unknown config key '{section}.{k}' in a YAML block"
                           for k in values if not key_accepted(f"{section}.{k}")]
        path = tmp_path / f"block{n}.yaml"
        path.write_text(code.text)
        try:
            load_config(path)
        except VloraError as e:
            errors.append(f"{doc.name}:{code.line}: YAML block does not load as a config: {e}")
    return errors


def check_default_tables(doc: Doc) -> list[str]:
    errors, header = [], None
    for i, line in enumerate(doc.text.splitlines(), 1):
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if header[:2] != ["key", "default"] or set(line) <= set("|-: "):
            continue
        key = cells[0].strip("`")
        if not cells[1]:
            continue
        if not key_accepted(key):
            errors.append(f"{doc.name}:{i}: unknown config key '{key}' in a defaults table")
            continue
        written, actual = yaml.safe_load(cells[1].strip("`")), default_of(key)
        if written != actual:
            errors.append(f"{doc.name}:{i}: {key} defaults to {actual!r} in vlora/config.py, the table says {cells[1]}")
    return errors


def is_placeholder(word: str) -> bool:
    """NAME, SUB, TARGET or <name>: a word the reader replaces."""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*|<[^>]+>", word))


def check_command(doc: Doc, code: Code, words: list[str]) -> list[str]:
    where = f"{doc.name}:{code.line}"
    while words and ENV_ASSIGN.match(words[0]):
        words = words[1:]
    if not words:
        return []
    errors, cmd = [], words[0]
    flags = vlora_flags()

    def check_flags(args: list[str], known: set[str], what: str) -> None:
        for w in args:
            if w.startswith("--") and w.split("=", 1)[0] not in known:
                errors.append(f"{where}: {what} has no flag {w.split('=', 1)[0]}")

    if cmd == "vlora" or cmd.endswith("/vlora"):
        if len(words) > 1 and not words[1].startswith("-") and not is_placeholder(words[1]):
            if words[1] not in flags:
                errors.append(f"{where}: vlora has no subcommand '{words[1]}' ({', '.join(flags)})")
            else:
                check_flags(words[2:], flags[words[1]], f"vlora {words[1]}")
    elif "train.py" in words and Path(cmd).name in ("python", "python3", "torchrun", "train.py"):
        check_flags(words[words.index("train.py") + 1:], train_py_flags(), "train.py")
    elif cmd == "make":
        targets, variables = makefile()
        for w in words[1:]:
            if "=" in w:
                var, value = w.split("=", 1)
                if var not in variables:
                    errors.append(f"{where}: the Makefile uses no variable {var}")
                elif var == "PACK_ARGS":
                    check_flags(shlex.split(value), flags["pack"], "vlora pack (PACK_ARGS)")
                elif var == "ARGS" and "train" in words[1:]:
                    check_flags(shlex.split(value), train_py_flags(), "train.py (ARGS)")
            elif not w.startswith("-") and w not in targets and not is_placeholder(w):
                errors.append(f"{where}: the Makefile has no target '{w}'")
    return errors


def check_commands(doc: Doc) -> list[str]:
    errors = []
    all_flags = set().union(*vlora_flags().values())
    for code in doc.code:
        if code.lang is not None and code.lang not in SHELL_LANGS:
            continue
        if code.lang is None and code.text.startswith("--"):
            flag = code.text.split()[0].split("=", 1)[0]
            if flag not in all_flags | train_py_flags():
                errors.append(f"{doc.name}:{code.line}: no vlora subcommand or train.py has the flag {flag}")
            continue
        if code.lang is None and not re.match(r"(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?:\S*/)?(?:vlora|make|python3?|torchrun|train\.py)(?:\s|$)", code.text):
            continue  # inline code that is not a command line (a message, a key, a path)
        for words in shell_commands(code):
            errors += check_command(doc, code, words)
    return errors


def check_paths(doc: Doc) -> list[str]:
    errors, roots = [], repo_roots()
    for code in doc.code:
        for token in re.findall(r"[^\s`'\"()\[\],=:;|]+", code.text):
            token = token.rstrip(".")
            if "/" not in token or token.startswith(("/", "~", "$")):
                continue
            token = token.removeprefix("./")
            first = token.split("/", 1)[0]
            if first in RUNTIME_ROOTS or first not in roots:
                continue
            if (REPO / token).exists():
                continue
            pattern = PLACEHOLDER_RE.sub("*", token)
            if "*" in pattern and any(REPO.glob(pattern.rstrip("/"))):
                continue
            errors.append(f"{doc.name}:{code.line}: no such file or folder in the repository: {token}")
    for target, line in doc.links:
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.path.parent / target.split("#", 1)[0]).exists():
            errors.append(f"{doc.name}:{line}: link target {target} does not exist")
    return errors


# ---- the tests ----


@pytest.mark.parametrize("path", DOCS, ids=doc_ids())
def test_config_keys_exist(path, tmp_path):
    doc = load_doc(path)
    errors = check_keys(doc) + check_yaml_blocks(doc, tmp_path) + check_default_tables(doc)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", DOCS, ids=doc_ids())
def test_flags_and_make_targets_exist(path):
    errors = check_commands(load_doc(path))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", DOCS, ids=doc_ids())
def test_repository_paths_exist(path):
    errors = check_paths(load_doc(path))
    assert not errors, "\n".join(errors)


def test_readme_is_short_and_starts_with_make_demo_and_make_test():
    doc = load_doc(REPO / "README.md")
    lines = doc.text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it to {README_MAX_LINES}"
    first = doc.blocks[0]
    commands = [" ".join(words) for words in shell_commands(first)]
    assert commands[:2] == ["make demo", "make test"], f"README.md's first code block (line {first.line}): {commands}"
    assert first.line <= 25, f"README.md's first commands start at line {first.line}: bring them to the top"


def test_readme_layout_names_every_module_and_folder():
    """The Layout block names every module of vlora/ (vlora/x.py, vlora/sub/, sub-modules by file name) and every
    top-level folder of the checkout (a new one, such as recipes/, included)."""
    doc = load_doc(REPO / "README.md")
    heading = doc.text.splitlines().index("## Layout")
    layout = next((c.text for c in doc.blocks if c.line > heading), "")
    assert layout, "README.md has no code block under '## Layout'"
    wanted = [f"vlora/{p.name}" for p in sorted((REPO / "vlora").glob("*.py")) if p.name != "__init__.py"]
    for sub in sorted(p for p in (REPO / "vlora").iterdir() if p.is_dir() and not p.name.startswith("__")):
        wanted.append(f"vlora/{sub.name}/")
        wanted += [p.name for p in sorted(sub.glob("*.py")) if p.name != "__init__.py"]
    wanted += [f"{name}/" for name in sorted(checkout_folders())]
    missing = [w for w in wanted if not re.search(rf"(?<![\w/]){re.escape(w)}", layout)]
    assert not missing, f"README.md's Layout does not name {missing}"


def test_readme_dependency_table_matches_setup_cfg():
    rows = []
    header = None
    for line in load_doc(REPO / "README.md").text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells[0].lower()
        elif header == "package" and not set(line) <= set("|-: "):
            rows.append(cells[0])
    assert rows, "README.md has no dependency table (a table whose first header cell is 'package')"
    named = {normalise(m.group(0)) for row in rows for part in re.split(r"[,+]", row)
             if (m := re.match(r"[A-Za-z0-9][A-Za-z0-9_.-]*", part.strip().strip("`")))}
    installed = setup_cfg_packages()
    assert named == installed, (f"README's dependency table and setup.cfg differ: only in the README "
                                f"{sorted(named - installed)}, only in setup.cfg {sorted(installed - named)}")


def test_the_checks_catch_what_does_not_exist(tmp_path):
    """The checks can fail: a doc naming a bogus key, flag, subcommand, target, variable, path and link is caught."""
    bogus = parse_markdown("bogus.md", "\n".join([
        "Set `optim.no_such_key` or `run.nope_*`; `--no-such-flag` alone.",
        "```bash",
        "vlora pack --src a.jsonl --out shards/x --no-such-pack-flag",
        "vlora no-such-sub --out x",
        "torchrun --nproc_per_node 2 train.py --no-such-train-flag",
        "make no-such-target NO_SUCH_VAR=1 PACK_ARGS=\"--no-such-pack-arg\"",
        "```",
        "```yaml",
        "optim: {lr: 1.0e-4, no_such_yaml_key: 1}",
        "nosection: {a: 1}",
        "```",
        "| key | default |",
        "|---|---|",
        "| `optim.lr` | `0.5` |",
        "See `vlora/no_such_module.py`, `ds_configs/NAME.yaml` and [this](no-such-doc.md).",
    ]), tmp_path / "bogus.md")
    errors = "\n".join(check_keys(bogus) + check_yaml_blocks(bogus, tmp_path) + check_default_tables(bogus)
                       + check_commands(bogus) + check_paths(bogus))
    for expected in ("optim.no_such_key", "run.nope_*", "--no-such-flag", "--no-such-pack-flag", "no-such-sub",
                     "--no-such-train-flag", "no-such-target", "NO_SUCH_VAR", "--no-such-pack-arg",
                     "optim.no_such_yaml_key", "nosection", "optim.lr defaults to", "vlora/no_such_module.py",
                     "ds_configs/NAME.yaml", "no-such-doc.md"):
        assert expected in errors, f"not caught: {expected}\n{errors}"
    # and what exists passes
    good = parse_markdown("good.md", "`optim.lr`, `optim.lr_<component>`, `vlora pack --max-reject 0.1`, "
                          "`make shards SRC=a OUT=b`, `ds_configs/NAME.json`, `runs/NAME/adapter`, `my/own.yaml`",
                          tmp_path / "good.md")
    assert not check_keys(good) + check_commands(good) + check_paths(good)
