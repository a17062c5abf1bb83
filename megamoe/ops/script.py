"""Reading a user's sbatch script, or a YAML/JSON config, without running it.

`megamoe check` and `megamoe estimate` must see the flags a submission would pass to the trainer,
but must never execute the script: it may have side effects, or start the training. So this
module interprets the small part of bash that sbatch scripts use for that, as bash would expand it:

- the #SBATCH header, up to the first command (as sbatch reads it; slurm.parse_sbatch_header);
- assignments, top to bottom (``name=value``, ``export name=value``, ``readonly``, ``declare``),
  starting from the environment, so ``lr=1e-4 sbatch script.sh``-style overrides are seen;
- in values and words: quotes and backslashes, ``$name``, ``${name}``, ``${name:-default}`` and
  the other default/alternative forms, ``$((integer arithmetic))``, and word splitting of
  unquoted expansions;
- the launch command: the first one that runs scripts/launch.sh, ``megamoe launch`` or ``python
  -m megamoe.train`` (itself, or through exec, bash, sh, srun); the words after it are the
  trainer's flags.

Nothing else is run: command substitution (``$(...)``, backquotes) is reported and read as
empty, here-documents are skipped, and control flow is read straight through (every assignment,
in order).
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, parse_run_config
from ..findings import ConfigError
from .slurm import parse_sbatch_header

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\+?=")
DECLARERS = ("export", "readonly", "declare", "typeset", "local")
CONTROL = (
    "if",
    "then",
    "else",
    "elif",
    "fi",
    "for",
    "while",
    "until",
    "do",
    "done",
    "case",
    "esac",
    "function",
)
OPENERS = ("if", "for", "while", "until", "case", "function")


@dataclass
class Target:
    path: str
    kind: str  # "script" | "config"
    argv: list[str] = field(default_factory=list)  # the trainer's flags (script)
    config: dict = field(default_factory=dict)  # the keys (config file)
    sbatch: dict[str, str] = field(default_factory=dict)  # #SBATCH options
    launch_exec: bool = False  # the launch command is `exec`ed (signals reach the launcher)
    problems: list[str] = field(default_factory=list)  # what stops the check
    notes: list[str] = field(default_factory=list)  # what the reading could not see


# ------------------------------------------------------------------------------------------------
# Lexing: commands of raw words (quotes kept), as bash splits a script


def _commands(text: str) -> list[tuple[int, list[str]]]:
    """[(line number, raw words)] for each simple command; separators ; && || | & and newlines
    end a command, comments are dropped, backslash-newline joins lines."""
    out: list[tuple[int, list[str]]] = []
    words: list[str] = []
    word, line, start_line, i, n = "", 1, 1, 0, len(text)
    in_word = False

    def end_word():
        nonlocal word, in_word
        if in_word:
            words.append(word)
        word, in_word = "", False

    def end_command():
        nonlocal words
        end_word()
        if words:
            out.append((start_line, words))
        words = []

    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            if text[i + 1] == "\n":  # continuation
                i, line = i + 2, line + 1
                continue
            word, in_word, i = word + text[i : i + 2], True, i + 2
            continue
        if c in "'\"`" or (c == "$" and text.startswith(("$(", "${"), i)):
            j = _closing(text, i)
            if not in_word and not words:
                start_line = line
            line += text.count("\n", i, j)
            word, in_word, i = word + text[i:j], True, j
            continue
        if c == "#" and not in_word:
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c in " \t":
            end_word()
            i += 1
            continue
        if c in "\n;&|":
            end_command()
            if c == "\n":
                line += 1
            i += 1
            continue
        if not in_word and not words:
            start_line = line
        word, in_word, i = word + c, True, i + 1
    end_command()
    return out


def _closing(text: str, i: int) -> int:
    """Index just past the quoted string or $(...)/${...} that starts at i."""
    c = text[i]
    if c == "'":
        j = text.find("'", i + 1)
        return len(text) if j < 0 else j + 1
    if c in '"`':
        j = i + 1
        while j < len(text) and text[j] != c:
            if text[j] == "\\":
                j += 1
            elif c == '"' and text.startswith(("$(", "${"), j):
                j = _closing(text, j) - 1
            j += 1
        return min(j + 1, len(text))
    opening, close = text[i + 1], ")" if text[i + 1] == "(" else "}"
    depth, j = 0, i + 1
    while j < len(text):
        ch = text[j]
        if ch in "'\"":
            j = _closing(text, j)
            continue
        if ch == "\\":
            j += 2
            continue
        if ch == opening:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return len(text)


# ------------------------------------------------------------------------------------------------
# Expansion


class Shell:
    """Variables and the expansion rules; `unknown` collects what could not be expanded."""

    def __init__(self, env: Mapping[str, str], script: str):
        self.vars = dict(env)
        self.vars.setdefault("PWD", os.getcwd())
        self.vars["0"] = script
        self.unknown: list[str] = []

    # one word -> fields (word splitting of unquoted expansions, as bash does)
    def fields(self, raw: str) -> list[str]:
        parts = self._expand(raw, quoted=False)
        out, cur, have = [], "", False
        for text, split in parts:
            if not split:
                cur, have = cur + text, True
                continue
            pieces = re.split(r"[ \t\n]+", text)
            for k, piece in enumerate(pieces):
                if k > 0 and (have or cur):
                    out.append(cur)
                    cur, have = "", False
                if piece:
                    cur, have = cur + piece, True
        if have or cur:
            out.append(cur)
        return out

    def value(self, raw: str) -> str:
        """An assignment's value: expanded, not split."""
        return "".join(t for t, _ in self._expand(raw, quoted=False))

    def _expand(self, s: str, quoted: bool) -> list[tuple[str, bool]]:
        """[(text, splittable)] of s; inside double quotes nothing is splittable."""
        out: list[tuple[str, bool]] = []
        i = 0
        while i < len(s):
            c = s[i]
            if c == "'" and not quoted:
                j = _closing(s, i)
                out.append((s[i + 1 : j - 1], False))
                i = j
            elif c == '"' and not quoted:
                j = _closing(s, i)
                inner = s[i + 1 : j - 1]
                out.append(("".join(t for t, _ in self._expand(inner, quoted=True)), False))
                i = j
            elif c == "\\" and i + 1 < len(s):
                nxt = s[i + 1]
                keep = quoted and nxt not in '$`"\\\n'
                out.append((("\\" if keep else "") + nxt, False))
                i += 2
            elif c == "`":
                j = _closing(s, i)
                self.unknown.append(s[i:j])
                i = j
            elif c == "$":
                text, i = self._dollar(s, i)
                out.append((text, not quoted))
            else:
                out.append((c, False))
                i += 1
        return out

    def _dollar(self, s: str, i: int) -> tuple[str, int]:
        if s.startswith("$((", i):
            j = _closing(s, i)
            return self._arith(s[i + 3 : j - 2]), j
        if s.startswith("$(", i):
            j = _closing(s, i)
            self.unknown.append(s[i:j])
            return "", j
        if s.startswith("${", i):
            j = _closing(s, i)
            return self._braced(s[i + 2 : j - 1]), j
        m = NAME.match(s, i + 1) or re.compile(r"[0-9#?$!@*-]").match(s, i + 1)
        if not m:
            return "$", i + 1
        return self._get(m.group(0)), m.end()

    def _get(self, name: str) -> str:
        if name in self.vars:
            return self.vars[name]
        if not NAME.fullmatch(name) and name != "0":
            self.unknown.append("$" + name)
        return ""

    def _braced(self, body: str) -> str:
        if re.fullmatch(r"#[A-Za-z_][A-Za-z0-9_]*", body):  # ${#name}: its length
            return str(len(self.vars.get(body[1:], "")))
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*|[0-9]+)(:?[-=+?])?(.*)$", body, re.S)
        if not m or (m.group(2) is None and m.group(3)):
            self.unknown.append("${" + body + "}")
            return ""
        name, op, word = m.groups()
        val = self.vars.get(name)
        unset_or_empty = val is None or (op and op.startswith(":") and val == "")
        kind = (op or "")[-1:]
        if kind in ("-", "="):
            if unset_or_empty:
                val = "".join(t for t, _ in self._expand(word, quoted=False))
                if kind == "=":
                    self.vars[name] = val
            return val
        if kind == "+":
            return "" if unset_or_empty else "".join(t for t, _ in self._expand(word, quoted=False))
        if kind == "?" and unset_or_empty:
            self.unknown.append("${" + body + "}")
            return ""
        return val or ""

    def _arith(self, expr: str) -> str:
        """$((...)): integers, + - * / % ** and parentheses; bare names are variables."""
        text = "".join(t for t, _ in self._expand(expr, quoted=True))
        text = re.sub(
            r"\b0[xX][0-9a-fA-F]+\b|\b0[0-7]+\b",
            lambda m: str(int(m.group(0), 16 if m.group(0)[1:2] in ("x", "X") else 8)),
            text,
        )  # C literals
        text = re.sub(
            r"(?<![0-9A-Za-z_])[A-Za-z_][A-Za-z0-9_]*",
            lambda m: self.vars.get(m.group(0), "0") or "0",
            text,
        )  # names: variables
        try:
            return str(_int_eval(ast.parse(text.strip(), mode="eval").body))
        except (SyntaxError, ValueError, ZeroDivisionError, TypeError, OverflowError):
            self.unknown.append(f"$(({expr}))")
            return ""


def _int_eval(node) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _int_eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _int_eval(node.left), _int_eval(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            q = abs(a) // abs(b) * (1 if (a < 0) == (b < 0) else -1)  # bash: toward zero, exact
            return q if not isinstance(node.op, ast.Mod) else a - b * q
        if isinstance(node.op, ast.Pow) and 0 <= b < 64:
            return a**b
    raise ValueError("not integer arithmetic")


# ------------------------------------------------------------------------------------------------
# The script


def _launch_start(words: list[str]) -> int | None:
    """Index of the first trainer flag when `words` run the launcher or the trainer: as the
    command itself, or through exec / bash / sh / srun (its options skipped) / python -m."""
    k = 0
    while k < len(words):
        w = os.path.basename(words[k])
        if (
            w == "exec"
            or w in ("bash", "sh")
            and k + 1 < len(words)
            and not words[k + 1].startswith("-")
        ):
            k += 1
        elif w == "srun":
            k += 1
            while k < len(words) and words[k].startswith("-"):
                k += 1
        elif w.endswith("launch.sh"):
            return k + 1
        elif w == "megamoe" and k + 1 < len(words) and words[k + 1] in ("launch", "train"):
            return k + 2
        elif w.startswith("python"):
            j = k + 1
            while j < len(words) and words[j].startswith("-") and words[j] != "-m":
                j += 1  # the interpreter's options (-u, -B, ...)
            module = words[j + 1 : j + 3]
            if module[:1] == ["megamoe.train"]:
                return j + 2
            if module in (["megamoe", "launch"], ["megamoe", "train"]):
                return j + 3
            return None
        else:
            return None
    return None


_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")


def _without_heredocs(text: str) -> tuple[str, list[str]]:
    """The script with here-document bodies blanked (they are data, not commands), and notes."""
    lines, out, notes, end = text.split("\n"), [], [], None
    for n, line in enumerate(lines, 1):
        if end is not None:
            out.append("")
            if line.strip() == end:
                end = None
            continue
        m = _HEREDOC.search(line)
        if m and "#" not in line[: m.start()]:
            end = m.group(2)
            notes.append(f"line {n}: a here-document ({end}) is data, not read as commands")
        out.append(line)
    return "\n".join(out), notes


def read_script(path: str, env: Mapping[str, str] | None = None) -> Target:
    """The trainer flags an sbatch script passes to the launcher, read without running it."""
    text = Path(path).read_text(errors="replace")
    t = Target(path, "script", sbatch=parse_sbatch_header(text))
    text, t.notes = _without_heredocs(text)
    sh = Shell(os.environ if env is None else env, path)
    control = set()
    for line, raw in _commands(text):
        if raw[0] in CONTROL or raw[0].endswith("()"):
            if raw[0] in OPENERS or raw[0].endswith("()"):
                control.add(raw[0])
            raw = raw[1:] if raw[0] in ("then", "else", "do") else []
            if not raw:
                continue
        before = len(sh.unknown)
        k = 1 if raw[0] in DECLARERS else 0
        while k < len(raw) and raw[k].startswith("-") and raw[0] in DECLARERS:
            k += 1
        assigns = []
        while k < len(raw) and ASSIGN.match(raw[k]):
            assigns.append(raw[k])
            k += 1
        rest = raw[k:]
        if not rest or raw[0] in DECLARERS:
            for a in assigns:  # shell variables
                m = ASSIGN.match(a)
                value = sh.value(a[m.end() :])
                append = a[m.end() - 2] == "+"
                sh.vars[m.group(1)] = sh.vars.get(m.group(1), "") + value if append else value
        else:
            words = [f for w in rest for f in sh.fields(w)]
            start = _launch_start(words)
            if start is not None:
                t.argv = words[start:]
                t.launch_exec = words[0] == "exec"
                if len(sh.unknown) > before:
                    t.notes.append(
                        f"line {line}: {', '.join(sh.unknown[before:])} is not run by "
                        "the check: the flags read it as empty"
                    )
                break
        for u in sh.unknown[before:]:
            t.notes.append(f"line {line}: {u} is not run by the check: read as empty")
    else:
        t.problems.append(
            "the script never calls scripts/launch.sh (or megamoe launch, or "
            "python -m megamoe.train)"
        )
    if control:
        t.notes.append(
            f"the script has control flow ({', '.join(sorted(control))}): the check "
            "reads every assignment in order, whatever the conditions"
        )
    return t


# ------------------------------------------------------------------------------------------------
# The trainer's flags, as its own parser reads them


class OptionsError(ValueError):
    pass


def parse_run(argv: Sequence[str] = (), config: dict | None = None) -> RunConfig:
    """Flags (and/or config keys) -> the trainer's RunConfig, through its own parser. Raises
    OptionsError with the parser's message (instead of exiting)."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_run_config(list(argv), config)
    except ConfigError as e:
        raise OptionsError(str(e)) from None
    except SystemExit:
        msg = [ln for ln in err.getvalue().splitlines() if "error:" in ln]
        raise OptionsError(
            msg[-1].split("error:", 1)[1].strip() if msg else "the trainer rejected the flags"
        ) from None


def resolve_options(argv: Sequence[str] = (), config: dict | None = None) -> dict:
    """{knob: value} over every trainer flag, defaults included."""
    return parse_run(argv, config).flat()


def read_target(path: str, env: Mapping[str, str] | None = None) -> Target:
    """An sbatch script, or a YAML/JSON config (by its suffix)."""
    from ..config import load_config_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            return Target(path, "config", config=load_config_file(path))
        except ConfigError as e:
            return Target(path, "config", problems=[str(e)])
    return read_script(path, env)
