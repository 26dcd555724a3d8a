#!/usr/bin/env bash
# Builds the advisory database snapshot that .ci/deny.sh checks against:
# the RustSec advisories (crates/<name>/*.md) of every crate name in our
# Cargo.lock, the database's licence files, and SNAPSHOT (upstream commit,
# its date, the crate names it was filtered for).
#
#   .ci/advisory-db/refresh.sh SOURCE OUT
#
# SOURCE: a clone (bare or not) of the RustSec advisory-db repository,
#         e.g. `git clone --bare <rustsec advisory-db URL> /tmp/adb`, on a
#         machine that reaches its host (CI does not).
# OUT:    the snapshot directory to (re)write, e.g. ../shared/advisory-db.
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
src=$1 out=$2
root=$(cd "$(dirname "$0")/../.." && pwd)

if git -C "$src" rev-parse --is-bare-repository 2>/dev/null | grep -qx true; then
  git=(git --git-dir="$src")
else
  git=(git -C "$src")
fi
commit=$("${git[@]}" rev-parse HEAD)
date=$("${git[@]}" show -s --format=%cI HEAD)

names=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$root/Cargo.lock" | sort -u)
paths=()
for n in $names; do
  if [ -n "$("${git[@]}" ls-tree -d --name-only "$commit" "crates/$n")" ]; then
    paths+=("crates/$n")
  fi
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${git[@]}" archive "$commit" LICENSE.txt LICENSES "${paths[@]}" | tar -x -C "$tmp"
{
  echo "# RustSec advisory-db snapshot for .ci/deny.sh (.ci/advisory-db/refresh.sh)"
  echo "commit=$commit"
  echo "date=$date"
} > "$tmp/SNAPSHOT"
printf '%s\n' $names > "$tmp/crates.txt"

rm -rf "$out/crates" "$out/LICENSES"
mkdir -p "$out"
cp -R "$tmp/." "$out/"
echo "advisory snapshot: $commit ($date), ${#paths[@]} of $(wc -l < "$tmp/crates.txt") crates have advisories, $(find "$out/crates" -name '*.md' | wc -l) files -> $out"
