"""Every relative link of the README and docs/ names a file that exists and, with ``#anchor``,
a heading of that file (GitHub's anchors: lower case, punctuation dropped, spaces to hyphens,
``-1``, ``-2``... for repeated headings)."""

import os
import re

import pytest

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def anchors(path):
    found, seen, fenced = set(), {}, False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(2).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def markdown_files(repo_root):
    files = [os.path.join(repo_root, "README.md")]
    for folder, _, names in os.walk(os.path.join(repo_root, "docs")):
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".md")]
    return files


def test_relative_links_and_anchors_resolve(repo_root):
    broken = []
    for path in markdown_files(repo_root):
        text = re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = f"{os.path.relpath(path, repo_root)}: {target}"
            if not os.path.exists(dest):
                broken.append(f"{where} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize(
    "heading, slug",
    [
        (
            "## The full benchmark (`python -m benchmarks`, 2 CPU cores)",
            "the-full-benchmark-python--m-benchmarks-2-cpu-cores",
        ),
        ("### The AVX2 machine's figures", "the-avx2-machines-figures"),
    ],
)
def test_anchor_rule(tmp_path, heading, slug):
    doc = tmp_path / "a.md"
    doc.write_text(f"{heading}\n\n{heading}\n")
    assert anchors(str(doc)) == {slug, f"{slug}-1"}
