#!/usr/bin/env bash
# Validate the Yocto layer yocto/meta-dai without a Yocto build: lint the
# metadata, check the generated files against their sources, verify the
# systemd unit as the image installs it, and cross-check the recipe, unit,
# udev rule and configuration against each other.
#
#   bash yocto/check.sh          (from anywhere; it works from the repo root)
#
# One line per check; stops with a non-zero status at the first failure and
# prints that tool's output. It installs oelint-adv (the versions pinned in
# yocto/lint-requirements.txt) into a venv on first use, from the package
# registry pip is configured for; systemd-analyze comes from the Debian
# package systemd.
#
# Environment:
#   DAI_OELINT_VENV  where the venv lives (default
#                    ~/.cache/dai/oelint-<hash of lint-requirements.txt>)
#   DAI_EDGE_BIN     a dai-edge binary for `check-config` on the image's
#                    edge.yaml (default: $CARGO_TARGET_DIR/release/dai-edge or
#                    target/release/dai-edge when built; skipped otherwise)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
Y=yocto
L=$Y/meta-dai
RECIPE=$L/recipes-dai/dai-edge/dai-edge_git.bb
FILES=$L/recipes-dai/dai-edge/files
# The release oelint-adv checks against: LAYERSERIES_COMPAT_dai.
RELEASE=$(sed -nE 's/^LAYERSERIES_COMPAT_dai = "([^" ]+).*/\1/p' "$L/conf/layer.conf")

# shellcheck source=deploy/checks.sh
. deploy/checks.sh

for tool in python3 systemd-analyze; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "FAIL  missing tool: $tool"
        exit 1
    }
done
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "FAIL  python3 is older than 3.11 (the generators use tomllib)"
    exit 1
}

# --- generated files --------------------------------------------------------
run "crates: $L/recipes-dai/dai-edge/dai-edge-crates.inc matches Cargo.lock (gen-crates.py --check)" \
    python3 $Y/scripts/gen-crates.py --check
run "config: $FILES/edge.yaml matches configs/performance_config.yaml (gen-edge-config.py --check)" \
    python3 $Y/scripts/gen-edge-config.py --check
run "licence: $L/LICENSE is the repository's LICENSE" cmp LICENSE $L/LICENSE
md5=$(md5sum LICENSE | cut -d' ' -f1)
run "licence: LIC_FILES_CHKSUM has LICENSE's md5 ($md5)" \
    grep -q "^LIC_FILES_CHKSUM = \"file://LICENSE;md5=$md5\"$" "$RECIPE"

bin=${DAI_EDGE_BIN:-}
if [ -z "$bin" ]; then
    for b in "${CARGO_TARGET_DIR:-target}/release/dai-edge" target/release/dai-edge; do
        if [ -x "$b" ]; then bin=$b; break; fi
    done
fi
if [ -n "$bin" ]; then
    run "config: $bin check-config $FILES/edge.yaml" "$bin" check-config "$FILES/edge.yaml"
else
    echo "skip  config: dai-edge check-config (no built dai-edge; set DAI_EDGE_BIN)"
fi

# --- oelint-adv -------------------------------------------------------------
venv=${DAI_OELINT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dai/oelint-$(sha256sum $Y/lint-requirements.txt | cut -c1-12)}
if ! [ -x "$venv/bin/oelint-adv" ]; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    run "oelint-adv: install $Y/lint-requirements.txt into $venv" sh -c "
        python3 -m venv '$venv' &&
        '$venv/bin/pip' install --quiet --disable-pip-version-check \
            --require-virtualenv -r $Y/lint-requirements.txt"
fi
# Every recipe, include, bbappend, class and configuration file of the layer,
# in both branches of inline conditionals (--mode all). Findings of
# severity error or warning fail the check; info-level findings are hidden:
# they only suggest variables this project has no value for (BUGTRACKER,
# CVE_PRODUCT, SECTION for an image, BBCLASSEXTEND for a target daemon).
# oelint.vars.homepageping is suppressed because it fetches HOMEPAGE over the
# network, which CI does not have (and the project's URL in Cargo.toml is a
# reserved .invalid name for now). Inline `# nooelint:` comments in the
# recipes say why each of the others they silence does not apply.
mapfile -t lintfiles < <(cd $L && find . -type f \( -name '*.bb' -o -name '*.bbappend' \
    -o -name '*.inc' -o -name '*.bbclass' -o -name '*.conf' \) -not -path './recipes-*/*/files/*' |
    sed 's#^\./##' | sort)
run_silent "oelint-adv $("$venv/bin/oelint-adv" --version 2>/dev/null | awk '{print $NF}') --release $RELEASE: ${#lintfiles[@]} files, no errors or warnings" \
    sh -c "cd '$L' && '$venv/bin/oelint-adv' --quiet --relpaths --release '$RELEASE' --mode all \
        --hide info --suppress oelint.vars.homepageping ${lintfiles[*]}"

# --- systemd ----------------------------------------------------------------
# The unit as the image has it: deploy/systemd/dai-edge.service with the
# drop-ins the recipe installs (deploy's 10-sensor-groups.conf, and the
# 20-gpu.conf, also deploy's, with PACKAGECONFIG "gpu"). As in deploy/check.sh, the
# /usr/bin/ prefix of Exec*= lines is rewritten to stub executables, since
# dai-edge is not installed where this runs; nothing else changes. verify
# warns about unknown or malformed directives with status 0, so any output
# fails the check.
mkdir -p "$WORK/systemd/bin" "$WORK/systemd/dai-edge.service.d"
sed -E "s#^(Exec[A-Za-z]*=[-+!@:|]*)/usr/bin/#\\1$WORK/systemd/bin/#" deploy/systemd/dai-edge.service \
    >"$WORK/systemd/dai-edge.service"
sed -nE "s#^Exec[A-Za-z]*=[-+!@:|]*$WORK/systemd/bin/([^ ]+).*#\\1#p" "$WORK/systemd/dai-edge.service" |
    while read -r b; do
        printf '#!/bin/sh\nexit 0\n' >"$WORK/systemd/bin/$b"
        chmod +x "$WORK/systemd/bin/$b"
    done
cp deploy/systemd/dai-edge.service.d/10-sensor-groups.conf deploy/systemd/dai-edge.service.d/20-gpu.conf "$WORK/systemd/dai-edge.service.d/"
run_silent "systemd: systemd-analyze verify dai-edge.service (drop-ins: 10-sensor-groups.conf, 20-gpu.conf)" \
    systemd-analyze verify "$WORK/systemd/dai-edge.service"

# --- consistency ------------------------------------------------------------
# What the recipe creates and installs must be what the unit, its drop-ins,
# the udev rule and edge.yaml refer to.
run "consistency: user, groups, paths (recipe, unit, drop-ins, udev rule, edge.yaml)" \
    python3 - "$RECIPE" deploy/systemd "$FILES" <<'PY'
import re, sys
recipe_path, unitdir, files = sys.argv[1:]
recipe = open(recipe_path).read()
unit = open(f"{unitdir}/dai-edge.service").read()
sensors = open(f"{unitdir}/dai-edge.service.d/10-sensor-groups.conf").read()
udev = open(f"{files}/60-dai-sensors.rules").read()
config = open(f"{files}/edge.yaml").read()
errors = []

def one(pattern, text, what):
    found = re.findall(pattern, text, re.M)
    if len(found) != 1:
        errors.append(f"{what}: expected one match of {pattern!r}, found {found}")
        return None
    return found[0]

useradd = one(r'^USERADD_PARAM:\$\{PN\} = "((?:[^"\\]|\\\n)*)"', recipe, "recipe USERADD_PARAM")
user = useradd.split()[-1] if useradd else None
groups = set(re.findall(r"--system (\S+?);?(?=\s|;|$)",
                        one(r'^GROUPADD_PARAM:\$\{PN\} = "([^"]*)"', recipe, "recipe GROUPADD_PARAM") or ""))
for key in ("User", "Group"):
    v = one(rf"^{key}=(\S+)$", unit, f"unit {key}=")
    if v and v != user:
        errors.append(f"unit {key}={v}, but the recipe creates the user {user!r} (--user-group)")
supp = set((one(r"^SupplementaryGroups=(.*)$", sensors, "10-sensor-groups.conf") or "").split())
if supp - groups:
    errors.append(f"SupplementaryGroups= {sorted(supp)} not all created by GROUPADD_PARAM {sorted(groups)}")
udev_groups = set(re.findall(r'GROUP="([^"]+)"', udev))
if udev_groups != supp:
    errors.append(f"udev rule groups {sorted(udev_groups)} != SupplementaryGroups= {sorted(supp)}")

state = one(r"^StateDirectory=(\S+)$", unit, "unit StateDirectory=")
data_dir = one(r"^  data_dir: (\S+)", config, "edge.yaml daemon.data_dir")
if state and data_dir != f"/var/lib/{state}":
    errors.append(f"edge.yaml data_dir {data_dir} is not the unit's StateDirectory /var/lib/{state}")
if one(r"^WorkingDirectory=(\S+)$", unit, "unit WorkingDirectory=") != data_dir:
    errors.append("unit WorkingDirectory= is not edge.yaml's data_dir")
if state and f"--home-dir ${{localstatedir}}/lib/{state}" not in (useradd or ""):
    errors.append(f"the user's home is not /var/lib/{state}")
models_dir = one(r"^  models_dir: (\S+)", config, "edge.yaml daemon.models_dir")
if models_dir != "/usr/share/dai/models" or "${D}${datadir}/dai/models/$bundle" not in recipe:
    errors.append(f"edge.yaml models_dir {models_dir} is not where the recipe installs bundles "
                  "(${datadir}/dai/models = /usr/share/dai/models)")
exec_start = one(r"^ExecStart=(.*)$", unit, "unit ExecStart=") or ""
if not exec_start.startswith("/usr/bin/dai-edge --config /etc/dai/edge.yaml "):
    errors.append(f"ExecStart={exec_start}: expected /usr/bin/dai-edge --config /etc/dai/edge.yaml")
for needle in ("${D}${bindir}/dai-edge", "${D}${sysconfdir}/dai/edge.yaml",
               'CONFFILES:${PN} = "${sysconfdir}/dai/edge.yaml"'):
    if needle not in recipe:
        errors.append(f"recipe does not contain {needle}")
if errors:
    print("\n".join(errors))
    sys.exit(1)
PY

echo "yocto: all $checks checks passed"
