#!/bin/sh
# Print deploy/mosquitto/acl for one fleet: @FLEET@ replaced by FLEET.
#
#   deploy/mosquitto/render.sh FLEET > /etc/mosquitto/dai/acl
#
# FLEET must be a DAI name (1-64 characters of [A-Za-z0-9._-], the rule
# dai-trust and dai-protocol enforce), so it can carry no MQTT wildcard,
# topic separator or sed metacharacter into the ACL.
set -eu
if [ $# -ne 1 ]; then
    echo "usage: $0 FLEET" >&2
    exit 64
fi
fleet=$1
case $fleet in
    '' | *[!A-Za-z0-9._-]*) bad=1 ;;
    *) bad=0 ;;
esac
if [ "$bad" = 1 ] || [ ${#fleet} -gt 64 ]; then
    echo "$0: fleet name $fleet: expected 1-64 characters of [A-Za-z0-9._-]" >&2
    exit 64
fi
sed "s/@FLEET@/$fleet/g" "$(dirname "$0")/acl"
