SUMMARY = "DAI edge daemon: local ONNX inference, sensors and on-device training"
DESCRIPTION = "dai-edge serves ONNX model bundles over HTTP with dynamic \
               batching, a status page and Prometheus metrics, reads I2C/SPI \
               sensors, fine-tunes model heads on the device and exchanges \
               signed updates with a dai-cloud aggregator over MQTT."
# The workspace's `repository` in Cargo.toml.
HOMEPAGE = "https://example.invalid/dai"
SECTION = "net"
# DAI's own code. The binary also links the crates listed in
# dai-edge-crates.inc, each under its own licence (see its Cargo.toml).
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# The source, set in local.conf (yocto/README.md, "Configure"): either
#   DAI_GIT_URI = "HOST/PATH/dai.git" (the project's git repository without
#   the scheme), DAI_SRCREV = the commit to build (40 hex digits) and, if they
#   differ from https and main, DAI_GIT_PROTOCOL and DAI_GIT_BRANCH;
# or a local checkout through externalsrc:
#   INHERIT += "externalsrc"
#   EXTERNALSRC:pn-dai-edge = "/path/to/dai"
DAI_GIT_URI ??= ""
DAI_GIT_PROTOCOL ??= "https"
DAI_GIT_BRANCH ??= "main"
DAI_SRCREV ??= ""
# The crate registry's download API, without the scheme: a crate://
# entry of dai-edge-crates.inc is fetched from
# https://${DAI_CRATES_HOST}/NAME/VERSION/download. Set in local.conf; not
# needed when every crate comes from DL_DIR or PREMIRRORS with
# BB_NO_NETWORK = "1" (yocto/README.md, "Crates").
DAI_CRATES_HOST ??= ""
# Model bundles from models/zoo installed to /usr/share/dai/models: those
# whose model files are in the repository. The other zoo bundles fetch their
# ONNX file from a Python wheel at start, which the image cannot do.
DAI_MODELS ??= "digits imu-anomaly"

PV = "0.1.0+git"

# The git entry is left out while DAI_GIT_URI is unset, so that externalsrc
# (which keeps only the file:// and crate:// entries) works without it.
DAI_GIT_SRC_URI = "git://${DAI_GIT_URI};protocol=${DAI_GIT_PROTOCOL};branch=${DAI_GIT_BRANCH}"
SRC_URI = "${@d.getVar('DAI_GIT_SRC_URI') if d.getVar('DAI_GIT_URI') else ''}"

# One crate:// entry per package in Cargo.lock (yocto/scripts/gen-crates.py).
require ${BPN}-crates.inc

SRC_URI += "\
    file://edge.yaml \
    file://60-dai-sensors.rules \
"
SRCREV = "${DAI_SRCREV}"

inherit cargo features_check systemd useradd

REQUIRED_DISTRO_FEATURES = "systemd"

# gpu: the wgpu training backend (the crate's default feature; without it
# training runs on the CPU, as cross/build.sh --small builds it). wgpu loads
# the Vulkan loader at run time, and the unit needs the 20-gpu.conf drop-in.
PACKAGECONFIG ??= ""
PACKAGECONFIG[gpu] = "--features=gpu,,,vulkan-loader"

# The repository root is the workspace (CARGO_SRC_DIR stays empty); build
# only the daemon, without default features unless PACKAGECONFIG adds them.
CARGO_BUILD_FLAGS:append = " --package dai-edge --no-default-features"
# The workspace's release profile is tuned for the test loop (incremental,
# 16 codegen units). The image keeps its opt-level 3 (speed: the size-first
# dist profile of cross/build.sh --small runs models up to 2.2x slower) with
# thin LTO and one codegen unit; bitbake strips and splits the debug
# information itself.
export CARGO_INCREMENTAL = "0"
export CARGO_PROFILE_RELEASE_LTO = "thin"
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS = "1"

do_install() {
    install -d ${D}${bindir}
    install -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/dai-edge ${D}${bindir}/dai-edge

    install -d ${D}${sysconfdir}/dai
    install -m 0644 ${UNPACKDIR}/edge.yaml ${D}${sysconfdir}/dai/edge.yaml

    # The unit and its sensor drop-in are deploy/systemd's, used as they are.
    install -d ${D}${systemd_system_unitdir}/dai-edge.service.d
    install -m 0644 ${S}/deploy/systemd/dai-edge.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/deploy/systemd/dai-edge.service.d/10-sensor-groups.conf \
        ${D}${systemd_system_unitdir}/dai-edge.service.d/
    if ${@bb.utils.contains('PACKAGECONFIG', 'gpu', 'true', 'false', d)}; then
        install -m 0644 ${S}/deploy/systemd/dai-edge.service.d/20-gpu.conf \
            ${D}${systemd_system_unitdir}/dai-edge.service.d/
    fi

    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${UNPACKDIR}/60-dai-sensors.rules ${D}${nonarch_base_libdir}/udev/rules.d/

    for bundle in ${DAI_MODELS}; do
        if [ ! -f ${S}/models/zoo/$bundle/manifest.toml ]; then
            bbfatal "DAI_MODELS: models/zoo/$bundle/manifest.toml does not exist"
        fi
        install -d ${D}${datadir}/dai/models/$bundle
        install -m 0644 ${S}/models/zoo/$bundle/* ${D}${datadir}/dai/models/$bundle/
    done

    # The unit's Documentation= link.
    install -d ${D}${docdir}/dai
    install -m 0644 ${S}/README.md ${D}${docdir}/dai/README.md
}

# The unit runs as dai:dai (deploy/systemd/dai-edge.service). The groups
# i2c and spi own the sensor device nodes (60-dai-sensors.rules) and are the
# drop-in's SupplementaryGroups=, which fails the start if they are missing.
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system i2c; --system spi"
USERADD_PARAM:${PN} = "--system --user-group --no-create-home \
                       --home-dir ${localstatedir}/lib/dai \
                       --shell ${base_sbindir}/nologin dai"

SYSTEMD_SERVICE:${PN} = "dai-edge.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

FILES:${PN} += "\
    ${datadir}/dai \
    ${nonarch_base_libdir}/udev/rules.d/60-dai-sensors.rules \
    ${systemd_system_unitdir}/dai-edge.service.d \
"
CONFFILES:${PN} = "${sysconfdir}/dai/edge.yaml"

# Say what is missing before anything is fetched: the recipe is skipped
# (bitbake names the reason when dai-edge or dai-image is asked for) rather
# than failing the parse of every other recipe. It has to run at parse time:
# SRC_URI and SRCREV are evaluated before any task runs.
# nooelint: oelint.task.noanonpython
python () {
    import re

    missing = []
    if not d.getVar('EXTERNALSRC'):
        if not d.getVar('DAI_GIT_URI'):
            missing.append('DAI_GIT_URI = "HOST/PATH/dai.git" (the DAI git '
                           'repository without the scheme), or build a local '
                           'checkout with externalsrc')
        if not re.fullmatch(r'[0-9a-f]{40}', d.getVar('DAI_SRCREV') or ''):
            missing.append('DAI_SRCREV = "<the 40-hex-digit commit to build>"')
    offline = (d.getVar('BB_NO_NETWORK') == '1' or
               d.getVar('BB_FETCH_PREMIRRORONLY') == '1')
    if not d.getVar('DAI_CRATES_HOST') and not offline:
        missing.append('DAI_CRATES_HOST = "<the crate registry\'s download API '
                       'host and path: the public registry\'s, or your '
                       'mirror\'s>" (or fetch the crates from DL_DIR/PREMIRRORS '
                       'with BB_NO_NETWORK = "1")')
    if missing:
        raise bb.parse.SkipRecipe('set in local.conf (see yocto/README.md in the '
                                  'DAI repository): ' + '; '.join(missing))
}
