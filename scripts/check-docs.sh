#!/usr/bin/env bash
# Checks the user docs (README.md, CHANGELOG.md, docs/**/*.md):
#   scripts/check-docs.sh          # every relative link resolves: the file exists and, for a
#                                  # link into a .md file with #anchor, the heading exists
#   scripts/check-docs.sh --run    # also runs README.md's marked quick-start blocks
# Links to http(s)://, mailto: and the like are not followed; links inside code are not links.
# A failing link is reported as FILE:LINE: LINK (why), and the script exits non-zero.
#
# --run: each ```sh block that comes right after a line `<!-- check-docs: run -->` in README.md
# runs, in order, in one scratch folder (so later blocks see earlier blocks' outputs), with
# `bash -euo pipefail`, after `source scripts/env.sh` and with `$CARGO_TARGET_DIR/release` first
# on PATH, so `magpie` is the binary scripts/setup.sh built. The scratch folder links recipes/
# and data/ from the checkout, so blocks written for the repository root run unchanged.
# CHECK_DOCS_KEEP=1 keeps the scratch folder. Each block's time is printed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
run_blocks=0
for arg in "$@"; do
  case "$arg" in
    --run) run_blocks=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-docs: unknown argument $arg (expected --run)" >&2; exit 2 ;;
  esac
done

python=python3
command -v "$python" >/dev/null || { echo "check-docs: needs python3" >&2; exit 2; }

files=(README.md)
[ -f CHANGELOG.md ] && files+=(CHANGELOG.md)
while IFS= read -r f; do files+=("$f"); done < <(find docs -name '*.md' -type f 2>/dev/null | sort)

"$python" - "${files[@]}" <<'PY'
import os, re, sys, unicodedata

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target "title") and ![alt](target); the target has no spaces unless in <...>.
INLINE = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(\S+)")
HTML = re.compile(r"""<(?:a|img)\s[^>]*(?:href|src)=["']([^"']+)["']""", re.I)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)*?\1")

def slug(heading, seen):
    text = re.sub(r"<[^>]+>", "", heading)          # inline HTML
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.strip().lower()
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in " -":
            out.append("-")
        elif ch == "_" or cat[0] in "LN" or cat == "Mn":
            out.append(ch)
    base = "".join(out)
    n = seen.get(base, 0)
    seen[base] = n + 1
    return base if n == 0 else f"{base}-{n}"

anchors_cache = {}
def anchors(path):
    if path not in anchors_cache:
        seen, found, fenced = {}, set(), False
        with open(path, encoding="utf-8") as f:
            for line in f:
                if FENCE.match(line):
                    fenced = not fenced
                    continue
                if fenced:
                    continue
                m = re.match(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", line)
                if m:
                    found.add(slug(m.group(2), seen))
                for a in re.findall(r"""<a\s[^>]*(?:name|id)=["']([^"']+)["']""", line):
                    found.add(a)
        anchors_cache[path] = found
    return anchors_cache[path]

failures = 0
checked = 0
for doc in sys.argv[1:]:
    fenced = False
    with open(doc, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        text = CODE_SPAN.sub("", line)
        targets = [m.group(1) for m in INLINE.finditer(text)]
        targets += [m.group(1) for m in REFDEF.finditer(text)]
        targets += [m.group(1) for m in HTML.finditer(text)]
        for target in targets:
            target = target.strip("<>")
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):   # http:, https:, mailto:, ...
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            why = None
            if not os.path.exists(resolved):
                why = f"{resolved} does not exist"
            elif anchor and resolved.endswith(".md") and os.path.isfile(resolved) and anchor not in anchors(resolved):
                why = f"no heading #{anchor} in {resolved}"
            if why:
                failures += 1
                print(f"{doc}:{number}: {target} ({why})")
if failures:
    print(f"check-docs: {failures} broken link(s) of {checked}", file=sys.stderr)
    sys.exit(1)
print(f"check-docs: {checked} relative links in {len(sys.argv) - 1} files resolve")
PY

((run_blocks)) || exit 0

source scripts/env.sh
[ -x "$MAGPIE_BIN" ] || { echo "check-docs --run: no binary at $MAGPIE_BIN; run scripts/setup.sh first" >&2; exit 1; }
scratch=$(mktemp -d "${TMPDIR:-/tmp}/magpie-check-docs.XXXXXX")
if [ "${CHECK_DOCS_KEEP:-0}" = 1 ]; then
  echo "check-docs: scratch folder $scratch (kept)"
else
  trap 'rm -rf "$scratch"' EXIT
fi
ln -s "$root/recipes" "$scratch/recipes"
ln -s "$root/data" "$scratch/data"

# Extract the marked blocks: block-N.sh, and block-N.line holding README's line of the fence.
"$python" - README.md "$scratch" <<'PY'
import re, sys
readme, scratch = sys.argv[1], sys.argv[2]
lines = open(readme, encoding="utf-8").read().split("\n")
n, i = 0, 0
while i < len(lines):
    if lines[i].strip() == "<!-- check-docs: run -->":
        if i + 1 >= len(lines) or not re.match(r"^```(sh|bash)\s*$", lines[i + 1]):
            sys.exit(f"{readme}:{i + 1}: `<!-- check-docs: run -->` must come right before a ```sh block")
        j = i + 2
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            sys.exit(f"{readme}:{i + 2}: unterminated code block")
        n += 1
        open(f"{scratch}/block-{n}.sh", "w").write("\n".join(lines[i + 2:j]) + "\n")
        open(f"{scratch}/block-{n}.line", "w").write(str(i + 2))
        i = j
    i += 1
if n == 0:
    sys.exit(f"{readme}: no `<!-- check-docs: run -->` blocks")
PY

export PATH="$CARGO_TARGET_DIR/release:$PATH"
total_start=$(date +%s)
status=0
for block in $(ls "$scratch"/block-*.sh | sort -V); do
  name=$(basename "$block" .sh)
  line=$(cat "$scratch/$name.line")
  echo "== check-docs: README.md:$line ($name)"
  start=$(date +%s)
  if (cd "$scratch" && bash -euo pipefail "$block"); then
    echo "== check-docs: README.md:$line ok in $(( $(date +%s) - start )) s"
  else
    rc=$?
    echo "check-docs: README.md:$line: the block failed with exit status $rc after $(( $(date +%s) - start )) s" >&2
    status=1
    break
  fi
done
echo "check-docs: quick-start blocks took $(( $(date +%s) - total_start )) s in all"
exit $status
