"""The README and docs/ stay true: every relative link and image resolves (anchors included), the README stays
short, and its set-up commands are the ones CI runs. Plain text parsing: no MindSpore, well under a second."""
import glob
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the text may hold one level of brackets ("[2P, T]" in alt text)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"", re.I)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _prose(text):
    """The text with fenced blocks and code spans blanked: a `[x](y)` inside code is not a link."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub("", text)


def links(text):
    prose = _prose(text)
    return LINK.findall(prose) + HTML_SRC.findall(prose)


def slug(heading):
    """GitHub's anchor for a heading: link text kept, punctuation dropped, lower case, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(text):
    seen, out = {}, set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page):
    text = _read(page)
    bad = []
    for target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ... not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(dest):
            bad.append(f"{target} (no such file: {os.path.relpath(dest, ROOT)})")
        elif anchor and dest.endswith(".md") and anchor not in anchors(_read(dest)):
            bad.append(f"{target} (no heading #{anchor} in {os.path.relpath(dest, ROOT)})")
    return bad


def test_the_link_checker_sees_what_a_reader_would_follow(tmp_path):
    (tmp_path / "there.md").write_text("# A heading: with `code` (and more)\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a-heading-with-code-and-more) [dup](there.md#twice-1) ![img](missing.png)\n"
        "[gone](nowhere.md) [bad anchor](there.md#nope) [web](https://example.org/x) [self](#top)\n"
        "`[in code](not_a_link.md)`\n```\n[in a fence](not_a_link.md)\n# not a heading\n```\n# Top\n")
    assert broken_links(str(page)) == [
        "missing.png (no such file: " + os.path.relpath(str(tmp_path / "missing.png"), ROOT) + ")",
        "nowhere.md (no such file: " + os.path.relpath(str(tmp_path / "nowhere.md"), ROOT) + ")",
        "there.md#nope (no heading #nope in " + os.path.relpath(str(tmp_path / "there.md"), ROOT) + ")",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == [], f"{os.path.relpath(page, ROOT)}: broken links"


def test_docs_pages_are_reachable_from_the_readme():
    """A page nobody links to is a page nobody reads: every docs/*.md is linked from the README."""
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in links(_read(README))}
    orphans = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")) if p not in linked]
    assert orphans == [], f"README.md does not link {orphans}"


def test_readme_is_short():
    with open(README, encoding="utf-8") as f:
        n = sum(1 for _ in f)
    assert n <= README_MAX_LINES, f"README.md has {n} lines, more than {README_MAX_LINES}: move detail into docs/"


def _ci_commands():
    """The commands .ci/run executes, minus its shell plumbing (set -e..., cd to the root)."""
    cmds = []
    for line in _read(os.path.join(ROOT, ".ci", "run")).splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(("set ", "cd ")):
            continue
        cmds.append(shlex.split(line))
    return cmds


def _readme_setup_commands():
    """The commands of the README's first bash block (Set up and go), each line split at '&&'."""
    block = re.search(r"```bash\n(.*?)```", _read(README), re.S)
    assert block, "README.md has no ```bash block for setting up"
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]
    return [[shlex.split(part) for part in line.split("&&")] for line in lines]


def test_readme_setup_runs_what_ci_runs():
    ci = _ci_commands()
    assert len(ci) >= 2 and ci[0][:4] == ["python", "-m", "pip", "install"] and \
        all(c[:4] == ["MS_DEV_HOST_BLOCKING_RUN=1", "python", "-m", "pytest"] for c in ci[1:]), \
        f".ci/run no longer reads as install-then-pytest: {ci}"
    setup = _readme_setup_commands()
    assert ci in setup, f"README.md's set-up block has no line running exactly .ci/run's commands {ci}: {setup}"
    for line in setup:  # the main job installs the same way as CI, so a fresh clone sets up once
        assert line[0] == ci[0], f"README.md set-up line installs differently from .ci/run: {line[0]} vs {ci[0]}"
