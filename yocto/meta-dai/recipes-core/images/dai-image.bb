SUMMARY = "DAI edge device image"
DESCRIPTION = "A minimal systemd image that boots into the DAI edge \
               daemon (dai-edge): local inference, sensors and on-device \
               training, with the digits and imu-anomaly model bundles."
# The workspace's `repository` in Cargo.toml.
HOMEPAGE = "https://example.invalid/dai"
LICENSE = "Apache-2.0"

IMAGE_INSTALL = "packagegroup-core-boot dai-edge ${CORE_IMAGE_EXTRA_INSTALL}"
IMAGE_LINGUAS = ""

inherit core-image features_check

REQUIRED_DISTRO_FEATURES = "systemd"

# Room for the daemon's SQLite store, outbox and logs under /var.
IMAGE_ROOTFS_EXTRA_SPACE = "131072"
