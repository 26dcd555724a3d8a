# Shared by deploy/check.sh and yocto/check.sh (sourced, not run): a scratch
# dir, a check counter, and the ok / fail / run / run_silent helpers that
# print one "ok" or "FAIL" line per check (with the failing command's output).

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

checks=0
ok() {
    checks=$((checks + 1))
    printf 'ok    %s\n' "$1"
}
fail() {
    printf 'FAIL  %s\n' "$1"
    if [ -s "$WORK/out" ]; then sed 's/^/      /' "$WORK/out"; fi
    exit 1
}
# run NAME CMD...: the check passes when CMD exits 0.
run() {
    local name=$1
    shift
    if "$@" >"$WORK/out" 2>&1; then ok "$name"; else fail "$name"; fi
}
# run_silent NAME CMD...: passes when CMD exits 0 and prints nothing (for
# tools that only warn, with status 0, about unknown keys and the like).
run_silent() {
    local name=$1
    shift
    if "$@" >"$WORK/out" 2>&1 && ! [ -s "$WORK/out" ]; then ok "$name"; else fail "$name"; fi
}
